"""The op table: for each aten op, how its channel dims couple, how compaction rewrites it, its MACs.

Each op family module registers its ops with :func:`register`, so an op's three facts sit
side by side in one place. The group pass reads ``couple``, the compact pass ``rewrite``
(ops whose size arguments capture specialised), the MAC counter ``macs``. An op with no
entry freezes every dim it touches: unknown means frozen, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Node

__all__ = ["Op", "OPS", "LIBRARIES", "register", "apply_rule", "lookup", "op_name"]


@dataclass(frozen=True)
class Op:
    """What the passes know about one aten op."""

    couple: Callable  # (node, Couplings) -> None: emit edges between channel spaces, or freeze them
    rewrite: Callable | None = None  # (node, sizes) -> None: new size arguments after compaction
    macs: Callable | None = None  # (args, out) -> int: multiply-accumulates of one call
    family: str = ""  # the module that registered it


OPS: dict = {}

# the module that registers the custom ops of a namespace the table names (a .pt2 holding one loads only
# once that module is imported)
LIBRARIES = {"transformers": "transformers.integrations.moe"}


def register(*targets, rewrite: Callable | None = None, macs: Callable | None = None):
    """Decorate a coupling rule: ``targets`` get it, with their compaction rewrite and MAC count.

    A target is an op, or the name of a custom op that a library registers only once imported
    (``"transformers.grouped_mm_fallback.default"``), so the table does not import that library.
    """

    def add(couple):
        family = couple.__module__.rpartition(".")[2]
        for target in targets:
            if target in OPS:
                raise RuntimeError(f"{op_name(target)} is registered twice ({OPS[target].family} and {family})")
            OPS[target] = Op(couple, rewrite, macs, family)
        return couple

    return add


def lookup(target) -> Op | None:
    """The entry of an op, registered as the op itself or by its name."""
    entry = OPS.get(target)
    return entry if entry is not None or not isinstance(target, torch._ops.OpOverload) else OPS.get(str(target))


def apply_rule(node: Node, c) -> None:
    """Run the rule of one call_function node, or freeze what it touches if it has none."""
    c.node = node
    entry = lookup(node.target)
    if entry is not None:
        entry.couple(node, c)
    elif c.output_keys(node):
        c.freeze_all(node, f"no rule for {op_name(node.target)}")


def op_name(target) -> str:
    """``aten.conv2d.default`` for an aten op, the function's name otherwise."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))
