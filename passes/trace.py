"""Capture a model as an aten-level torch.fx graph through ``torch.export``.

``torch.fx.symbolic_trace`` fails on most real models (Hugging Face ones included);
``torch.export.export(strict=False)`` runs the Python code for real and records
aten ops, so it captures them. The unlifted ``ExportedProgram.module()`` is the
graph every later pass works on: parameters are ``get_attr`` nodes named by their
state_dict names and every op carries ``meta["val"]`` with its output shape.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch

from fxprune.errors import CaptureError, ExampleInputsError

__all__ = ["Captured", "capture", "user_frame", "source_line"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# frames in these folders are library code, not the line the user needs to see
_SKIP_DIRS = (_TORCH_DIR + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep,
              os.path.join(_ROOT, "fxprune") + os.sep, os.path.join(_ROOT, "exporters") + os.sep)


@dataclass
class Captured:
    """What the trace pass returns: the exported program and its unlifted graph module."""

    exported: torch.export.ExportedProgram
    graph_module: torch.fx.GraphModule
    example_inputs: tuple
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


def capture(model: torch.nn.Module, example_inputs: tuple) -> Captured:
    """Capture ``model`` called on ``example_inputs`` as an exported graph.

    The model is captured in eval mode (the graph is the inference graph that gets
    compacted and exported); its train/eval flags are restored afterwards.

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
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        try:
            with torch.no_grad():
                model(*example_inputs)
        except Exception as err:  # the user's forward itself fails
            raise ExampleInputsError(
                f"{type(model).__name__} does not run on the example inputs "
                f"({_shapes(example_inputs)}): {type(err).__name__}: {err}\n  at {_describe(user_frame(err.__traceback__))}"
            ) from err
        start = time.perf_counter()
        try:
            exported = torch.export.export(model, example_inputs, strict=False)
        except Exception as err:
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}\n"
                f"  at {_describe(user_frame(err.__traceback__))}\n"
                f"  what to try: {_advice(err)}"
            ) from err
        graph_module = exported.module()
        seconds = time.perf_counter() - start
    finally:
        for name, m in model.named_modules():
            m.training = modes.get(name, m.training)
    return Captured(exported, graph_module, example_inputs, seconds)


def _shapes(inputs) -> str:
    parts = []
    for x in inputs:
        parts.append(f"Tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
    return ", ".join(parts)
