"""Capture a model as an aten-level torch.fx graph through ``torch.export``.

``torch.fx.symbolic_trace`` fails on most real models (Hugging Face ones included);
``torch.export.export(strict=False)`` runs the Python code for real and records
aten ops, so it captures them. The unlifted ``ExportedProgram.module()`` is the
graph every later pass works on: parameters are ``get_attr`` nodes named by their
state_dict names and every op carries ``meta["val"]`` with its output shape.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
import warnings
from dataclasses import dataclass

import torch

from fxprune.errors import CaptureError, ExampleInputsError
from fxprune.passes.shapes import (DYNAMIC_META, bind_spec, default_dynamic_shapes, recorded_dims, to_export_arg,
                                   var_keyword_names, widen_size_one)

__all__ = ["Captured", "capture", "user_frame", "source_line", "random_ops", "random_advice"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# frames in these folders are library code, not the line the user needs to see
_SKIP_DIRS = (_TORCH_DIR + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep,
              os.path.join(_ROOT, "fxprune") + os.sep, os.path.join(_ROOT, "exporters") + os.sep)


@dataclass
class Captured:
    """What the trace pass returns: the unlifted graph module and the inputs it was checked on.

    ``graph_module.meta`` records which input dims are dynamic (:mod:`fxprune.passes.shapes`).
    """

    graph_module: torch.fx.GraphModule
    example_inputs: tuple
    example_kwargs: dict
    seconds: float


def user_frame(tb) -> traceback.FrameSummary | None:
    """The innermost frame of ``tb`` that lies in user code (not torch, not fxprune)."""
    frames = traceback.extract_tb(tb)
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(_SKIP_DIRS) and "<" not in frame.filename:
            return frame
    return frames[-1] if frames else None


def source_line(node: torch.fx.Node) -> str:
    """``file:line`` of the user code that created ``node``, or ``"?"`` when unknown."""
    trace = node.meta.get("stack_trace") or ""
    last = None
    for line in trace.splitlines():
        line = line.strip()
        if line.startswith("File "):
            last = line
    if last is None:
        return "?"
    try:
        path = last.split('"')[1]
        lineno = last.split("line ")[1].split(",")[0]
        return f"{os.path.basename(path)}:{lineno}"
    except IndexError:
        return last


def _describe(frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return "(no source line found)"
    code = f"\n        {frame.line.strip()}" if frame.line else ""
    return f'File "{frame.filename}", line {frame.lineno}, in {frame.name}{code}'


def _advice(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    if "Cache" in text and "not a known type" in text:
        return "the model returns a key/value cache object; build it with use_cache=False (e.g. config.use_cache = False)"
    if "data-dependent" in text or "DataDependent" in text or "GuardOnDataDependent" in text:
        return ("the model branches or sizes a tensor on tensor *values*; make that branch depend on "
                "shapes or constants, use torch.cond, or move it out of forward()")
    if "Unsupported" in text or "not supported" in text:
        return ("an operation in forward() is not supported by torch.export; wrap it in a "
                "torch.library custom op or move it out of forward()")
    return ("check that forward() runs on the example inputs with plain tensor operations; "
            "see https://pytorch.org/docs/stable/export.html for what torch.export supports")


def capture(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
            dynamic_shapes=None) -> Captured:
    """Capture ``model`` called on ``example_inputs`` (and ``example_kwargs``) as an exported graph.

    The model is captured in eval mode (the graph is the inference graph that gets
    compacted and exported); its train/eval flags are restored afterwards.

    ``dynamic_shapes`` is what ``torch.export.export`` takes. Without it the batch
    (dim 0 of the tensor inputs that share the first input's batch) is dynamic where
    the model allows it; where it does not, capture is static and a warning names the
    source line that fixed the batch. Dynamic dims of size 1 are captured on the
    example repeated to size 2 (torch.export specialises size 1).

    Raises
    ------
    ExampleInputsError
        ``example_inputs`` is not a tuple or the model does not run on it.
    CaptureError
        torch.export failed; the message names the user source line and what to try.
    """
    import time

    if not isinstance(example_inputs, tuple):
        raise ExampleInputsError(
            f"example_inputs must be a tuple of positional arguments, got {type(example_inputs).__name__}; "
            "wrap a single tensor as (x,)")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ExampleInputsError(f"example_kwargs must be a dict of keyword arguments, got "
                                 f"{type(example_kwargs).__name__}")
    kwargs = dict(example_kwargs or {})
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        try:
            with torch.no_grad():
                model(*example_inputs, **kwargs)
        except Exception as err:  # the user's forward itself fails
            raise ExampleInputsError(
                f"{type(model).__name__} does not run on the example inputs "
                f"({_shapes(example_inputs, kwargs)}): {type(err).__name__}: {err}\n"
                f"  at {_describe(user_frame(err.__traceback__))}"
            ) from err
        start = time.perf_counter()
        exported = _export_dynamic(model, example_inputs, kwargs, dynamic_shapes)
        graph_module = exported.module()
        graph_module.meta[DYNAMIC_META] = recorded_dims(graph_module, exported.range_constraints)
        seconds = time.perf_counter() - start
    finally:
        for name, m in model.named_modules():
            m.training = modes.get(name, m.training)
    return Captured(graph_module, example_inputs, kwargs, seconds)


def _export(model, args, kwargs, dynamic_shapes):
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}\n"
            f"  at {_describe(user_frame(err.__traceback__))}\n"
            f"  what to try: {_advice(err)}"
        ) from err


def _export_dynamic(model, args: tuple, kwargs: dict, dynamic_shapes):
    """Export with the requested (or the default batch) dynamic dims, on an example widened past size 1."""
    user_given = dynamic_shapes is not None
    if user_given and not dynamic_shapes:  # {} or (): the user asks for a static capture
        return _export(model, args, kwargs, None)
    spec = bind_spec(model, args, kwargs, dynamic_shapes) if user_given else default_dynamic_shapes(args, kwargs)
    if spec is None:
        return _export(model, args, kwargs, None)
    wide_args, wide_kwargs = widen_size_one(args, kwargs, spec)
    if user_given:
        return _export(model, wide_args, wide_kwargs, to_export_arg(model, spec, wide_args, wide_kwargs))
    with _SpecialisationWatch() as watch:
        try:
            return torch.export.export(model, wide_args, wide_kwargs,
                                       dynamic_shapes=to_export_arg(model, spec, wide_args, wide_kwargs),
                                       strict=False)
        except Exception as err:
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            loose = var_keyword_names(model, args, kwargs)
            if loose:
                reason = (f"torch.export cannot make dims dynamic while keyword inputs fall into forward's **kwargs "
                          f"({', '.join(loose)}): set them on the model instead (e.g. model.config.return_dict = "
                          f"False) or leave them out; {reason}")
    exported = _export(model, args, kwargs, None)  # raises the capture error, if the model cannot be captured at all
    where = f"; the batch size was fixed at {watch.where}" if watch.where else ""
    warnings.warn(f"{type(model).__name__}: the batch dim could not be captured as dynamic ({reason}){where}. "
                  f"The compact model, its .pt2 and its ONNX file accept only the example's shapes "
                  f"({_shapes(args, kwargs)}). Make that code follow the input's size, or pass dynamic_shapes= "
                  "to fxprune.compile", UserWarning, stacklevel=4)
    return exported


class _SpecialisationWatch(logging.Handler):
    """Remembers the user source line where torch.export's shape reasoning fixed a symbol to a constant."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.where: str | None = None
        self.logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")

    def emit(self, record: logging.LogRecord) -> None:
        if self.where is not None or "[guard added]" not in str(record.msg):
            return
        text = record.getMessage()
        if not text.startswith("eval") or not re.search(r"Eq\(s\d+, -?\d+\)", text):
            return
        frames = [f for f in traceback.extract_stack()
                  if not os.path.abspath(f.filename).startswith(_SKIP_DIRS) and "<" not in f.filename
                  and "logging" not in f.filename]
        if frames:
            self.where = _describe(frames[-1])

    def __enter__(self):
        lg = self.logger
        self.before = (lg.level, lg.handlers, lg.propagate)
        # only this handler sees the records: they are torch's INFO logs, not for the user's console
        lg.handlers, lg.propagate = [self], False
        lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        lg = self.logger
        level, lg.handlers, lg.propagate = self.before
        lg.setLevel(level)  # setLevel, not an assignment: it also clears the loggers' cached enabled levels


def _shapes(inputs, kwargs=None) -> str:
    def one(x):
        return f"Tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__

    return ", ".join([one(x) for x in inputs] + [f"{k}={one(v)}" for k, v in (kwargs or {}).items()])

def random_advice(graph_module: torch.fx.GraphModule) -> str | None:
    """What to say of a graph that draws random numbers (None where it draws none)."""
    drawn = random_ops(graph_module)
    if not drawn:
        return None
    return (f"forward draws random numbers ({', '.join(drawn[:3])}), so two runs on the same input differ: make "
            "the random tensor an input of forward (some models take one, e.g. noise=...)")


def random_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    """The ops in the graph that draw random numbers (PyTorch tags them ``nondeterministic_seeded``), each with
    its source line: a model with one computes something new on every run, so no two runs can be compared."""
    found = []
    for node in graph_module.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
                and torch.Tag.nondeterministic_seeded in target.tags and not _off(node):
            found.append(f"{target} at {source_line(node)}")
    return found


def _off(node: torch.fx.Node) -> bool:
    """A dropout (or attention with dropout) captured in eval mode: probability 0 or ``train=False``."""
    given = {a.name: node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value)
             for i, a in enumerate(node.target._schema.arguments)}
    return given.get("train") is False or given.get("p") == 0 or given.get("dropout_p") == 0
