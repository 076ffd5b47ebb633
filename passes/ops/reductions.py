"""Reductions, softmax, pooling, resampling and padding: ops with dims that mix elements.

A reduced dim is frozen, because a zeroed channel would still change a mean, a max or a
norm; inside a norm module it is a norm site instead (see :mod:`.norms`). Softmax and
cumsum freeze the dim they normalise over. Pooling and resampling act per channel over a
window, padding over padded dims: leading dims pass through, the window dims are frozen.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fxprune.passes.ops.arguments import arg
from fxprune.passes.ops.registry import register

aten = torch.ops.aten


@register(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
          aten.std.correction, aten.var.dim, aten.std.dim, aten.logsumexp.default, aten.norm.ScalarOpt_dim)
def _reduce(node: Node, c) -> None:
    """Reduced dims are frozen (a zeroed channel would change the result); kept dims pass through."""
    _reduce_dims(node, c, arg(node, 1, "dim"))


def _reduce_dims(node: Node, c, dims) -> None:
    x = node.args[0]
    n = len(c.shape(x))
    if dims is None or dims == []:
        dims = list(range(n))
    dims = {d % n for d in ([dims] if isinstance(dims, int) else dims)}
    keep = len(c.shape(node)) == n
    j = 0
    for d in range(n):
        if d in dims:
            c.normalise(x, d, "reduction over this dim")
            j += keep
        else:
            c.identity(x, d, node, j)
            j += 1


@register(aten.max.dim, aten.min.dim)
def _reduce_with_indices(node: Node, c) -> None:
    """``max(x, dim)``: values and indices over one dim, which is frozen; the other dims pass through to both."""
    x = node.args[0]
    n = len(c.shape(x))
    if n == 0:
        c.freeze_all(node, "max/min of a 0-d tensor")
        return
    dim = arg(node, 1, "dim") % n
    keep = bool(arg(node, 2, "keepdim", False))
    c.freeze(x, dim, "max/min over this dim")
    for out in c.output_keys(node):
        for d in range(n):
            if d != dim:
                c.identity(x, d, out, d - (d > dim and not keep))


@register(aten.linalg_vector_norm.default)
def _vector_norm(node: Node, c) -> None:
    """``linalg_vector_norm(x, ord, dim, keepdim)``: a reduction over ``dim`` (all dims when None)."""
    _reduce_dims(node, c, arg(node, 2, "dim"))


@register(aten.mean.default, aten.sum.default)
def _reduce_all(node: Node, c) -> None:
    """A reduction to a scalar: nothing passes through."""
    c.freeze(node.args[0], None, "reduction over all dims")


@register(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
          aten.cumsum.default)
def _softmax(node: Node, c) -> None:
    """Dims pass through; the normalised one is frozen."""
    x, dim = node.args[0], node.args[1]
    for d in range(len(c.shape(x))):
        c.identity(x, d, node, d)
    c.freeze(node, dim, "softmax/cumsum normalises over this dim")


def _window(k: int):
    def window_rule(node: Node, c) -> None:
        """Window ops act per channel: leading dims pass through, the last k are frozen (indices too)."""
        outs = c.output_keys(node)
        x = node.args[0]
        n = len(c.shape(x))
        for d in range(n - k):
            for out in outs:  # the values, and the indices of a max pool: both per channel
                c.identity(x, d, out, d)
        for d in range(n - k, n):
            c.freeze(x, d, "pooling/resampling window")
            for out in outs:
                c.freeze(out, d, "pooling/resampling window")

    window_rule.__name__ = window_rule.__qualname__ = f"_window{k}d"
    return window_rule


register(aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default,
         aten.adaptive_max_pool1d.default)(_window(1))
register(aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
         aten.adaptive_max_pool2d.default, aten.max_pool2d_with_indices.default,
         aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.upsample_bicubic2d.vec,
         aten._adaptive_avg_pool2d.default)(_window(2))
register(aten.max_pool3d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool3d.default,
         aten.adaptive_max_pool3d.default)(_window(3))


@register(aten.pad.default, aten.constant_pad_nd.default)
def _pad(node: Node, c) -> None:
    """Padded dims are frozen; the rest pass through."""
    x, pad = node.args[0], node.args[1]
    n = len(c.shape(x))
    c.pass_except(x, node, {n - 1 - i // 2 for i, p in enumerate(pad) if p != 0}, "padded dim")
