"""Count multiply-accumulates and parameters by running the graph once.

MACs are counted for the ops that dominate inference cost (convolution, linear,
matmul, attention), by the count each op family registers (:mod:`fxprune.passes.ops`);
element-wise ops are not counted. Counting from a real run of
the graph keeps the dense and the compact model measured the same way.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from fxprune.passes.ops import lookup

__all__ = ["count_macs", "macs_by_node", "count_params"]


def _macs(target, args, out) -> int:
    entry = lookup(target)
    return entry.macs(args, out) if entry is not None and entry.macs is not None else 0


class _Counter(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.by_node: dict[str, int] = {}

    def run_node(self, n):
        self._node = n.name
        return super().run_node(n)

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        macs = _region_macs(args) if isinstance(target, torch._ops.HigherOrderOperator) else _macs(target, args, out)
        if macs:
            self.by_node[self._node] = macs
        return out


def _region_macs(args) -> int:
    """A region the graph calls as a submodule (``torch.autocast(enabled=False)`` blocks): its own count."""
    sub = next((a for a in args if isinstance(a, torch.fx.GraphModule)), None)
    if sub is None:
        return 0
    counter = _Counter(sub)
    with torch.no_grad():
        counter.run(*args[args.index(sub) + 1:])
    return sum(counter.by_node.values())


def count_macs(gm: torch.fx.GraphModule, example_inputs: tuple) -> int:
    """MACs of one forward of a captured or compacted graph module on ``example_inputs``."""
    return sum(macs_by_node(gm, example_inputs).values())


def macs_by_node(gm: torch.fx.GraphModule, example_inputs: tuple) -> dict[str, int]:
    """MACs of one forward per graph node (the nodes that have any), by node name."""
    counter = _Counter(gm)
    with torch.no_grad():
        counter.run(*pytree.tree_leaves(example_inputs))
    return counter.by_node


def count_params(module: torch.nn.Module) -> int:
    """Number of parameter elements (tied parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
