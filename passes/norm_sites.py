"""Which modules can compute their statistics over kept channels only: found from the graph's structure.

A reduction over a channel dim (LayerNorm's mean and variance, RMSNorm's mean square,
a global response norm's channel mean) makes removing a channel inexact: the masked
model would still count it. :mod:`fxprune.norms` makes it exact by running the module
on the kept channels alone and writing zeros elsewhere, which is what the compact model
computes. That is the same computation at a smaller width exactly when the module

* has no submodules (its whole computation is in the graph nodes of its own forward), and
* takes one tensor and returns one tensor at each call,

so that restricting its one input (and its own parameters) to kept channels restricts
every op inside. Its output either holds the same channels (a norm: the removed ones are
written back as zeros) or others (a weight-standardised conv). Nothing is
matched by class name: ``nn.LayerNorm``, ``nn.RMSNorm``, a Hugging Face ``LlamaRMSNorm``
or a hand-written norm qualify alike, and the compact model is still checked against the
masked one.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from fxprune.passes.couplings import nodes_in

__all__ = ["statistics_modules"]

aten = torch.ops.aten


_NO_OP = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
          aten.detach.default, aten.clone.default, aten.contiguous.default}


def _is_input_alias(node: Node, inputs: set) -> bool:
    """``x.to(float32)`` of an input already in float32 is the input itself: the caller's later uses
    of ``x`` (a residual) are recorded on this node, but they read the input, not the module's output."""
    return node.target in _NO_OP and node.args[0] in inputs


def statistics_modules(gm: GraphModule, shapes: dict) -> set[str]:
    """Paths of the modules that may be restricted to kept channels (see the module docstring)."""
    members: dict[str, set[Node]] = defaultdict(set)
    parents: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        stack = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if stack and stack[-1]:
            members[stack[-1]].add(node)
            parents.update(stack[:-1])
    found = set()
    for path, nodes in members.items():
        if path in parents:
            continue
        inputs = {a for n in nodes for a in nodes_in(n.args, n.kwargs)
                  if a not in nodes and a.op != "get_attr" and a.name in shapes}
        outputs = [n for n in nodes if n.name in shapes and any(u not in nodes for u in n.users)
                   and not _is_input_alias(n, inputs)]
        if inputs and len(inputs) == len(outputs):
            found.add(path)
    return found
