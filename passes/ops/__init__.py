"""What the passes know about each aten op, one module per op family.

Every family module registers its ops into :data:`OPS` (see :mod:`.registry`): the
coupling rule, the compaction rewrite and the MAC count of an op sit side by side.

========================  ==========================================================
``elementwise``           activations, arithmetic, comparisons, casts, dropout
``conv``                  convolutions (grouped, depthwise, transposed)
``linear``                linear, matmul/mm/bmm/addmm, scaled-dot-product attention
``norms``                 batch/instance/layer/RMS/group norm
``reductions``            reductions, softmax, pooling, resampling, padding
``layout``                view/reshape, permute, expand, cat, split, stack, flip
``indexing``              slice, narrow, select, getitem, embedding
========================  ==========================================================
"""

from fxprune.passes.ops import conv, elementwise, indexing, layout, linear, norms, reductions  # noqa: F401 (register)
from fxprune.passes.ops.registry import OPS, Op, apply_rule, lookup, op_name, register

__all__ = ["OPS", "Op", "apply_rule", "lookup", "op_name", "register"]
