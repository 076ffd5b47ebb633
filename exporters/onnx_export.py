"""ONNX export with a built-in numerical check against onnxruntime.

A compacted model is only useful if the deployed graph computes the same
function as the PyTorch one, so every export is validated by the ONNX checker
and, by default, by running onnxruntime on the example inputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch.utils._pytree import tree_leaves

from fxprune.errors import FxPruneError
from fxprune.exporters.onnx_ops import translations_for
from fxprune.passes.shapes import dynamic_dims_of, export_program, in_capture_order
from fxprune.progress import stages

__all__ = ["OnnxExport", "OnnxExportError", "OnnxMismatchError", "check_exportable", "compare_outputs", "export_onnx",
           "run_onnxruntime"]

# protobuf cannot serialise a single message larger than 2 GiB; leave headroom
# for the graph itself when deciding whether weights can stay inline.
_INLINE_LIMIT_BYTES = 2 * 1024**3 - 64 * 1024**2

# Loggers that print harmless noise during every export (missing torchvision
# ops, opset auto-upgrade, version-converter tracebacks, attributes given as empty lists).
_NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class OnnxMismatchError(FxPruneError, RuntimeError):
    """ONNX Runtime and PyTorch disagree on the example inputs."""


class OnnxExportError(FxPruneError, ValueError):
    """The model cannot be exported to ONNX as it is (e.g. bfloat16 weights or inputs)."""


@dataclass(frozen=True)
class OnnxExport:
    """Summary of one exported model.

    ``max_abs_error`` is NaN when the model was exported with ``check=False``.
    """

    path: str
    opset: int
    max_abs_error: float
    num_nodes: int
    size_bytes: int


def compare_outputs(torch_outputs: Any, ort_outputs: Sequence[np.ndarray], atol: float) -> float:
    """Return the max abs error between torch and ORT outputs, raising above tolerance.

    The tolerance of each output is ``atol * max(1, max|torch output|)``: float32
    rounding grows with the magnitude of the values, and random-init models can
    produce outputs in the hundreds.

    Parameters
    ----------
    torch_outputs : Any
        A pytree (tensor, tuple, list, dict, ...) of PyTorch outputs; only its
        tensor leaves are compared, in ``tree_leaves`` order, which is the
        order the ONNX exporter uses for graph outputs.
    ort_outputs : sequence of numpy.ndarray
        Outputs of ``InferenceSession.run``.
    atol : float
        Largest tolerated absolute difference per element for outputs of magnitude <= 1.

    Returns
    -------
    float
        The largest absolute difference over all outputs (0.0 if none).

    Raises
    ------
    OnnxMismatchError
        If the number of outputs or any shape differs, if NaNs appear in
        different places, or if any element differs by more than ``atol``.
    """
    expected = [t.detach().cpu() for t in tree_leaves(torch_outputs) if isinstance(t, torch.Tensor)]
    got = list(ort_outputs)
    if len(expected) != len(got):
        raise OnnxMismatchError(
            f"output count differs: torch produced {len(expected)} tensor(s), onnxruntime {len(got)}"
        )
    worst = 0.0
    for index, (ref, out) in enumerate(zip(expected, got)):
        ref_np = _to_numpy(ref).astype(np.float64)
        out_np = np.asarray(out).astype(np.float64)
        if ref_np.shape != out_np.shape:
            raise OnnxMismatchError(
                f"output {index}: shape differs, torch {tuple(ref_np.shape)} vs onnxruntime {tuple(out_np.shape)}"
            )
        error = _max_abs_diff(ref_np, out_np)
        scale = max(1.0, float(np.nanmax(np.abs(ref_np)))) if ref_np.size else 1.0
        if not error <= atol * scale:  # also catches NaN
            raise OnnxMismatchError(
                f"output {index}: max abs error {error:.3e} exceeds tolerance {atol * scale:.1e} "
                f"(atol={atol:.1e} x output scale {scale:.3g})"
            )
        worst = max(worst, error)
    return worst


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    example_inputs: tuple,
    example_kwargs: dict | None = None,
    *,
    dynamic_shapes: Any = None,
    opset: int = 18,
    atol: float = 1e-4,
    check: bool = True,
    progress: bool | None = None,
) -> OnnxExport:
    """Export ``model`` to a single ONNX file and verify it.

    The dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``) is
    used. It handles plain modules as well as the ``GraphModule`` returned by
    ``torch.export.export(...).module()``. The model runs in eval mode under
    ``torch.no_grad``; the train/eval flags of all submodules are restored
    afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Module to export.
    path : str or os.PathLike
        Destination ``.onnx`` file; parent folders are created.
    example_inputs : tuple
        Positional inputs, used for tracing and for the numerical check.
    example_kwargs : dict, optional
        Keyword inputs; every tensor among them becomes a graph input named after its argument.
    dynamic_shapes : optional
        ``torch.export``'s ``dynamic_shapes``. A graph from ``fxprune.compile`` (captured or
        compact) keeps, by default, the dims its capture made dynamic (the batch unless asked
        otherwise): the ONNX inputs get dynamic axes for them. Other modules are exported at
        the example's shapes unless this is given.
    opset : int, default 18
        Requested ONNX opset. Opsets below 18 are converted by onnxscript and
        may silently stay at 18; the opset actually written is returned and a
        ``UserWarning`` is issued when it differs.
    atol : float, default 1e-4
        Tolerance of the onnxruntime-vs-torch comparison, scaled by
        ``max(1, max|output|)`` (see :func:`compare_outputs`).
    check : bool, default True
        Run onnxruntime on ``example_inputs`` and compare all tensor outputs.
    progress : bool, optional
        A bar over export, ``onnx.checker`` and the onnxruntime comparison; default: when
        stderr is a terminal.

    Returns
    -------
    OnnxExport
        Path, written opset, max abs error (NaN without ``check``), number of
        top-level graph nodes and file size in bytes.

    Raises
    ------
    ValueError
        If ``example_inputs`` is not a tuple.
    OnnxExportError
        If a parameter, buffer or example input is bfloat16 (refused before anything is written).
    OnnxMismatchError
        If ``check`` is set and the outputs differ by more than ``atol``.
    """
    if not isinstance(example_inputs, tuple):
        raise ValueError(
            f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}; "
            "wrap a single tensor as (x,)"
        )
    check_exportable(model, example_inputs, example_kwargs)
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    inline = _state_bytes(model) < _INLINE_LIMIT_BYTES

    kwargs = dict(example_kwargs or {})
    with stages("ONNX export", ["torch.onnx.export", "onnx.checker"] + (["onnxruntime == torch"] if check else []),
                progress) as next_stage:
        next_stage()
        return _export(model, out_path, example_inputs, kwargs, dynamic_shapes, opset, atol, check, inline, next_stage)


def _export(model, out_path, example_inputs, kwargs, dynamic_shapes, opset, atol, check, inline, next_stage
            ) -> OnnxExport:
    kwargs = in_capture_order(model, kwargs)  # the file's inputs, and the check's feed, in the captured order
    with _eval_mode(model), torch.no_grad():
        reference = model(*example_inputs, **kwargs) if check else None
        # a program exported here keeps the recorded dynamic dims; the ONNX exporter turns them into axes
        # (outside the quiet exporter: a recorded dim that binds to no argument is a warning the user must see)
        program = export_program(model, example_inputs, kwargs, dynamic_shapes)
        with _quiet_exporter():
            torch.onnx.export(
                program,
                (),
                str(out_path),
                dynamo=True,
                custom_translation_table=translations_for(program) or None,
                opset_version=opset,
                external_data=not inline,
                verbose=False,
                report=False,
            )

    next_stage()
    _name_dynamic_axes(str(out_path), dynamic_dims_of(model))
    onnx.checker.check_model(str(out_path), full_check=True)
    proto = onnx.load(str(out_path), load_external_data=False)
    written_opset = _default_opset(proto)
    if written_opset != opset:
        warnings.warn(
            f"requested opset {opset} but the exporter wrote opset {written_opset} to {out_path}",
            UserWarning,
            stacklevel=3,
        )

    error = float("nan")
    if check:
        next_stage()
        names = [spec.arg.name for spec in program.graph_signature.input_specs
                 if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
                 and isinstance(spec.arg, torch.export.graph_signature.TensorArgument)]
        ort_outputs = run_onnxruntime(str(out_path), example_inputs, kwargs, names)
        error = compare_outputs(reference, ort_outputs, atol)

    return OnnxExport(
        path=str(out_path),
        opset=written_opset,
        max_abs_error=error,
        num_nodes=len(proto.graph.node),
        size_bytes=_file_bytes(out_path, proto),
    )


def check_exportable(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> None:
    """Raise :class:`OnnxExportError` where ``export_onnx`` would fail for a known reason, before any work.

    bfloat16 fails deep in the exporter or the checker (opset 18's Conv has no bfloat16) or in onnxruntime
    (no bfloat16 Gemm on CPU): say so up front, with the float32 route that works."""
    tensors = [*model.named_parameters(), *model.named_buffers(),
               *((f"input {i}", t) for i, t in enumerate(tree_leaves((tuple(example_inputs), dict(example_kwargs or {}))))
                 if isinstance(t, torch.Tensor))]
    bf16 = [name for name, t in tensors if t.dtype == torch.bfloat16]
    if bf16:
        raise OnnxExportError(
            f"ONNX export of bfloat16 is not supported ({len(bf16)} bfloat16 tensors, e.g. {bf16[0]}): ONNX opset 18 "
            "Conv and onnxruntime's CPU kernels do not take it, so the file could not be checked or run; export a "
            "float32 copy: copy.deepcopy(model).float() with float32 inputs (x.float())")


def run_onnxruntime(path: str, example_inputs: tuple, example_kwargs: dict | None = None,
                    names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Run an exported file on the tensors of ``example_inputs`` and ``example_kwargs``.

    ``names`` are the graph input names of those tensors in order (the exported
    program's user inputs); with them, an input the exporter dropped as unused is
    skipped. Without them tensors are fed in order. Non-tensor inputs (ints, flags,
    None) are constants inside the graph.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    tensors = [t for t in tree_leaves((tuple(example_inputs), dict(example_kwargs or {})))
               if isinstance(t, torch.Tensor)]
    graph_inputs = [i.name for i in session.get_inputs()]
    if names is not None and len(names) == len(tensors) and set(graph_inputs) <= set(names):
        by_name = dict(zip(names, tensors))
        return session.run(None, {n: _to_numpy(by_name[n].detach().cpu()) for n in graph_inputs})
    if len(graph_inputs) != len(tensors):
        raise OnnxMismatchError(
            f"input count differs: example_inputs hold {len(tensors)} tensor(s), "
            f"the ONNX graph expects {len(graph_inputs)} ({graph_inputs})"
        )
    return session.run(None, {n: _to_numpy(t.detach().cpu()) for n, t in zip(graph_inputs, tensors)})


def _name_dynamic_axes(path: str, dims: dict) -> None:
    """Give dynamic axes the names fxprune recorded (``batch``, ``input_ids_dim1``) instead of ``s43``."""
    if not dims:
        return
    proto = onnx.load(path, load_external_data=False)
    rename = {}
    for value in proto.graph.input:
        for d, axis in enumerate(value.type.tensor_type.shape.dim):
            if axis.dim_param and d in dims.get(value.name, {}):
                rename.setdefault(axis.dim_param, dims[value.name][d][0])
    if not rename:
        return
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for axis in value.type.tensor_type.shape.dim:
            if axis.dim_param in rename:
                axis.dim_param = rename[axis.dim_param]
    onnx.save(proto, path)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Convert to numpy, widening bfloat16 which numpy cannot represent."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _max_abs_diff(ref: np.ndarray, out: np.ndarray) -> float:
    """Max abs difference where equal infinities and co-located NaNs count as 0."""
    if ref.size == 0:
        return 0.0
    ref_nan, out_nan = np.isnan(ref), np.isnan(out)
    if not np.array_equal(ref_nan, out_nan):
        return float("inf")
    with np.errstate(invalid="ignore"):
        diff = np.where((ref == out) | ref_nan, 0.0, np.abs(ref - out))
    return float(diff.max())


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch to eval mode and restore every submodule's own flag afterwards.

    ``ExportedProgram.module()`` refuses ``.eval()`` (NotImplementedError):
    its graph was traced already, so the flag is inert and is left alone.
    """
    saved = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
    except NotImplementedError:
        pass
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's routine logs, prints and warnings.

    On failure, whatever the exporter printed is attached to the exception
    as a note so the diagnostics are not lost.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    buffer = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:
        printed = buffer.getvalue().strip()
        if printed and hasattr(exc, "add_note"):
            exc.add_note(f"torch.onnx output:\n{printed}")
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _state_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, i.e. what would be stored as initializers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _default_opset(proto: onnx.ModelProto) -> int:
    """Opset of the default ONNX domain ('' or 'ai.onnx')."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError(f"ONNX model has no default-domain opset: {list(proto.opset_import)}")


def _file_bytes(path: Path, proto: onnx.ModelProto) -> int:
    """Size of the .onnx file plus any external-data files it references."""
    total = path.stat().st_size
    seen: set[str] = set()
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                data = path.parent / entry.value
                if data.exists():
                    total += data.stat().st_size
    return total
