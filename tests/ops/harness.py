"""Op cases: each registered op runs inside a small block, and its three facts are checked.

A family's cases are blocks of one model (captured, pruned and compacted once, so the
family costs one capture). For every case the test finds the op's node in the captured
graph (inside that block), then checks

* the coupling rule: the node's channel dim (``dim``) is in a group whose channels were
  pruned, or, for a dim frozen by design, the reason given;
* the MAC count: the op's MACs at the example equal the hand count in the case;
* the rewrite: the node's size arguments changed in the compact graph;

and, per family, that the compact graph equals the masked model on an input it was not
checked on (another batch size), in float64 to 1e-9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.passes.couplings import value_key
from fxprune.passes.macs import macs_by_node
from fxprune.passes.ops import OPS, op_name

__all__ = ["Case", "Family", "Block"]


@dataclass
class Case:
    """One op in a block: ``block`` maps the family input to a tensor that reaches the output.

    ``dim``: the op output's dim (or ``(output index, dim)`` of a multi-output op) that carries
    pruned channels; ``frozen``: instead, a substring of the reason the dim is frozen;
    ``macs``: the op's multiply-accumulates at the example input, counted by hand;
    ``nth``: which call of the op in the block is the case (0: the first);
    ``rewrites``: the compact graph must have changed the node's size arguments (for an op
    with a rewrite; False where this case's arguments need none, as a conv with groups=1);
    ``on_input``: ``dim`` is a dim of the op's first argument (an op whose output has none).
    """

    target: object
    block: Callable[[], nn.Module]
    dim: int | tuple | None = -1
    frozen: str | None = None
    macs: int | None = None
    nth: int = 0
    rewrites: bool = True
    on_input: bool = False

    @property
    def id(self) -> str:
        return str(self.target) if not callable(getattr(self.target, "__name__", None)) else self.target.__name__


class Block(nn.Module):
    """``fn(self, x)`` as a module, with named sub-layers (a producer and a consumer, say)."""

    def __init__(self, fn, **layers):
        super().__init__()
        self.fn = fn
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        return self.fn(self, x)


class _Model(nn.Module):
    def __init__(self, cases):
        super().__init__()
        self.cases = nn.ModuleList(c.block() for c in cases)

    def forward(self, x):
        return torch.cat([b(x).flatten(1) for b in self.cases], 1)


class Family:
    """Every case of one op family, built into one model and run through compile/prune/compact once."""

    def __init__(self, cases: list[Case], example: Callable[[int], torch.Tensor], config: dict | None = None):
        self.cases, self.example, self.config = cases, example, config or {}
        self._done = None

    def run(self):
        if isinstance(self._done, BaseException):
            raise self._done
        if self._done is None:
            try:
                self._done = self._compile()
            except BaseException as err:
                self._done = err
                raise
        return self._done

    def _compile(self):
        torch.manual_seed(0)
        model = _Model(self.cases).double().eval()
        x = self.example(2)
        x = x.double() if x.is_floating_point() else x
        cfg = {"target_sparsity": 0.5, "pruning_scope": "local", **self.config}
        pruning = fxprune.compile(model, (x,), cfg)
        pruning.prune()
        compact = pruning.compact(atol=1e-9)
        return pruning, compact

    def node(self, index: int):
        """The captured node of case ``index``'s op (the first inside its block)."""
        pruning, _ = self.run()
        case = self.cases[index]
        found = []
        for node in pruning.captured.graph_module.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            paths = [p for p, _ in stack.values()]
            named = node.target == case.target or op_name(node.target) == case.target  # a custom op registered by name
            if node.op == "call_function" and named and f"cases.{index}" in paths:
                found.append(node)
        if len(found) > case.nth:
            return found[case.nth]
        raise AssertionError(f"{self.cases[index].id} is not in the captured graph of its block; ops there: "
                             f"{sorted({str(n.target) for n in pruning.captured.graph_module.graph.nodes if n.op == 'call_function'})}")

    def check(self, index: int) -> None:
        case = self.cases[index]
        pruning, compact = self.run()
        node = self.node(index)
        grouping = pruning.grouping
        if case.dim is not None:
            out, dim = case.dim if isinstance(case.dim, tuple) else (None, case.dim)
            value = node.args[0] if case.on_input else node
            key = value_key(value) if out is None else f"{value.name}#{out}"
            dim %= len(grouping.shapes[key])
            if case.frozen is not None:
                reason = grouping.frozen.get((key, dim), "")
                assert case.frozen in reason, f"{case.id}: dim {dim} frozen for {reason!r}, expected {case.frozen!r}"
            else:
                atoms = grouping.space_atoms.get((key, dim))
                assert atoms is not None and (atoms >= 0).any(), (
                    f"{case.id}: dim {dim} of its output is not prunable: "
                    f"{grouping.frozen.get((key, dim), 'not in any group')}")
                want = compact.meta["fxprune_expected_shapes"][key][dim]
                assert want is not None and want < grouping.shapes[key][dim], (
                    f"{case.id}: its channels were not pruned ({grouping.shapes[key][dim]} -> {want})")
        entry = OPS[case.target]
        if entry.macs is not None:
            assert case.macs is not None, f"{case.id} has a MAC count, so its case must give the expected MACs"
            assert macs_by_node(pruning.captured.graph_module, pruning.example_inputs).get(node.name, 0) == case.macs
        if entry.rewrite is not None and case.rewrites:
            new = next((n for n in compact.graph.nodes if n.name == node.name), None)
            before, after = repr((node.target, node.args, node.kwargs)), new and repr((new.target, new.args, new.kwargs))
            assert new is None or after != before, (
                f"{case.id}: the compact graph kept its size arguments {node.args}")

    def tests(self):
        """The family's two test functions, for its test module to bind: ``test_op, test_compact_equals_masked``."""

        @pytest.mark.parametrize("index", range(len(self.cases)), ids=[f"{c.id}-{i}" for i, c in enumerate(self.cases)])
        def test_op(index):
            self.check(index)

        def test_compact_equals_masked():
            self.check_exact()

        return test_op, test_compact_equals_masked

    def check_exact(self) -> None:
        """compact == masked on a batch the compact pass never checked, in float64."""
        pruning, compact = self.run()
        x = self.example(3)
        x = x.double() if x.is_floating_point() else x
        with torch.no_grad():
            want = pruning.model.eval()(x)
            got = compact(x)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
