"""Shape and layout ops: views, reshapes, permutations, broadcasting, concatenation and splits.

Each moves elements without mixing them, so channels map one to one: permutations
relabel dims, cat/split/stack place inputs at offsets along a dim, flip reverses one,
repeat_interleave repeats each channel in place and repeat tiles them (a channel goes with
its copies); a tensor
made from sizes (zeros, ones, full) has the channels of the ops that read it. A
reshape that keeps every dim couples at once; one that merges or splits dims is resolved
by :mod:`fxprune.passes.reshape` after every other rule. Capture fixes view, reshape,
expand and split sizes, which compaction recomputes (a size computed from dynamic dims is
scaled to the kept channels).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from fxprune.passes.couplings import value_key
from fxprune.passes.ops.arguments import arg
from fxprune.passes.ops.elementwise import broadcast
from fxprune.passes.ops.registry import register
from fxprune.passes.reshape import factor_groups, matched

aten = torch.ops.aten


def _new_sizes(node: Node, size) -> None:
    """Sizes become the new output sizes; -1 stays, and sizes computed from dynamic dims are scaled. The size
    list is the first argument of a factory (``zeros``), the second of an op on a tensor (``view``, ``new_zeros``)."""
    at = 1 if node.target._schema.arguments[0].name == "self" else 0
    new = [size.symbolic(node, i, s) if isinstance(s, Node) else s if s == -1 else size(node, i)
           for i, s in enumerate(node.args[at])]
    node.args = (*node.args[:at], new, *node.args[at + 1:])


def _new_unflatten_sizes(node: Node, size) -> None:
    x, dim, sizes = node.args[:3]
    dim %= len(size.shapes[value_key(x)])
    new = [s if s == -1 else size(node, dim + i) for i, s in enumerate(sizes)]
    node.args = (x, dim, new)


def _reshape(node: Node, c) -> None:
    """Dim-for-dim reshapes (squeeze, unsqueeze, views that keep every dim) couple now; ones that
    merge or split dims are decided after every other rule has run (see :mod:`fxprune.passes.reshape`)."""
    a, b = c.sizes(node.args[0]), c.sizes(node)
    groups = factor_groups(a, b)
    if matched(groups, a, b) and all(len(ga) == 1 and len(gb) == 1 for ga, gb in groups):
        for (da,), (db,) in groups:
            c.identity(node.args[0], da, node, db)
    else:
        c.deferred.append(node)


register(aten.view.default, aten.reshape.default, aten._unsafe_view.default, rewrite=_new_sizes)(_reshape)
register(aten.unflatten.int, rewrite=_new_unflatten_sizes)(_reshape)
register(aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
         aten.view_as.default, aten.reshape_as.default)(_reshape)


@register(aten.zeros.default, aten.ones.default, aten.full.default, aten.new_zeros.default, aten.new_ones.default,
          aten.new_full.default, rewrite=_new_sizes)
def _factory(node: Node, c) -> None:
    """A tensor made from sizes and a constant (a scan's zero initial state): its dims are channels wherever the
    ops that read it put them, and its sizes are rewritten to theirs. Nothing couples here; a new_* op's input
    gives only its dtype and device."""


@register(aten.expand.default, rewrite=_new_sizes)
def _expand(node: Node, c) -> None:
    """Broadcasting to the given sizes, which capture fixed."""
    broadcast(node, c)


@register(aten.permute.default)
def _permute(node: Node, c) -> None:
    for i, d in enumerate(node.args[1]):
        c.identity(node.args[0], d, node, i)


@register(aten.transpose.int, aten.swapaxes.default)
def _transpose(node: Node, c) -> None:
    x = node.args[0]
    n = len(c.shape(x))
    d0, d1 = node.args[1] % n, node.args[2] % n
    for d in range(n):
        c.identity(x, d, node, d1 if d == d0 else d0 if d == d1 else d)


@register(aten.t.default, aten.numpy_T.default)
def _t(node: Node, c) -> None:
    x = node.args[0]
    n = len(c.shape(x))
    for d in range(n):
        c.identity(x, d, node, n - 1 - d)


@register(aten.cat.default, aten.concat.default)
def _cat(node: Node, c) -> None:
    """Each input is a slice of the output along the cat dim."""
    tensors, dim = node.args[0], arg(node, 1, "dim", 0)
    n = len(c.shape(node))
    dim %= n
    if any(c.is_dynamic(t, dim) for t in tensors if len(c.shape(t)) == n):
        c.freeze_all(node, "concatenation along a dynamic dim")
        return
    start = 0
    for t in tensors:
        shape = c.shape(t)
        if len(shape) != n:  # legacy empty tensors
            continue
        for d in range(n):
            if d == dim:
                c.offset(t, d, node, d, start)
            else:
                c.identity(t, d, node, d)
        start += shape[dim]


def _split_sizes(node: Node, size) -> None:
    """Pieces may now differ in size, so every split becomes split_with_sizes."""
    x = node.args[0]
    dim = arg(node, 2, "dim", 0) % len(size.shapes[value_key(x)])
    if size.keep.get((value_key(x), dim)) is None:
        return  # the split dim keeps every element: the pieces are as captured
    i, new = 0, []
    while f"{node.name}#{i}" in size.shapes:
        new.append(size(f"{node.name}#{i}", dim))
        i += 1
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (x, new, dim), {}


def _split(node: Node, c) -> None:
    """Each output is a slice of the input along the split dim."""
    x = node.args[0]
    dim = arg(node, 2, "dim", 0) % len(c.shape(x))
    if c.is_dynamic(x, dim):
        c.freeze_all(node, "split along a dynamic dim")
        return
    start = 0
    for key in c.output_keys(node):
        shape = c.shapes[key]
        for d in range(len(shape)):
            if d == dim:
                c.offset(key, d, x, d, start)
            else:
                c.identity(key, d, x, d)
        start += shape[dim]


register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.split.sizes,
         aten.unsafe_split.Tensor, aten.tensor_split.sections, rewrite=_split_sizes)(_split)


@register(aten.tensor_split.indices, rewrite=_split_sizes)
def _split_at(node: Node, c) -> None:
    """Pieces between sorted indices are consecutive slices; unsorted ones overlap or come out empty (frozen)."""
    indices = list(node.args[1])
    if not all(isinstance(i, int) and i >= 0 for i in indices) or indices != sorted(indices):
        c.freeze_all(node, "tensor_split at unsorted or negative indices")
        return
    _split(node, c)


@register(aten.stack.default)
def _stack(node: Node, c) -> None:
    """Every input's dims pass through; the new dim indexes the inputs (frozen: its size is their count)."""
    tensors, dim = node.args[0], arg(node, 1, "dim", 0)
    n = len(c.shape(node))
    dim %= n
    for t in tensors:
        for d in range(n - 1):
            c.identity(t, d, node, d + (d >= dim))
    c.freeze(node, dim, "stacking dim")


def _new_output_size(node: Node, size) -> None:
    """A given ``output_size`` is the repeated dim's new size."""
    if isinstance(node.kwargs.get("output_size"), int):
        node.kwargs = {**node.kwargs, "output_size": size(node, arg(node, 2, "dim"))}


@register(aten.repeat_interleave.self_int, rewrite=_new_output_size)
def _repeat_interleave(node: Node, c) -> None:
    """Each element repeated ``r`` times along one dim: element i of x is elements ``i*r:(i+1)*r`` of the output
    (a block map, so a channel goes with its copies); the other dims pass through."""
    x, repeats, dim = node.args[0], node.args[1], arg(node, 2, "dim")
    if dim is None:
        c.freeze_all(node, "repeat_interleave over the flattened tensor")
        return
    dim %= len(c.shape(x))
    if not isinstance(repeats, int) or c.is_dynamic(x, dim):  # tokens repeated per expert: only that dim stops
        c.pass_except(x, node, {dim}, "repeat_interleave along a dynamic dim or by a computed count")
        return
    for d in range(len(c.shape(x))):
        if d != dim:
            c.identity(x, d, node, d)
    c.block(x, dim, node, dim, repeats)


@register(aten.repeat.default)
def _repeat(node: Node, c) -> None:
    """``x.repeat(r0, r1, ...)`` tiles x: element i of a tiled dim is element i % n of x, so a channel goes from
    every copy at once; leading dims the repeats add are new (frozen). The repeats themselves need no rewrite."""
    x, repeats = node.args[0], list(node.args[1])
    n, out_n = len(c.shape(x)), len(c.shape(node))
    for d in range(out_n - n):
        c.freeze(node, d, "dim added by repeat")
    for d in range(n):
        o, size = out_n - n + d, c.shape(x)[d]
        if repeats[o] == 1:
            c.identity(x, d, node, o)
        elif isinstance(repeats[o], int) and size is not None and not c.is_dynamic(x, d):
            tiled = np.arange(size * repeats[o])
            c.pairs(node, o, x, d, tiled, tiled % size)
        else:
            c.freeze(x, d, "repeat of a dynamic dim")
            c.freeze(node, o, "repeat of a dynamic dim")


@register(aten.flip.default)
def _flip(node: Node, c) -> None:
    """Flipped dims map index i to n-1-i."""
    x, dims = node.args[0], node.args[1]
    shape = c.shape(x)
    flipped = {d % len(shape) for d in dims}
    for d, size in enumerate(shape):
        if d in flipped and c.is_dynamic(x, d):
            c.freeze(x, d, "flip of a dynamic dim")
            c.freeze(node, d, "flip of a dynamic dim")
        elif d in flipped and size is not None:
            c.pairs(x, d, node, d, np.arange(size), size - 1 - np.arange(size))
        else:
            c.identity(x, d, node, d)


def _drop_assert(node: Node, size) -> None:
    """Capture-time shape assertions would reject the new sizes."""
    if not node.users:
        node.graph.erase_node(node)


@register(aten._assert_tensor_metadata.default, rewrite=_drop_assert)
def _shape_assert(node: Node, c) -> None:
    """A capture-time check of a tensor's shape and dtype: it returns nothing, so nothing couples."""
