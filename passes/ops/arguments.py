"""Reading an aten node's arguments the way its schema defines them (positional or keyword)."""

from __future__ import annotations

from torch.fx import Node

__all__ = ["arg", "slice_bounds"]


def arg(node: Node, index: int, name: str, default=None):
    """Argument ``index`` of ``node``, passed positionally or as ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def slice_bounds(node: Node, size: int) -> tuple[int, int, int]:
    """(start, end, step) of an ``aten.slice`` over a dim of ``size``, clamped like Python slicing."""
    start = arg(node, 2, "start", None) or 0
    end = arg(node, 3, "end", None)
    step = arg(node, 4, "step", 1)
    start = start + size if start < 0 else min(start, size)
    end = size if end is None else (end + size if end < 0 else min(end, size))
    return start, end, step
