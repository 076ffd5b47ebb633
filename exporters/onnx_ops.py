"""ONNX translations of custom ops that models put in their graphs and the exporter does not know.

Hugging Face mixture-of-experts layers run their experts through
``torch.ops.transformers.grouped_mm_fallback`` under capture (the float32 path of
``grouped_mm``): rows sorted by expert, each run of rows times its expert's matrix.
ONNX has no grouped matmul, so it becomes one MatMul per expert on that expert's rows
(``Slice`` by the offsets), concatenated in order: the work of the rows routed, not of
every expert on every row.
"""

from __future__ import annotations

from typing import Callable

import torch

from fxprune.passes.ops.linear import GROUPED_MM

__all__ = ["translations_for"]


def _grouped_mm(x, w, offs):
    """out[s] = x[s] @ w[e(s)] where rows ``offs[e-1]:offs[e]`` belong to expert e; rows past ``offs[-1]``
    (none, outside expert parallelism) are zero, as in the eager op."""
    from onnxscript import opset18 as op

    experts = w.shape[0]
    if not isinstance(experts, int):
        raise NotImplementedError("grouped_mm_fallback with a dynamic number of experts")
    ends = op.Cast(offs, to=7)  # int64, for Slice
    zero, big = op.Constant(value_ints=[0]), op.Constant(value_ints=[2**62])

    def offset(e):
        return op.Slice(ends, op.Constant(value_ints=[e]), op.Constant(value_ints=[e + 1]))

    parts, start = [], zero
    for e in range(experts):
        end = offset(e)
        parts.append(op.MatMul(op.Slice(x, start, end, zero), op.Gather(w, op.Constant(value_int=e), axis=0)))
        start = end
    past = op.MatMul(op.Slice(x, start, big, zero), op.Gather(w, op.Constant(value_int=0), axis=0))
    parts.append(op.Mul(past, op.CastLike(op.Constant(value_float=0.0), past)))
    return op.Concat(*parts, axis=0)


def translations_for(program: torch.export.ExportedProgram) -> dict[object, Callable]:
    """The ``custom_translation_table`` entries ``torch.onnx.export`` needs for the custom ops in ``program``."""
    table = {}
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and str(node.target) == GROUPED_MM:
            table[node.target] = _grouped_mm
    return table
