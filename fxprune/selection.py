"""Choose how many and which channels each group keeps.

Local scope prunes every group to the target; global scope ranks all channels of
all groups together and gives the budget a capped group cannot take to the others,
so the overall target is met. ``round_to`` then moves each kept count to a multiple
the CPU kernels like; every group keeps at least one channel.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["prune_counts", "choose_kept"]


def _cap(size: int, max_ratio: float) -> int:
    return min(int(math.floor(size * max_ratio + 1e-9)), size - 1)


def _round(kept: int, size: int, round_to: int) -> int:
    if round_to <= 1 or size <= round_to:
        return kept
    r = max(round_to, int(round(kept / round_to)) * round_to)
    return min(size, r)


def prune_counts(scores: dict[int, np.ndarray], target: float, scope: str = "global",
                 max_ratio: float = 0.98, min_ratio: float = 0.0, round_to: int = 1) -> dict[int, int]:
    """Number of channels to remove per group.

    Parameters
    ----------
    scores : group index -> per-channel score (lower is pruned first).
    target : fraction of all channels to remove.
    """
    sizes = {g: len(s) for g, s in scores.items()}
    caps = {g: _cap(n, max_ratio) for g, n in sizes.items()}
    floors = {g: min(int(math.ceil(n * min_ratio - 1e-9)), caps[g]) for g, n in sizes.items()}
    if scope == "local":
        counts = {g: min(max(int(math.floor(n * target + 1e-9)), floors[g]), caps[g]) for g, n in sizes.items()}
    else:
        budget = int(math.floor(sum(sizes.values()) * target + 1e-9))
        counts = dict(floors)
        budget -= sum(floors.values())
        order = sorted(((s, g, i) for g, sc in scores.items() for i, s in enumerate(np.sort(sc))),
                       key=lambda t: t[0])
        for _, g, i in order:
            if budget <= 0:
                break
            if i >= counts[g] and counts[g] < caps[g]:
                counts[g] += 1
                budget -= 1
    return {g: sizes[g] - max(1, _round(sizes[g] - c, sizes[g], round_to)) for g, c in counts.items()}


def choose_kept(scores: np.ndarray, n_prune: int, parts=()) -> np.ndarray:
    """Boolean keep mask: the ``n_prune`` lowest-scoring channels are removed (stable order).

    ``parts`` are channel sets that must not be emptied (e.g. one branch of a
    concat: a tensor with no channels left cannot run); each keeps its best channel.
    """
    keep = np.ones(len(scores), dtype=bool)
    if n_prune > 0:
        keep[np.argsort(scores, kind="stable")[:n_prune]] = False
    for part in parts:
        if not keep[part].any():
            keep[part[np.argmax(scores[part])]] = True
    return keep
