"""Choose how many and which channels each group keeps.

Local scope prunes every group to the target; global scope ranks all channels of
all groups together and gives the budget a capped group cannot take to the others,
so the overall target is met. ``round_to`` then moves each kept count to a multiple
the CPU kernels like; every group keeps at least one channel. With ``uniform_layers``
the groups that play one role in repeated blocks (layer 0's FFN, layer 1's FFN, ...)
are allocated as one, so they keep equal widths that one config value can describe.
"""

from __future__ import annotations

import heapq
import math
import re

import numpy as np

__all__ = ["prune_counts", "latency_counts", "choose_kept", "repeated_blocks", "uniform_counts", "aligned_round_to",
           "aligned_widths", "align_narrow", "unaligned_pieces", "ALIGN"]

# kept widths are aligned to this many elements under ``round_to: "auto"`` (the default): onnxruntime's CPU
# conv and GEMM kernels work on blocks of 8 floats (AVX2) or 16 (AVX-512). 16 serves both; on ResNet-50 it
# gave 0.92-1.01 of ideal where 8 gave 0.84-0.95 and no rounding 0.56-0.62 (benchmarks/results_defaults.md).
# Groups too narrow for 16 are aligned to 8: a conv whose input channels are not a multiple of the NCHWc block
# runs as a plain conv with layout reorders around it (MobileNetV2's 16-32-wide residual streams: 0.70 of
# ideal at 50% unaligned, 0.85 aligned to 8, 1 thread, AVX2). They keep at least 16 (aligned_widths): on
# AVX-512 the block is 16, onnxruntime pads a width of 24 or 40 to the next block but takes a conv reading
# fewer than 16 channels out of the layout (MobileNetV2 at 50%, 1 thread: 0.59 of ideal with 8-wide streams)
ALIGN = 16


def _steps(group) -> tuple[int, int]:
    """(channels per ``ALIGN`` elements of every member, channels per ``ALIGN // 2``): the alignment steps."""
    per = min((int(np.bincount(m.atoms[m.atoms >= 0]).max()) for m in group.parameters if (m.atoms >= 0).any()),
              default=1)
    return ALIGN // math.gcd(ALIGN, per), (ALIGN // 2) // math.gcd(ALIGN // 2, per)


def aligned_widths(group, narrow: bool = True) -> tuple[int, int]:
    """(:func:`aligned_round_to`, the fewest channels the group may keep) under ``round_to: "auto"``: a narrow
    group aligned to the half step (8 conv channels) keeps at least a whole step (16), a block on AVX2 and on
    AVX-512 alike; every other group at least 1."""
    step, half = _steps(group)
    if group.size >= 4 * step:
        return step, 1
    if narrow and group.size >= 2 * half:  # half: AVX2's NCHWc block
        return half, step if 1 < half < step else 1
    return 1, 1


def aligned_round_to(group, narrow: bool = True) -> int:
    """Channels to round a group's kept count to so every member keeps a multiple of ``ALIGN`` elements.

    A head of 64 elements is aligned whatever the count (1); a conv channel of one element needs
    multiples of 16. A group narrower than four such steps is aligned to 8 elements instead if it is at
    least two of those steps wide (16 to 63 conv channels) and ``narrow`` (a global budget, which takes up
    what the coarse rounding of a narrow group moves), and otherwise not rounded: a per-group target there
    could not be honoured (25% of 16 channels is 12 kept, 8 and 16 are the aligned choices).
    """
    return aligned_widths(group, narrow)[0]


def align_narrow(groups, shared_budget: bool) -> bool:
    """Whether ``round_to: "auto"`` aligns the narrow groups (16-63 conv channels) to 8: only under one shared
    budget, and only where they are at most a quarter of its channels, so the wide groups take up what their
    coarse rounding moves (a net made only of narrow groups keeps exact counts)."""
    if not shared_budget:
        return False
    total = sum(g.size for g in groups)
    narrow = sum(g.size for g in groups if aligned_round_to(g, False) == 1 < aligned_round_to(g, True))
    return narrow <= 0.25 * total


def _cap(size: int, max_ratio: float) -> int:
    return min(int(math.floor(size * max_ratio + 1e-9)), size - 1)


def _caps_and_floors(sizes: dict[int, int], max_ratio: float, min_ratio: float, min_kept: dict[int, int] | None
                     ) -> tuple[dict[int, int], dict[int, int]]:
    """Per group, the most and the fewest channels it may lose. ``min_ratio`` is asked for (the config's
    ``min_sparsity_ratio_per_op``) and ``min_kept`` is the default alignment's: where they conflict the user's
    request wins."""
    user = {g: _cap(n, max_ratio) for g, n in sizes.items()}
    floors = {g: min(int(math.ceil(n * min_ratio - 1e-9)), user[g]) for g, n in sizes.items()}
    caps = {g: max(floors[g], min(user[g], n - (min_kept or {}).get(g, 1))) for g, n in sizes.items()}
    return caps, floors


