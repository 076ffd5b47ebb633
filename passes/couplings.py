"""The vocabulary rules use to say how channel dimensions couple.

A *value* is one tensor in the graph: a node's output, the i-th tensor of a node
that returns several, or a parameter/buffer (keyed by its state_dict name, so two
``get_attr`` nodes of one tied weight are one value). A *space* is ``(value, dim)``.
An edge between two spaces carries an element map: two index arrays saying which
element of one is the same channel as which element of the other. Identity,
offset (cat/split/slice) and block (flatten, grouped conv) maps are all such pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch.fx import Node
from torch.fx.node import map_arg

__all__ = ["Couplings", "Edge", "NormSite", "value_key", "PARAM_PREFIX", "nodes_in"]

PARAM_PREFIX = "param:"


def value_key(arg) -> str | None:
    """Key of a tensor value: a Node, a (Node, index) pair for multi-output nodes, or None."""
    if isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[0], Node):
        return f"{arg[0].name}#{arg[1]}"
    if isinstance(arg, Node):
        if arg.op == "get_attr":
            return PARAM_PREFIX + str(arg.target)
        return arg.name
    return None


@dataclass
class Edge:
    a: tuple[str, int]
    b: tuple[str, int]
    ia: np.ndarray
    ib: np.ndarray


@dataclass(frozen=True)
class NormSite:
    """A reduction over a channel dim inside a module that can run on kept channels only.

    LayerNorm/RMSNorm statistics, a GRN's channel mean, a weight standardised over its input
    channels: removing a channel there is exact only if the masked model computes them over
    kept channels alone; :mod:`fxprune.norms` makes the module do so. After the group pass,
    ``space`` is the module input's channel space and ``input_dim`` that dim (None when no dim
    of the input holds these channels: the module cannot be restricted); ``dim`` is the reduced
    dim of the normalised shape, both counted from the end. ``passes_through``: the module's
    output holds the same channels at ``input_dim`` (a norm) rather than others (a conv).
    """

    space: tuple[str, int]
    module: str
    dim: int
    input_dim: int | None
    passes_through: bool = True


@dataclass
class Couplings:
    """Edges and frozen spaces collected while walking the graph once."""

    shapes: dict[str, tuple] = field(default_factory=dict)
    exprs: dict[str, tuple] = field(default_factory=dict)  # values with dynamic dims: (example size, expr) per dim
    hints: dict = field(default_factory=dict)  # dynamic input dim (sympy symbol) -> its size at the capture example
    edges: list[Edge] = field(default_factory=list)
    frozen: dict[tuple[str, int], str] = field(default_factory=dict)
    node: Node | None = None  # the node whose rule is running, for frozen reasons
    deferred: list = field(default_factory=list)  # reshape nodes, resolved after every other rule
    norms: list[NormSite] = field(default_factory=list)  # statistics over channel dims inside norm modules
    statistics_modules: set = field(default_factory=set)  # modules that can run on kept channels (norm_sites.py)

    # -- shapes ---------------------------------------------------------------
    def shape(self, arg) -> tuple | None:
        """Static shape of a tensor value (dims that are symbolic are None), or None if not a tensor."""
        return self.shapes.get(value_key(arg)) if value_key(arg) is not None else None

    def sizes(self, arg) -> tuple:
        """Every dim as (example size, size): an int, or a sympy expression of the dynamic input dims."""
        key = value_key(arg) if not isinstance(arg, str) else arg
        return self.exprs.get(key) or tuple((s, s) for s in self.shapes[key])

    def is_dynamic(self, arg, dim: int) -> bool:
        """The size of (arg, dim) follows a dynamic input dim (``shapes`` holds its size at the example)."""
        key = value_key(arg) if not isinstance(arg, str) else arg
        entry = self.exprs.get(key)
        return entry is not None and not isinstance(entry[dim % len(entry)][1], int)

    def static_factor(self, arg, dim: int) -> int:
        """The constant factor of a dynamic dim's size (4 of ``4*s0``: the heads of a batch*heads dim)."""
        key = value_key(arg) if not isinstance(arg, str) else arg
        expr = self.exprs[key][dim % len(self.exprs[key])][1]
        coefficient, _ = expr.as_coeff_Mul()
        return int(coefficient) if coefficient.is_Integer and coefficient > 0 else 1

    def is_tensor(self, arg) -> bool:
        return self.shape(arg) is not None

    def is_param(self, arg) -> bool:
        return isinstance(arg, Node) and arg.op == "get_attr"

    # -- couplings ------------------------------------------------------------
    def pairs(self, a, da: int, b, db: int, ia, ib) -> None:
        """Couple element ``ia[k]`` of space (a, da) with element ``ib[k]`` of space (b, db)."""
        ka, kb = value_key(a) if not isinstance(a, str) else a, value_key(b) if not isinstance(b, str) else b
        sa, sb = self.shapes[ka], self.shapes[kb]
        da, db = da % len(sa), db % len(sb)
        self.edges.append(Edge((ka, da), (kb, db), np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)))

    def identity(self, a, da: int, b, db: int) -> None:
        """Same channels, same order; a size mismatch freezes both (never guess)."""
        sa, sb = self._shape_of(a), self._shape_of(b)
        na, nb = sa[da % len(sa)], sb[db % len(sb)]
        if self.is_dynamic(a, da) or self.is_dynamic(b, db):  # compare the sizes, not their example values
            ea, eb = self.sizes(a)[da % len(sa)][1], self.sizes(b)[db % len(sb)][1]
            if isinstance(ea, int) or isinstance(eb, int) or (ea - eb).expand() != 0:
                self.freeze(a, da, f"size mismatch {ea} vs {eb}")
                self.freeze(b, db, f"size mismatch {ea} vs {eb}")
                return
        if na is None or nb is None or na != nb:
            self.freeze(a, da, f"size mismatch {na} vs {nb}")
            self.freeze(b, db, f"size mismatch {na} vs {nb}")
            return
        idx = np.arange(na)
        self.pairs(a, da, b, db, idx, idx)

    def offset(self, part, dp: int, whole, dw: int, start: int) -> None:
        """``part`` along ``dp`` is elements ``start:start+n`` of ``whole`` along ``dw``."""
        n = self._shape_of(part)[dp % len(self._shape_of(part))]
        idx = np.arange(n)
        self.pairs(part, dp, whole, dw, idx, start + idx)

    def block(self, coarse, dc: int, fine, df: int, factor: int) -> None:
        """Element i of ``coarse`` is elements ``i*factor:(i+1)*factor`` of ``fine``."""
        n = self._shape_of(coarse)[dc % len(self._shape_of(coarse))]
        self.pairs(coarse, dc, fine, df, np.repeat(np.arange(n), factor), np.arange(n * factor))

    def pass_except(self, a, b, frozen: set[int], reason: str) -> None:
        """Every dim of ``a`` is the same dim of ``b`` (same rank), except ``frozen``, frozen on both."""
        for d in range(len(self._shape_of(a))):
            if d in frozen:
                self.freeze(a, d, reason)
                self.freeze(b, d, reason)
            else:
                self.identity(a, d, b, d)

    def freeze(self, arg, dim: int | None = None, reason: str = "") -> None:
        """Mark one dim (or all dims) of a value as not prunable, with the reason."""
        key = value_key(arg) if not isinstance(arg, str) else arg
        if key is None or key not in self.shapes:
            return
        shape = self.shapes[key]
        dims = range(len(shape)) if dim is None else [dim % len(shape)] if shape else []
        where = ""
        if self.node is not None:
            from fxprune.passes.trace import source_line

            where = f" [{self.node.target} at {source_line(self.node)}]" if self.node.op == "call_function" else f" [{self.node.op} {self.node.name}]"
        for d in dims:
            self.frozen.setdefault((key, d), reason + where)

    def normalise(self, arg, dim: int, reason: str) -> None:
        """Statistics of a norm layer span (arg, dim): a NormSite if inside a module that can compute them
        over kept channels only (:mod:`fxprune.passes.norm_sites`), else frozen."""
        stack = (self.node.meta.get("nn_module_stack") or {}) if self.node is not None else {}
        where = list(stack.values())[-1][0] if stack else None  # the innermost module around the node
        where = where if where in self.statistics_modules else None
        key = value_key(arg) if not isinstance(arg, str) else arg
        if where is None or key not in self.shapes:
            self.freeze(arg, dim, reason)
            return
        n = len(self.shapes[key])
        self.norms.append(NormSite((key, dim % n), where, dim % n - n, dim % n - n))

    def freeze_all(self, node: Node, reason: str) -> None:
        """Freeze every dim of every tensor input and output of ``node``."""
        for arg in nodes_in(node.args, node.kwargs):
            self.freeze(arg, None, reason)
        for key in self.output_keys(node):
            self.freeze(key, None, reason)

    def output_keys(self, node: Node) -> list[str]:
        key = value_key(node)
        if key in self.shapes:
            return [key]
        out, i = [], 0
        while f"{node.name}#{i}" in self.shapes:
            out.append(f"{node.name}#{i}")
            i += 1
        return out

    def _shape_of(self, arg):
        return self.shapes[arg] if isinstance(arg, str) else self.shapes[value_key(arg)]


def nodes_in(*trees) -> list[Node]:
    """Every Node inside nested args/kwargs (lists, tuples, dicts), in order."""
    out: list[Node] = []
    map_arg(trees, out.append)
    return out
