"""Compact pass: physically remove pruned channels from the captured graph.

Reads which group channels are kept, slices every parameter and buffer along its
grouped dims, and rewrites the size arguments that capture specialised (view/
reshape/expand sizes, conv and group-norm group counts, split sizes, slice bounds),
each with the rewrite its op family registered (:mod:`fxprune.passes.ops`).
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
from fxprune.passes.couplings import PARAM_PREFIX, value_key
from fxprune.passes.group import Grouping
from fxprune.passes.ops import lookup
from fxprune.passes.trace import source_line

__all__ = ["space_keep", "compact_graph", "CompactGraphModule"]

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
        original = operator.attrgetter(name)(gm)
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
        entry = lookup(node.target) if node.op == "call_function" else None
        if entry is not None and entry.rewrite is not None:
            entry.rewrite(node, size)
    gm.graph.lint()
    transient = set(gm._non_persistent_buffers_set)  # e.g. a strided slice's places: not state, rebuilt each time
    gm = CompactGraphModule(gm, gm.graph, meta=gm.meta)
    gm._non_persistent_buffers_set.update(name for name in transient if name in gm._buffers)
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