def _round(kept: int, size: int, round_to: int) -> int:
    if round_to <= 1 or size <= round_to:
        return kept
    r = max(round_to, int(round(kept / round_to)) * round_to)
    return min(size, r)


def prune_counts(scores: dict[int, np.ndarray], target: float, scope: str = "global",
                 max_ratio: float = 0.98, min_ratio: float = 0.0, round_to: int | dict[int, int] = 1,
                 copies: dict[int, int] | None = None, min_kept: dict[int, int] | None = None) -> dict[int, int]:
    """Number of channels to remove per group.

    Parameters
    ----------
    scores : group index -> per-channel score (lower is pruned first).
    target : fraction of all channels to remove.
    round_to : one multiple for every group, or one per group index.
    copies : group index -> how many groups it stands for (a class of repeated blocks,
        see :func:`uniform_counts`); each channel it removes counts that many times.
    min_kept : group index -> the fewest channels it may keep (default 1).
    """
    sizes = {g: len(s) for g, s in scores.items()}
    round_to = round_to if isinstance(round_to, dict) else {g: round_to for g in scores}
    weight = {g: (copies or {}).get(g, 1) for g in scores}
    caps, floors = _caps_and_floors(sizes, max_ratio, min_ratio, min_kept)
    if scope == "local":
        counts = {g: min(max(int(math.floor(n * target + 1e-9)), floors[g]), caps[g]) for g, n in sizes.items()}
    else:
        budget = int(math.floor(sum(sizes[g] * weight[g] for g in sizes) * target + 1e-9))
        counts = dict(floors)
        budget -= sum(floors[g] * weight[g] for g in floors)
        counts = _allocate_global({g: np.sort(sc) for g, sc in scores.items()}, sizes, caps, counts, budget,
                                  round_to, weight)
    return {g: sizes[g] - max(1, _round(sizes[g] - c, sizes[g], round_to[g])) for g, c in counts.items()}


def _allocate_global(sorted_scores, sizes, caps, counts, budget, round_to, weight):
    """Hand out the budget in the cheapest chunks first.

    A chunk is the next channels a group can lose while its kept count stays a
    multiple of ``round_to`` (single channels when ``round_to`` is 1, or for groups no
    larger than it), scored by their mean. Rounding inside the allocation, not after
    it, keeps the total within half a chunk of the budget; a capped group's share
    goes to the others.
    """
    heap = []

    def push(g):
        n, c, r = sizes[g], counts[g], round_to[g]
        unit = 1 if n <= r else ((n - c) % r or r)
        if c + unit > caps[g] or (n > r and n - c - unit < r):
            return
        heapq.heappush(heap, (float(sorted_scores[g][c:c + unit].mean()), g, unit))

    for g in sorted_scores:
        push(g)
    while heap and budget > 0:
        _, g, unit = heapq.heappop(heap)
        cost = unit * weight[g]
        if cost - budget > budget:  # overshooting by more than we would fall short: try smaller chunks
            continue
        counts[g] += unit
        budget -= cost
        push(g)
    return counts


