"""Compact pass: physically remove pruned channels from the captured graph.

Reads which group channels are kept, slices every parameter and buffer along its
grouped dims, and rewrites the size arguments that capture specialised (view/
reshape/expand sizes, conv and group-norm group counts, split sizes, slice bounds).
Its postcondition is checked by running the result: every node's shape must be the
original shape with pruned channels removed, and the outputs must equal the masked
model's (see :func:`fxprune.api.Pruning.compact`).
"""

from __future__ import annotations

import copy
import operator
import warnings

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node

from fxprune.errors import CompactionError
from fxprune.passes.couplings import PARAM_PREFIX, registrar, value_key
from fxprune.passes.group import Grouping, _fetch
from fxprune.passes.rules import _arg, _slice_bounds
from fxprune.passes.trace import source_line

__all__ = ["space_keep", "compact_graph", "CompactGraphModule", "REWRITES"]

aten = torch.ops.aten


def space_keep(grouping: Grouping, atom_kept: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """Per space, a boolean keep mask over its elements; spaces that lose nothing are left out."""
    keep = {}
    for space, atoms in grouping.space_atoms.items():
        mask = np.where(atoms >= 0, atom_kept[np.maximum(atoms, 0)], True)
        if not mask.all():
            keep[space] = mask
    return keep


class _Sizes:
    """New size of a (value, dim) after compaction (at the capture example, for a dynamic dim)."""

    def __init__(self, shapes, keep, dynamic=frozenset()):
        self.shapes, self.keep, self.dynamic = shapes, keep, dynamic

    def __call__(self, arg, dim: int) -> int:
        key = value_key(arg) if not isinstance(arg, str) else arg
        shape = self.shapes[key]
        dim %= len(shape)
        mask = self.keep.get((key, dim))
        return int(mask.sum()) if mask is not None else shape[dim]

    def shape(self, key: str) -> tuple:
        """The expected shape; None for dims whose size follows a dynamic input dim."""
        return tuple(self(key, d) if s is not None and (key, d) not in self.dynamic else None
                     for d, s in enumerate(self.shapes[key]))

    def symbolic(self, node: Node, dim: int, value: Node) -> Node:
        """A size argument computed from dynamic dims (``b * 12``), scaled to the kept channels.

        Such a dim holds whole channels per period (the heads of batch*heads), so its new size is
        ``value * kept // total`` with kept/total counted at the capture example.
        """
        mask = self.keep.get((value_key(node), dim % len(self.shapes[value_key(node)])))
        if mask is None:
            return value
        with node.graph.inserting_before(node):
            scaled = node.graph.call_function(operator.mul, (value, int(mask.sum())))
            return node.graph.call_function(operator.floordiv, (scaled, len(mask)))

    def changed(self, arg, dim: int) -> bool:
        key = value_key(arg) if not isinstance(arg, str) else arg
        return (key, dim % len(self.shapes[key])) in self.keep


# -- size-argument rewrites ---------------------------------------------------------------

REWRITES: dict = {}
rewrite = registrar(REWRITES)  # every rewrite is registered in this module


@rewrite(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
def _sizes_arg(node: Node, size: _Sizes) -> None:
    """Sizes become the new output sizes; -1 stays, and sizes computed from dynamic dims are scaled."""
    sizes = list(node.args[1])
    new = [size.symbolic(node, i, s) if isinstance(s, Node) else s if s == -1 else size(node, i)
           for i, s in enumerate(sizes)]
    node.args = (node.args[0], new, *node.args[2:])


@rewrite(aten.unflatten.int)
def _unflatten(node: Node, size: _Sizes) -> None:
    x, dim, sizes = node.args[:3]
    dim %= len(size.shapes[value_key(x)])
    new = [s if s == -1 else size(node, dim + i) for i, s in enumerate(sizes)]
    node.args = (x, dim, new)


@rewrite(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
         aten.conv2d.padding, aten.conv3d.padding)
def _conv_groups(node: Node, size: _Sizes) -> None:
    groups = _arg(node, 6, "groups", 1)
    if groups != 1:
        new = size(node.args[0], 1) // size.shapes[value_key(node.args[1])][1]
        args = list(node.args) + [None] * (7 - len(node.args))
        args[2:6] = [_arg(node, i, n, d) for i, n, d in ((2, "bias", None), (3, "stride", [1]), (4, "padding", [0]), (5, "dilation", [1]))]
        args[6] = new
        node.args, node.kwargs = tuple(args), {}


@rewrite(aten.convolution.default)
def _convolution_groups(node: Node, size: _Sizes) -> None:
    if node.args[8] != 1 and not node.args[6]:
        args = list(node.args)
        args[8] = size(node.args[0], 1) // size.shapes[value_key(node.args[1])][1]
        node.args = tuple(args)


@rewrite(aten.group_norm.default)
def _group_norm(node: Node, size: _Sizes) -> None:
    x, groups = node.args[:2]
    per = size.shapes[value_key(x)][1] // groups
    node.args = (x, size(x, 1) // per, *node.args[2:])


@rewrite(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default)
def _norm_shape(node: Node, size: _Sizes) -> None:
    """The normalised shape is the new size of the input's last dims."""
    x, shape = node.args[:2]
    n = len(size.shapes[value_key(x)])
    new = [size(x, d) for d in range(n - len(shape), n)]
    node.args = (x, new, *node.args[2:])


@rewrite(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.split.sizes,
         aten.unsafe_split.Tensor)
def _split(node: Node, size: _Sizes) -> None:
    """Pieces may now differ in size, so every split becomes split_with_sizes."""
    x = node.args[0]
    dim = _arg(node, 2, "dim", 0) % len(size.shapes[value_key(x)])
    i, new = 0, []
    while f"{node.name}#{i}" in size.shapes:
        new.append(size(f"{node.name}#{i}", dim))
        i += 1
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (x, new, dim), {}


@rewrite(aten.slice.Tensor)
def _slice(node: Node, size: _Sizes) -> None:
    x = node.args[0]
    n = len(size.shapes[value_key(x)])
    dim = _arg(node, 1, "dim", 0) % n
    mask = size.keep.get((value_key(x), dim))
    if mask is None:
        return
    start, end, step = _slice_bounds(node, len(mask))
    new_start = int(mask[:start].sum())
    node.args, node.kwargs = (x, dim, new_start, new_start + int(mask[start:end].sum()), step), {}


@rewrite(aten.narrow.default)
def _narrow(node: Node, size: _Sizes) -> None:
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


@rewrite(aten._assert_tensor_metadata.default)
def _drop_assert(node: Node, size: _Sizes) -> None:
    """Capture-time shape assertions would reject the new sizes."""
    if not node.users:
        node.graph.erase_node(node)


# -- the pass -----------------------------------------------------------------------------

def _set_tensor(gm: torch.nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if attr in owner._parameters:
        old = owner._parameters[attr]
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)
    return value


def compact_graph(gm: GraphModule, grouping: Grouping, atom_kept: np.ndarray,
                  state: dict[str, torch.Tensor] | None = None) -> GraphModule:
    """Return a copy of ``gm`` with the channels whose atoms are not kept removed.

    Parameters
    ----------
    gm : the captured graph module (not modified).
    grouping : the group pass result for ``gm``.
    atom_kept : boolean per global atom; False removes it.
    state : current values of parameters/buffers by name (e.g. the masked model's
        state_dict after fine-tuning); names not in it keep the captured values.
    """
    # copy modules and graph but share the tensors: every one is replaced below, and copying
    # BERT-base's weights only to drop them costs a second and 400 MB
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    with warnings.catch_warnings():  # deepcopy of pytree specs warns about a torch-internal deprecation
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(gm, memo)
    keep = space_keep(grouping, atom_kept)
    size = _Sizes(grouping.shapes, keep, grouping.dynamic)
    state = state or {}
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    done: dict[int, torch.Tensor] = {}  # tied weights stay one tensor
    for name in sorted(targets):
        original = _fetch(gm, name)
        if not isinstance(original, torch.Tensor):
            continue
        if id(original) in done:
            _set_tensor(gm, name, done[id(original)])
            continue
        tensor = state.get(name, original).detach()
        for dim in range(tensor.dim()):
            mask = keep.get((PARAM_PREFIX + name, dim))
            if mask is not None:
                tensor = tensor.index_select(dim, torch.from_numpy(np.flatnonzero(mask)).to(tensor.device))
        done[id(original)] = _set_tensor(gm, name, tensor.clone())
    for node in list(gm.graph.nodes):
        fn = REWRITES.get(node.target) if node.op == "call_function" else None
        if fn is not None:
            fn(node, size)
    gm.graph.lint()
    gm = CompactGraphModule(gm, gm.graph, meta=gm.meta)
    gm.meta["fxprune_expected_shapes"] = {k: size.shape(k) for k in grouping.shapes
                                          if not k.startswith(PARAM_PREFIX)}
    return gm


class CompactGraphModule(GraphModule):
    """The compact graph: a GraphModule whose ``train()`` refuses training mode instead of ignoring it.

    The graph was captured in eval mode (BatchNorm on running statistics, no dropout), so
    ``.train()`` would change nothing while claiming to. A class, so copies keep the refusal.
    """

    def __init__(self, root, graph, meta: dict | None = None):
        super().__init__(root, graph)
        self.meta.update(meta or {})

    def train(self, mode: bool = True):
        if mode:
            raise CompactionError(
                "the compact graph is the inference graph captured in eval mode: BatchNorm uses its running "
                "statistics and dropout is off whatever .train() says. To train further, use "
                "pruning.compact_eager() (your own class, smaller) or fine-tune pruning.model before compact()")
        return super().train(False)


class _ShapeCheck(torch.fx.Interpreter):
    """Run the compact graph and compare each node's shape with the expected one."""

    def __init__(self, gm, expected):
        super().__init__(gm)
        self.expected = expected

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception as err:
            raise CompactionError(
                f"compacted graph fails at {n.format_node()} ({source_line(n)}): {type(err).__name__}: {err}. "
                "An op whose size arguments changed has no rewrite rule; please report it.") from err
        if isinstance(out, torch.Tensor) and n.name in self.expected:
            want = self.expected[n.name]
            got = tuple(out.shape)
            if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
                raise CompactionError(
                    f"compacted node {n.name} = {n.target} ({source_line(n)}) has shape {got}, expected {want}")
        return out


def check_shapes(gm: GraphModule, example_inputs: tuple) -> list:
    """Run ``gm`` node by node on ``example_inputs``; raise CompactionError on a wrong shape."""
    with torch.no_grad():
        out = _ShapeCheck(gm, gm.meta.get("fxprune_expected_shapes", {})).run(*pytree.tree_leaves(example_inputs))
    return out
