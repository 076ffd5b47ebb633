"""``fxprune.explain``: which ops the group pass understood, and what froze which layer."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch

from fxprune.passes.group import UNREAD, group_channels
from fxprune.passes.ops import lookup, op_name
from fxprune.passes.trace import capture
from fxprune.report import layer_of

__all__ = ["Explanation", "explain"]


@dataclass
class Explanation:
    ops_handled: Counter = field(default_factory=Counter)   # op -> count of nodes with a rule
    ops_blocking: Counter = field(default_factory=Counter)  # op -> count of nodes without one (their dims froze)
    blocked: dict = field(default_factory=dict)             # (parameter, dim) -> reason
    groups: list = field(default_factory=list)
    constants: list = field(default_factory=list)           # tensors the graph reads that the model does not own
    layers: list = field(default_factory=list)              # modules with parameters, in model order

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} prunable channel groups"]
        for g in self.groups:
            lines.append(f"  {g.describe()}")
        lines.append(f"ops with a rule: {sum(self.ops_handled.values())} nodes of {len(self.ops_handled)} kinds")
        if self.ops_blocking:
            lines.append("ops without a rule (the channels they touch are frozen):")
            lines += [f"  {op}: {n}" for op, n in self.ops_blocking.most_common()]
        interesting = self.frozen_dims()
        if interesting:
            lines.append("parameter dims that cannot be pruned:")
            lines += [f"  {name}[{dim}]: {reason}" for (name, dim), reason in sorted(interesting.items())]
        if self.constants:
            lines.append("tensors captured as constants (plain attributes, not parameters or buffers): "
                         f"{', '.join(self.constants)}. If forward computes one from parameters (a cache), the "
                         "graph does not see those parameters change; their dims are frozen when nothing else "
                         "reads them")
            for constant, unread in self.likely_caches().items():
                lines.append(f"  {constant} is probably a cache of {', '.join(unread)}: its module holds it and "
                             "parameters or buffers the graph never reads")
        return "\n".join(lines)

    def frozen_dims(self) -> dict[tuple[str, int], str]:
        """Frozen parameter dims worth a user's look: kernel and pooling-window dims are never channels."""
        return {k: v for k, v in self.blocked.items() if "kernel" not in v and "window" not in v}

    def graph(self):
        """The groups as a networkx graph over the layers (see :func:`fxprune.group_graph.groups_graph`)."""
        from fxprune.group_graph import groups_graph

        return groups_graph(self)

    def draw(self, path) -> None:
        """Draw the groups over the layers as ``.html``, ``.svg``, ``.png`` (matplotlib) or ``.dot``, by extension."""
        from fxprune.group_graph import draw_groups

        draw_groups(self, path)

    def likely_caches(self) -> dict[str, list[str]]:
        """Constant -> unread parameters of the same module: the pattern of a cache refreshed in eval()."""
        unread = sorted({name for (name, _), reason in self.blocked.items() if UNREAD in reason})
        out = {}
        for constant in self.constants:
            owner = constant.rpartition(".")[0]
            same = [p for p in unread if p.rpartition(".")[0] == owner]
            if same:
                out[constant] = same
        return out


def explain(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
            dynamic_shapes=None) -> Explanation:
    """Capture and group ``model`` (no pruning) and say what is prunable and why not.

    Inputs and dynamic dims are taken as by :func:`fxprune.compile` (by default the batch is dynamic).
    """
    gm = capture(model, example_inputs, example_kwargs, dynamic_shapes).graph_module
    grouping = group_channels(gm)
    owned = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    constants = sorted({n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users and n.target not in owned
                        and isinstance(operator.attrgetter(n.target)(gm), torch.Tensor)})
    layers = list(dict.fromkeys(layer_of(name) for name, _ in model.named_parameters()))
    out = Explanation(blocked=dict(grouping.blocked), groups=grouping.groups, constants=constants, layers=layers)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("val") is None:
            continue  # nodes that return nothing (shape asserts) couple no channels
        (out.ops_handled if lookup(node.target) else out.ops_blocking)[op_name(node.target)] += 1
    return out