def latency_counts(scores: dict[int, np.ndarray], latency, frac: np.ndarray, target_ms: float,
                   max_ratio: float = 0.98, min_ratio: float = 0.0, round_to: dict[int, int] | None = None,
                   min_kept: dict[int, int] | None = None) -> tuple[dict[int, int], float]:
    """Channels to remove per group so the predicted latency reaches ``target_ms``; and that prediction.

    Greedy on importance per millisecond (HALP's knapsack, relaxed): the next chunk removed
    is the one whose channels' summed score per predicted ms saved is lowest. A chunk keeps
    the group's width a multiple of its ``round_to``, so aligned widths are the only ones
    tried. Savings change as neighbouring groups shrink (a conv's time depends on its
    input and output widths), so a popped chunk is re-priced and put back if it got dearer
    (lazy greedy). ``frac`` is every group's current kept fraction; groups not in ``scores``
    stay as they are.

    The chunk that reaches the target may save far more than was left to save (an aligned chunk
    of an expensive layer is a large step on a small model), so two knapsack repairs follow: the
    plan is also finished without that chunk's group, and each plan spends the time it has left
    under the target restoring the removed chunks that buy back the most importance per ms. The
    plan that removes the least importance is returned.
    """
    sizes = {g: len(s) for g, s in scores.items()}
    round_to = round_to or {}
    caps, floor = _caps_and_floors(sizes, max_ratio, min_ratio, min_kept)
    sorted_scores = {g: np.sort(s) for g, s in scores.items()}

    def kept(g: int, count: int) -> float:
        return (sizes[g] - count) / sizes[g]

    def step(g: int) -> int:
        return 1 if sizes[g] <= round_to.get(g, 1) else round_to.get(g, 1)

    frac = frac.astype(float).copy()
    for g, c in floor.items():
        frac[g] = kept(g, c)

    def chunk(g, counts, frac):
        n, c, r = sizes[g], counts[g], step(g)
        unit = (n - c) % r or r
        if c + unit > caps[g] or (n > round_to.get(g, 1) and n - c - unit < r):
            return None
        saved = latency.delta(g, (n - c - unit) / n, frac)
        cost = float(sorted_scores[g][c:c + unit].sum())
        return cost / max(saved, 1e-9), unit, saved

    def greedy(counts, frac, predicted, banned=()):
        """Remove chunks until the prediction meets the target; the plan and the group of its last chunk."""
        counts, frac, last = dict(counts), frac.copy(), None
        heap = [(entry[0], g) for g in scores if g not in banned and (entry := chunk(g, counts, frac)) is not None]
        heapq.heapify(heap)
        while heap and predicted > target_ms:
            _, g = heapq.heappop(heap)
            entry = chunk(g, counts, frac)
            if entry is None:
                continue
            price, unit, saved = entry
            if heap and price > heap[0][0] * (1 + 1e-9):  # dearer now than the next: price it again later
                heapq.heappush(heap, (price, g))
                continue
            counts[g] += unit
            frac[g] = kept(g, counts[g])
            predicted -= saved
            last = g
            if predicted <= target_ms:  # the savings are summed at the line's slope: the prediction itself decides
                predicted = latency.predict(frac)
            if (entry := chunk(g, counts, frac)) is not None:
                heapq.heappush(heap, (entry[0], g))
        return counts, frac, predicted, last

    def restore(g, counts):
        """The count of group ``g`` before its last chunk (None if nothing of it can be given back)."""
        c = counts[g]
        return None if c <= floor[g] else max(floor[g], c - step(g))

    def fill(counts, frac, predicted):
        """Give back, while the prediction stays within the target, the chunk with the most importance per ms."""
        counts, frac = dict(counts), frac.copy()
        while True:
            best = None
            for g in scores:
                back = restore(g, counts)
                if back is None:
                    continue
                trial = frac.copy()
                trial[g] = kept(g, back)
                ms = latency.predict(trial)
                if ms > target_ms:
                    continue
                value = float(sorted_scores[g][back:counts[g]].sum()) / max(ms - predicted, 1e-9)
                if best is None or value > best[0]:
                    best = (value, g, back, trial, ms)
            if best is None:
                return counts, frac, predicted
            _, g, counts[g], frac, predicted = best

    def removed(counts) -> float:
        return sum(float(sorted_scores[g][:c].sum()) for g, c in counts.items())

    counts, frac, predicted, last = greedy(floor, frac, latency.predict(frac))
    if predicted > target_ms or last is None:
        return counts, predicted
    plans = [fill(counts, frac, predicted)]
    before = dict(counts)
    before[last] = restore(last, counts)
    frac_before = frac.copy()
    frac_before[last] = kept(last, before[last])
    other = greedy(before, frac_before, latency.predict(frac_before), banned={last})
    if other[2] <= target_ms:
        plans.append(fill(*other[:3]))
    counts, _, predicted = min(plans, key=lambda plan: removed(plan[0]))
    return counts, predicted


def repeated_blocks(groups) -> list[list[int]]:
    """Group indices by role: groups whose members are the same parameters of different repeated blocks
    (names equal once the block indices of ``ModuleList``/``Sequential`` paths are blanked) and whose sizes match."""
    classes: dict = {}
    for g in groups:
        role = (g.size, tuple(sorted((re.sub(r"(?<=\.)\d+(?=\.)", "#", m.name), m.dim) for m in g.parameters)))
        classes.setdefault(role, []).append(g.index)
    return list(classes.values())


def uniform_counts(scores: dict[int, np.ndarray], classes: list[list[int]], **kwargs) -> dict[int, int]:
    """:func:`prune_counts` with each class of repeated groups allocated as one: the class's score for its
    k-th cheapest channel is the mean of its groups' k-th cheapest, and every group of it removes the same count."""
    merged = {c[0]: np.mean([np.sort(scores[g]) for g in c], axis=0) for c in classes}
    counts = prune_counts(merged, copies={c[0]: len(c) for c in classes}, **kwargs)
    return {g: counts[c[0]] for c in classes for g in c}


