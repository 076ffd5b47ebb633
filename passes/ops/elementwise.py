"""Element-wise ops: every argument's dims couple to the output dims they broadcast to.

Activations, arithmetic, comparisons, casts, copies and dropout act on each element
alone, so a channel of an input is the same channel of the output. No MACs are counted
for them (they do not dominate inference cost), and capture fixes none of their sizes.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fxprune.passes.ops.registry import register

__all__ = ["broadcast", "ELEMENTWISE"]

aten = torch.ops.aten

ELEMENTWISE = (
    # activations
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.gelu_.default, aten.silu.default,
    aten.silu_.default, aten.sigmoid.default, aten.sigmoid_.default, aten.tanh.default, aten.tanh_.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.hardswish.default, aten.hardswish_.default,
    aten.hardsigmoid.default, aten.hardsigmoid_.default, aten.leaky_relu.default, aten.leaky_relu_.default,
    aten.elu.default, aten.elu_.default, aten.mish.default, aten.softplus.default, aten.relu6.default,
    aten.prelu.default,
    # maths
    aten.neg.default, aten.abs.default, aten.exp.default, aten.log.default, aten.sqrt.default,
    aten.rsqrt.default, aten.erf.default, aten.sin.default, aten.cos.default, aten.square.default,
    aten.reciprocal.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.div.Tensor, aten.div_.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
    aten.rsub.Scalar, aten.rsub.Tensor, aten.maximum.default, aten.minimum.default, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    # copies, casts, dropout, fills
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default, aten.detach_.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
    aten.lift_fresh_copy.default,
    # comparisons and logic
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default, aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor, aten.bitwise_not.default, aten.__and__.Tensor, aten.__or__.Tensor,
)


def broadcast(node: Node, c, out=None) -> None:
    """Each tensor argument's dims couple to the output's dims they broadcast to (right-aligned)."""
    out = node if out is None else out
    out_shape = c.shape(out)
    args = [a for a in list(node.args) + list(node.kwargs.values()) if c.is_tensor(a)]
    for a in args:
        shape = c.shape(a)
        if len(shape) > len(out_shape):
            c.freeze_all(node, "argument has more dims than the result")
            return
        for i in range(1, len(shape) + 1):
            if shape[-i] == out_shape[-i]:
                c.identity(a, -i, out, -i)
            elif shape[-i] != 1:
                c.freeze(a, -i, "unexpected broadcast")
                c.freeze(out, -i, "unexpected broadcast")


register(*ELEMENTWISE)(broadcast)


@register(aten.type_as.default)
def _type_as(node: Node, c) -> None:
    """Output is the first argument, cast; the second only lends its dtype."""
    for d in range(len(c.shape(node))):
        c.identity(node.args[0], d, node, d)
