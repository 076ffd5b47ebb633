"""Indexing: slices, selections, unbind, items of multi-output ops, embedding lookups.

A slice is elements ``start:end:step`` of its input (an offset or strided map); a
data-dependent one freezes the sliced dim. ``select`` freezes the dim it picks from, and
indexing by a tensor (``x[rows]``: tokens routed to experts) the dim its values pick from.
An embedding's rows are the vocabulary (frozen) and its columns the channels. Capture
fixes slice bounds, which compaction recounts over the kept channels.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.fx import Node

from fxprune.passes.couplings import value_key
from fxprune.passes.ops.arguments import arg, slice_bounds
from fxprune.passes.ops.registry import register

aten = torch.ops.aten


def _new_slice_bounds(node: Node, size) -> None:
    """The bounds count only the kept channels before and inside the slice. A strided slice picks the kept
    channels it read at their new places: a slice again where they are evenly spaced (interleaved gate and up
    projections lose channels in pairs), else an index_select of those places."""
    x = node.args[0]
    n = len(size.shapes[value_key(x)])
    dim = arg(node, 1, "dim", 0) % n
    mask = size.keep.get((value_key(x), dim))
    if mask is None:
        return
    start, end, step = slice_bounds(node, len(mask))
    if step == 1:
        new_start = int(mask[:start].sum())
        node.args, node.kwargs = (x, dim, new_start, new_start + int(mask[start:end].sum()), step), {}
        return
    read = np.arange(start, end, step)
    places = (np.cumsum(mask) - 1)[read[mask[read]]]
    gaps = np.unique(np.diff(places))
    if len(places) == 0 or len(gaps) <= 1:
        first = int(places[0]) if len(places) else 0
        new_step = int(gaps[0]) if len(gaps) else 1
        node.args, node.kwargs = (x, dim, first, first + new_step * (len(places) - 1) + 1 if len(places) else 0,
                                  new_step), {}
        return
    module = node.graph.owning_module
    name = f"_fxprune_places_{node.name}"
    device = x.meta["val"].device if "val" in x.meta else None
    module.register_buffer(name, torch.from_numpy(places.astype(np.int64)).to(device), persistent=False)
    with node.graph.inserting_before(node):
        index = node.graph.get_attr(name)
    node.target, node.args, node.kwargs = aten.index_select.default, (x, dim, index), {}


@register(aten.slice.Tensor, rewrite=_new_slice_bounds)
def _slice(node: Node, c) -> None:
    """A slice is an offset map (a strided one, for a step); data-dependent bounds freeze the dim."""
    x = node.args[0]
    n = len(c.shape(x))
    dim = arg(node, 1, "dim", 0) % n
    if c.is_dynamic(x, dim) or any(isinstance(arg(node, i, k), Node) for i, k in ((2, "start"), (3, "end"))):
        for d in range(n):
            if d != dim:
                c.identity(x, d, node, d)
        c.freeze(x, dim, "slice with a dynamic bound")
        c.freeze(node, dim, "slice with a dynamic bound")
        return
    start, _, step = slice_bounds(node, c.shape(x)[dim])
    for d in range(n):
        if d != dim:
            c.identity(x, d, node, d)
        else:  # element i is element start + i * step of the input
            picked = np.arange(c.shape(node)[d])
            c.pairs(node, d, x, d, picked, start + step * picked)


def _narrow_to_slice(node: Node, size) -> None:
    """Kept channels may no longer be contiguous in count: narrow becomes the equivalent slice."""
    x, dim, start, length = node.args[:4]
    n = len(size.shapes[value_key(x)])
    dim %= n
    mask = size.keep.get((value_key(x), dim))
    if mask is None:
        return
    start = start + len(mask) if start < 0 else start
    new_start = int(mask[:start].sum())
    node.target = aten.slice.Tensor
    node.args, node.kwargs = (x, dim, new_start, new_start + int(mask[start:start + length].sum()), 1), {}


@register(aten.narrow.default, rewrite=_narrow_to_slice)
def _narrow(node: Node, c) -> None:
    """narrow(x, dim, start, length) is slice(x, dim, start, start + length)."""
    x, dim, start = node.args[0], node.args[1], node.args[2]
    n = len(c.shape(x))
    dim %= n
    if c.is_dynamic(x, dim) or isinstance(start, Node) or isinstance(node.args[3], Node):
        c.freeze_all(node, "narrow with a dynamic bound")
        return
    start = start + c.shape(x)[dim] if start < 0 else start
    for d in range(n):
        if d == dim:
            c.offset(node, d, x, d, start)
        else:
            c.identity(x, d, node, d)


@register(aten.select.int)
def _select(node: Node, c) -> None:
    """The picked dim is frozen; the others pass through."""
    x, dim = node.args[0], node.args[1]
    n = len(c.shape(x))
    dim %= n
    c.freeze(x, dim, "select picks one index of this dim")
    for d in range(n):
        if d != dim:
            c.identity(x, d, node, d - (d > dim))


@register(aten.index.Tensor)
def _index(node: Node, c) -> None:
    """``x[..., idx, ...]``: the dims index tensors pick from are frozen (their elements are chosen by values), the
    dims the indices make are frozen too (they are the indices'), and the other dims pass through. Several index
    tensors broadcast together (``h[arange(b), eos]``); apart, their dims go first, as in PyTorch."""
    x, indices = node.args[0], list(node.args[1])
    vals = {k: t.meta.get("val") for k, t in enumerate(indices) if isinstance(t, Node)}
    if not vals or len(vals) != sum(t is not None for t in indices) or any(v is None for v in vals.values()) \
            or (len(vals) > 1 and any(v.dtype == torch.bool for v in vals.values())) \
            or not c.is_tensor(x) or not c.is_tensor(node):
        c.freeze_all(node, "indexing by a boolean mask among other indices, or by a non-tensor")
        return
    picked = sorted(vals)
    n, out_n = len(c.shape(x)), len(c.shape(node))
    consumed = vals[picked[0]].dim() if len(picked) == 1 and vals[picked[0]].dtype == torch.bool else 1
    taken = set(range(picked[0], picked[0] + consumed)) if consumed > 1 else set(picked)
    made = out_n - (n - len(taken))  # the broadcast index dims
    first = picked[0] if picked == list(range(picked[0], picked[-1] + 1)) else 0  # where those dims go
    j = 0
    for d in range(n):
        if d in taken:
            c.freeze(x, d, "indexed by tensor values")
            continue
        if j == first:
            j += made
        c.identity(x, d, node, j)
        j += 1
    for d in range(first, first + made):
        c.freeze(node, d, "dims of an index tensor")
    for t in vals:  # an index computed from channels would shrink with them while the output would not
        c.freeze(indices[t], None, "used as an index")


@register(aten.gather.default)
def _gather(node: Node, c) -> None:
    """``gather(x, dim, index)`` moves elements along ``dim`` only: there they are chosen by values (frozen);
    every other dim passes through, from x and from the index (which has the output's shape)."""
    x, index = node.args[0], node.args[2]
    if not c.shape(x):
        c.freeze_all(node, "gather from a 0-d tensor")
        return
    dim = node.args[1] % len(c.shape(x))
    c.pass_except(x, node, {dim}, "gathered by tensor values")
    c.pass_except(index, node, {dim}, "gathered by tensor values")


@register(aten.unbind.int)
def _unbind(node: Node, c) -> None:
    """Each output is one index of the unbound dim (a select per output), so that dim is frozen.

    ``q, k, v = qkv.unbind(0)`` of a packed projection: the "3" is frozen here, which lets the
    reshape pass tie the heads factor instead (see :mod:`fxprune.passes.reshape`).
    """
    x = node.args[0]
    n = len(c.shape(x))
    dim = arg(node, 1, "dim", 0) % n
    c.freeze(x, dim, "unbind splits this dim into separate tensors")
    for key in c.output_keys(node):
        for d in range(n):
            if d != dim:
                c.identity(x, d, key, d - (d > dim))


@register(operator.getitem)
def _getitem(node: Node, c) -> None:
    """Item i of a multi-output op is that op's i-th value; any other indexing is frozen."""
    src, index = node.args
    if isinstance(src, Node) and isinstance(index, int) and c.is_tensor(node):
        key = f"{src.name}#{index}"
        if key in c.shapes:
            for d in range(len(c.shape(node))):
                c.identity(key, d, node, d)
            return
    if c.is_tensor(node):
        c.freeze(node, None, "indexing")


@register(aten.embedding.default)
def _embedding(node: Node, c) -> None:
    """Rows are the vocabulary (frozen); columns are the embedding channels."""
    w, idx = node.args[0], node.args[1]
    c.freeze(w, 0, "embedding vocabulary")
    c.identity(w, 1, node, -1)
    for d in range(len(c.shape(idx))):
        c.identity(idx, d, node, d)