def choose_kept(scores: np.ndarray, n_prune: int, parts=(), align: int = 1) -> np.ndarray:
    """Boolean keep mask: the ``n_prune`` lowest-scoring channels are removed (stable order).

    ``parts`` are channel sets that must not be emptied (e.g. one branch of a
    concat: a tensor with no channels left cannot run); each keeps its best channel.
    With ``align`` > 1 and parts, every concatenated piece keeps a multiple of ``align`` channels
    (:func:`_aligned_pieces`): an aligned total made of unaligned pieces still breaks the layout.
    """
    if align > 1 and len(parts) and n_prune > 0:
        return _aligned_pieces(np.asarray(scores, dtype=float), n_prune, parts, align)
    keep = np.ones(len(scores), dtype=bool)
    if n_prune > 0:
        keep[np.argsort(scores, kind="stable")[:n_prune]] = False
    for part in parts:
        if not keep[part].any():
            keep[part[np.argmax(scores[part])]] = True
    return keep


def _pieces(n: int, parts) -> list[np.ndarray]:
    """The cells ``parts`` cut ``n`` channels into (channels in the same parts: one concatenated input)."""
    member = np.zeros((n, len(parts)), dtype=bool)
    for j, part in enumerate(parts):
        member[part, j] = True
    _, cell_of = np.unique(member, axis=0, return_inverse=True)
    return [np.flatnonzero(cell_of.ravel() == c) for c in range(cell_of.max() + 1)]


def unaligned_pieces(keep: np.ndarray, parts, align: int) -> int:
    """How many concatenated pieces of a group keep a width that is not a multiple of ``align``."""
    if align <= 1 or not len(parts):
        return 0
    return sum(int(keep[c].sum()) % align != 0 for c in _pieces(len(keep), parts) if len(c) % align == 0)


def _aligned_pieces(scores: np.ndarray, n_prune: int, parts, align: int) -> np.ndarray:
    """Keep mask that removes ``n_prune`` channels, in whole ``align``-wide chunks of each piece where it can.

    The pieces are the cells the parts cut the group into (channels in the same parts: one concatenated
    input, such as a DenseNet layer's growth channels). onnxruntime concatenates and convolves in its NCHWc
    layout only when every piece is a multiple of its block; otherwise the whole chain falls back to plain
    convs with layout conversions around them. Each piece loses its lowest-scoring chunks, cheapest mean score
    first, and keeps at least one chunk; a piece not a multiple of ``align`` is cut channel by channel. What
    whole chunks cannot take (pieces one chunk wide, a count left narrower than a chunk) is then cut channel
    by channel from the one piece that gives it cheapest, or where no piece can, lowest scores first with
    each piece keeping its best channel: the target is met, and the pruner reports the pieces left unaligned.
    """
    n = len(scores)
    cells = _pieces(n, parts)
    order = [cell[np.argsort(scores[cell], kind="stable")] for cell in cells]
    step = [align if len(c) % align == 0 else 1 for c in cells]
    cut = [0] * len(cells)
    heap = [(float(scores[o[:st]].mean()), i) for i, (o, st) in enumerate(zip(order, step)) if len(o) > st]
    heapq.heapify(heap)
    removed = 0
    while heap and removed < n_prune:
        _, i = heapq.heappop(heap)
        if removed + step[i] > n_prune:
            continue  # this piece's chunk does not fit what is left; a narrower one may
        cut[i] += step[i]
        removed += step[i]
        if len(order[i]) - cut[i] > step[i]:
            heapq.heappush(heap, (float(scores[order[i][cut[i]:cut[i] + step[i]]].mean()), i))
    keep = np.ones(n, dtype=bool)
    for o, c in zip(order, cut):
        keep[o[:c]] = False
    left = n_prune - removed
    if left > 0:  # channel by channel: from one piece where one can give them all (one piece unaligned), else
        # the lowest scores anywhere; each piece keeps its best channel
        fits = [(float(scores[o[c:c + left]].sum()), i) for i, (o, c) in enumerate(zip(order, cut)) if len(o) - c > left]
        if fits:
            i = min(fits)[1]
            keep[order[i][cut[i]:cut[i] + left]] = False
        else:
            rest = np.concatenate([o[c:-1] for o, c in zip(order, cut)])
            keep[rest[np.argsort(scores[rest], kind="stable")][:left]] = False
    return keep
