"""Group pass: which channels must be removed together.

One walk over the captured graph in topological order runs each node's rule
(:mod:`fxprune.passes.ops`), giving channel spaces ``(value, dim)`` and element
maps between them. networkx holds the space graph; element-level connected
components (scipy) are the *atoms*: the smallest sets of channels that can be
removed at once. A frozen space (model input/output, an op without a rule, a
non-parametric reduction) freezes every atom it touches. A :class:`Group` is a
connected set of spaces that still has free atoms and holds at least one parameter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import networkx as nx
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
from torch.fx import GraphModule

from fxprune.passes.couplings import PARAM_PREFIX, Couplings, NormSite, nodes_in, value_key
from fxprune.passes.norm_sites import statistics_modules
from fxprune.passes.ops import apply_rule
from fxprune.passes.reshape import resolve_reshapes

__all__ = ["Member", "Group", "Grouping", "group_channels"]


@dataclass
class Member:
    """One parameter or buffer dim in a group.

    ``atoms[i]`` is the group channel that index ``i`` of ``name`` along ``dim``
    belongs to (``-1``: not prunable, always kept).
    """

    name: str
    dim: int
    atoms: np.ndarray
    is_parameter: bool = True

    def indices(self, channel: int) -> np.ndarray:
        """Indices of this tensor along ``dim`` that make up group channel ``channel``."""
        return np.flatnonzero(self.atoms == channel)

    def __repr__(self) -> str:
        per = np.bincount(self.atoms[self.atoms >= 0]).max() if (self.atoms >= 0).any() else 0
        return f"Member({self.name!r}, dim={self.dim}, size={len(self.atoms)}, {per} per channel)"


@dataclass
class Group:
    """Channels that must be removed together: ``size`` units, each a slice of every member."""

    index: int
    size: int
    members: list[Member]
    parts: list[np.ndarray] = field(repr=False, default_factory=list)  # channel sets of tensors made only of group channels
    norms: list[NormSite] = field(repr=False, default_factory=list)  # norm statistics spanning these channels
    writers: set[str] = field(repr=False, default_factory=set)  # layers whose result holds these channels

    @property
    def normalized(self) -> bool:
        """Norm statistics span these channels (a transformer's hidden size): pruned only on request."""
        return bool(self.norms)

    @property
    def restrictable(self) -> bool:
        """Every module whose statistics span these channels can run on kept channels only."""
        return all(site.input_dim is not None for site in self.norms)

    @property
    def parameters(self) -> list[Member]:
        return [m for m in self.members if m.is_parameter]

    def channel_range(self, member: Member, channel: int) -> tuple[int, int] | np.ndarray:
        """(start, stop) when channel ``channel`` of ``member`` is contiguous, else its indices."""
        idx = member.indices(channel)
        if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
            return int(idx[0]), int(idx[-1]) + 1
        return idx

    def describe(self) -> str:
        names = ", ".join(f"{m.name}[{m.dim}]" for m in self.parameters[:6])
        more = "" if len(self.parameters) <= 6 else f", … (+{len(self.parameters) - 6})"
        normed = (f"; spanned by {len({n.module for n in self.norms})} norm layers (pruned only with "
                  "prune_hidden_size=True)") if self.norms else ""
        if not self.restrictable:
            stuck = sorted({n.module for n in self.norms if n.input_dim is None})
            normed = f"; frozen: statistics in {', '.join(stuck)} span them and cannot be restricted to kept channels"
        return f"group {self.index}: {self.size} channels over {names}{more}{normed}"


@dataclass
class Grouping:
    """Result of the group pass."""

    groups: list[Group]
    space_atoms: dict[tuple[str, int], np.ndarray]  # global atom id per element, -1 frozen
    atom_group: np.ndarray  # global atom -> (group index) ; -1 if frozen/unused
    atom_local: np.ndarray  # global atom -> channel index inside its group
    frozen: dict[tuple[str, int], str]  # every frozen space and why
    blocked: dict[tuple[str, int], str]  # parameter dims that cannot be pruned and why
    shapes: dict[str, tuple]  # at the capture example; ``dynamic`` dims take other sizes at run time
    seconds: float
    dynamic: set = field(default_factory=set)  # (value, dim) spaces whose size follows a dynamic input dim
    norm_modules: list[str] = field(default_factory=list)  # modules whose statistics span channel dims
    called: set[str] = field(default_factory=set)  # layers (modules with parameters) the graph calls


def _collect_shapes(gm: GraphModule) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Shapes at the capture example (a dynamic dim at its example size; None if it has none) and, for
    values with dynamic dims, every dim as (example size, size as an int or a sympy expression)."""
    shapes: dict[str, tuple] = {}
    exprs: dict[str, tuple] = {}

    def add(key: str, t) -> None:
        sizes = tuple((s, s) if isinstance(s, int) else (s.node.hint, s.node.expr) for s in t.shape)
        shapes[key] = tuple(h for h, _ in sizes)
        if any(not isinstance(e, int) for _, e in sizes):
            exprs[key] = sizes

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch(gm, node.target)
            if isinstance(value, torch.Tensor):
                shapes[value_key(node)] = tuple(value.shape)
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            add(node.name, val)
        elif isinstance(val, (list, tuple)):
            for i, v in enumerate(val):
                if isinstance(v, torch.Tensor):
                    add(f"{node.name}#{i}", v)
    return shapes, exprs


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def collect_couplings(gm: GraphModule) -> Couplings:
    """Walk the graph once and run every node's rule."""
    shapes, exprs = _collect_shapes(gm)
    hints = {e: h for sizes in exprs.values() for h, e in sizes if not isinstance(e, int) and e.is_symbol}
    c = Couplings(shapes=shapes, exprs=exprs, hints=hints, statistics_modules=statistics_modules(gm, shapes))
    _couple_aliases(gm, c)
    for node in gm.graph.nodes:
        c.node = node
        if node.op == "placeholder":
            c.freeze(node, None, "model input")
        elif node.op == "output":
            for arg in nodes_in(node.args):
                c.freeze(arg, None, "model output")
        elif node.op == "call_function":
            apply_rule(node, c)
        elif node.op == "call_module" and c.output_keys(node):
            c.freeze_all(node, f"opaque submodule {node.target}")
    resolve_reshapes(c)
    for key, shape in c.shapes.items():
        for d, size in enumerate(shape):
            if size is None:
                c.frozen.setdefault((key, d), "size without an example value")
            elif size == 1:
                c.frozen.setdefault((key, d), "size 1")
            elif c.is_dynamic(key, d) and c.static_factor(key, d) == 1:
                c.frozen.setdefault((key, d), "dynamic dim")  # the batch, a sequence: never channels
    return c


UNREAD = "not read by the captured graph (a cache or an unused parameter)"


def _couple_aliases(gm: GraphModule, c: Couplings) -> None:
    """Tied weights read under two names (embedding = LM head) are one tensor: couple every dim.

    A tensor no node reads is frozen: pruning it would change nothing the graph computes, but
    the eager model may read it another way (a cache it refreshes in ``train()``/``eval()``,
    which capture took as a constant), and then masked and compact models would differ.
    """
    names: dict[tuple, list[str]] = {}
    read: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            read.add(node.target)
    for target in sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"}):
        t = _fetch(gm, target)
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        names.setdefault(ident, []).append(target)
    for aliases in names.values():
        for other in aliases[1:]:
            for d in range(c.shapes[PARAM_PREFIX + other].__len__()):
                c.identity(PARAM_PREFIX + aliases[0], d, PARAM_PREFIX + other, d)
        if not read.intersection(aliases):
            for target in aliases:
                c.freeze(PARAM_PREFIX + target, None, UNREAD)


def group_channels(gm: GraphModule) -> Grouping:
    """Run the group pass on a captured graph module.

    Returns
    -------
    Grouping
        The groups, every frozen space with its reason, and per-space atom maps
        that the compact pass reads.
    """
    start = time.perf_counter()
    c = collect_couplings(gm)

    # element index space: every dim of every value gets a contiguous range
    offsets, total = {}, 0
    for key, shape in c.shapes.items():
        for d, size in enumerate(shape):
            offsets[(key, d)] = total
            total += size or 1
    rows = [np.zeros(0, dtype=np.int64)]
    cols = [np.zeros(0, dtype=np.int64)]
    graph = nx.Graph()
    graph.add_nodes_from(offsets)
    for e in c.edges:
        rows.append(offsets[e.a] + e.ia)
        cols.append(offsets[e.b] + e.ib)
        graph.add_edge(e.a, e.b)
    r, k = np.concatenate(rows), np.concatenate(cols)
    adj = scipy.sparse.coo_matrix((np.ones(len(r), dtype=np.int8), (r, k)), shape=(total, total))
    _, labels = scipy.sparse.csgraph.connected_components(adj, directed=False)

    frozen_label_reason: dict[int, str] = {}
    for space, reason in c.frozen.items():
        lo = offsets[space]
        size = c.shapes[space[0]][space[1]] or 1
        for lab in np.unique(labels[lo:lo + size]):
            frozen_label_reason.setdefault(int(lab), f"{_space_name(space)}: {reason}")
    frozen_mask = np.zeros(labels.max() + 1 if total else 0, dtype=bool)
    frozen_mask[list(frozen_label_reason)] = True

    space_labels = {}
    for space, lo in offsets.items():
        size = c.shapes[space[0]][space[1]]
        if size is None:
            continue
        labs = labels[lo:lo + size]
        space_labels[space] = np.where(frozen_mask[labs], -1, labs)

    free_spaces = [s for s, labs in space_labels.items() if (labs >= 0).any()]
    sub = graph.subgraph(free_spaces)
    atom_group = np.full(len(frozen_mask), -1, dtype=np.int64)
    atom_local = np.full(len(frozen_mask), -1, dtype=np.int64)
    order = {s: i for i, s in enumerate(offsets)}  # graph order
    groups: list[Group] = []
    # components come out in set order, which follows per-process string hashing: sort them so
    # group indices are the same in every process (DDP ranks, a resumed run)
    components = sorted((sorted(comp, key=order.__getitem__) for comp in nx.connected_components(sub)),
                        key=lambda spaces: order[spaces[0]])
    for spaces in components:
        params = [s for s in spaces if s[0].startswith(PARAM_PREFIX)]
        if not any(_is_parameter(gm, key[len(PARAM_PREFIX):]) for key, _ in params):
            continue  # only buffers/constants: nothing to score and nothing worth removing
        gi = len(groups)
        local = 0
        for s in params + spaces:  # number channels in order of the first parameter
            for lab in space_labels[s]:
                if lab >= 0 and atom_group[lab] < 0:
                    atom_group[lab], atom_local[lab] = gi, local
                    local += 1
        members = []
        for key, dim in params:
            name = key[len(PARAM_PREFIX):]
            labs = space_labels[(key, dim)]
            atoms = np.where(labs >= 0, atom_local[np.maximum(labs, 0)], -1)
            members.append(Member(name, dim, atoms, _is_parameter(gm, name)))
        parts = {}
        for s in spaces:
            labs = space_labels[s]
            if (labs >= 0).all():
                part = np.unique(atom_local[labs])
                if len(part) < local:
                    parts[part.tobytes()] = part
        groups.append(Group(gi, local, members, list(parts.values())))

    space_atoms = {s: np.where(labs >= 0, labs, -1) for s, labs in space_labels.items()}
    for site in _align_norm_sites(gm, c.norms, space_atoms, c.shapes):
        labs = space_atoms.get(site.space)
        owners = set() if labs is None else set(atom_group[labs[labs >= 0]].tolist()) - {-1}
        for gi in sorted(owners):
            if site not in groups[gi].norms:
                groups[gi].norms.append(site)
    results = _module_results(gm, c.shapes)
    for path, keys in results.items():
        for key in keys:
            for dim in range(len(c.shapes[key])):
                labs = space_atoms.get((key, dim))
                if labs is not None and (labs >= 0).any():
                    for gi in set(atom_group[labs[labs >= 0]].tolist()) - {-1}:
                        groups[gi].writers.add(path)
    blocked = {}
    for (key, dim), labs in space_labels.items():
        if key.startswith(PARAM_PREFIX) and len(labs) > 1 and (labs < 0).all():
            lab = labels[offsets[(key, dim)]]
            blocked[(key[len(PARAM_PREFIX):], dim)] = frozen_label_reason.get(int(lab), "?")
    dynamic = {(k, d) for k in c.exprs for d in range(len(c.shapes[k])) if c.is_dynamic(k, d)}
    return Grouping(groups, space_atoms, atom_group, atom_local, dict(c.frozen), blocked, c.shapes,
                    time.perf_counter() - start, dynamic, sorted({site.module for site in c.norms}), set(results))


def _module_members(gm: GraphModule) -> dict[str, list]:
    """Module path -> the graph nodes inside its forward (every level of nn_module_stack), in graph order."""
    members: dict[str, list] = {}
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                members.setdefault(path, []).append(node)
    return members


def _results(nodes: list, shapes: dict) -> list[str]:
    """The values a module returns to its caller: its nodes read outside it, in graph order."""
    inside = set(nodes)
    return [n.name for n in nodes if n.name in shapes and any(u not in inside for u in n.users)]


def _module_results(gm: GraphModule, shapes: dict) -> dict[str, set[str]]:
    """For every layer called in the graph (a module with parameters of its own), the values it
    returns to its caller (read outside it)."""
    layers = {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    return {path: set(_results(nodes, shapes)) for path, nodes in _module_members(gm).items() if path in layers}


def _align_norm_sites(gm: GraphModule, sites: list[NormSite], space_atoms: dict, shapes: dict) -> list[NormSite]:
    """Express each site on its module's input: the dim holding the same channels (a norm may permute
    inside, e.g. channels-first; a standardised weight merges them with its kernel), and whether the
    module's output holds them too."""
    if not sites:
        return []
    members = _module_members(gm)
    first_input: dict[str, str] = {}
    last_output: dict[str, str] = {}
    for path in {s.module for s in sites}:
        nodes = members.get(path, [])
        inside = set()
        for node in nodes:  # the first value from outside that a node of the module reads
            inside.add(node)
            arg = next((a for a in nodes_in(node.args, node.kwargs)
                        if a.op != "get_attr" and a not in inside and a.name in shapes), None)
            if arg is not None:
                first_input[path] = arg.name
                break
        results = _results(nodes, shapes)
        if results:
            last_output[path] = results[-1]

    def channels(space):
        labs = space_atoms.get(space)
        return None if labs is None else frozenset(labs[labs >= 0].tolist())

    out = []
    for site in sites:
        key, want = first_input.get(site.module), channels(site.space)
        aligned = replace(site, input_dim=None)
        for d in range(len(shapes[key]) if key is not None else 0):
            if want and channels((key, d)) == want:
                n, result = len(shapes[key]), last_output.get(site.module)
                through = result is not None and len(shapes[result]) == n and channels((result, d)) == want
                aligned = replace(site, space=(key, d), input_dim=d - n, passes_through=through)
                break
        out.append(aligned)
    return out


def _space_name(space: tuple[str, int]) -> str:
    key, dim = space
    return f"{key[len(PARAM_PREFIX):] if key.startswith(PARAM_PREFIX) else key}[{dim}]"


def _is_parameter(gm: GraphModule, name: str) -> bool:
    return isinstance(_fetch(gm, name), torch.nn.Parameter)
