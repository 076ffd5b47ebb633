"""Choose how many and which channels each group keeps.

Local scope prunes every group to the target; global scope ranks all channels of
all groups together and gives the budget a capped group cannot take to the others,
so the overall target is met. ``round_to`` then moves each kept count to a multiple
the CPU kernels like; every group keeps at least one channel.
"""

from __future__ import annotations

import heapq
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
        counts = _allocate_global({g: np.sort(sc) for g, sc in scores.items()}, sizes, caps, counts, budget,
                                  round_to)
    return {g: sizes[g] - max(1, _round(sizes[g] - c, sizes[g], round_to)) for g, c in counts.items()}


def _allocate_global(sorted_scores, sizes, caps, counts, budget, round_to):
    """Hand out the budget in the cheapest chunks first.

    A chunk is the next channels a group can lose while its kept count stays a
    multiple of ``round_to`` (single channels when ``round_to`` is 1, or for groups no
    larger than it), scored by their mean. Rounding inside the allocation, not after
    it, keeps the total within half a chunk of the budget; a capped group's share
    goes to the others.
    """
    heap = []

    def push(g):
        n, c = sizes[g], counts[g]
        unit = 1 if n <= round_to else ((n - c) % round_to or round_to)
        if c + unit > caps[g] or (n > round_to and n - c - unit < round_to):
            return
        heapq.heappush(heap, (float(sorted_scores[g][c:c + unit].mean()), g, unit))

    for g in sorted_scores:
        push(g)
    while heap and budget > 0:
        _, g, unit = heapq.heappop(heap)
        if unit - budget > budget:  # overshooting by more than we would fall short: try smaller chunks
            continue
        counts[g] += unit
        budget -= unit
        push(g)
    return counts


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
