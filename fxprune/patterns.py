"""Element masks for the mask-only patterns of INC's pruner: NxM blocks, N:M and pattern lock.

These patterns zero weights without removing channels, so they are masks, not
compaction. Everything works on a 2-D *block view* of a weight: Linear ``[out, in]``
as is, Conv ``[Co, Ci, *k]`` as ``[Co, prod(k) * Ci]`` with input channels varying
fastest, so an "in" block or an N:M group runs along input channels as sparse
kernels expect.

Differences from INC on purpose: global scope gives the budget a capped layer
cannot take to the other layers (INC undershoots the target), ties are broken by a
stable sort (deterministic), and N:M pattern lock is element-wise (INC's group-level
variant can unmask zeros). A layer whose block view is not divisible by the pattern
is left dense and kept out of the global pool, instead of failing or being padded.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = ["block_view", "unblock_view", "block_scores", "nxm_masks", "n_of_m_masks",
           "pattern_lock_masks", "check_masks"]

_EPS = 1e-9
_SCOPES = ("global", "local")
_KINDS = {"block": "block", "nxm": "block", "n:m": "n:m"}


def _floor(x: float) -> int:
    return int(math.floor(x + _EPS))  # 0.3 * 10 must be 3, not 2


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up: Python's round() is half-to-even


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name}: pattern pruning needs a weight of 2 or more dims, got shape "
                         f"{tuple(t.shape)} (biases and norms are not pattern-pruned)")
    return t


def _score2d(name: str, score) -> torch.Tensor:
    """|score| on the block view, in float64 so block means tie only when truly equal."""
    s = block_view(_check_tensor(name, score).detach()).abs().double()
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name}: scores contain NaN or inf")
    return s


def _check_nm(n: int, m: int) -> None:
    for label, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {v!r}")


def _check_common(sparsity: float, scope: str, max_ratio: float, min_ratio: float = 0.0) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    if not 0.0 <= max_ratio <= 1.0:
        raise ValueError(f"max_ratio must be in [0, 1], got {max_ratio!r}")
    if not 0.0 <= min_ratio <= max_ratio:
        raise ValueError(f"min_ratio must be in [0, max_ratio={max_ratio}], got {min_ratio!r}")


def _check_kind(kind: str, n: int, m: int) -> str:
    _check_nm(n, m)
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'block' (NxM) or 'n:m', got {kind!r}; channel patterns "
                         "are removed by compaction, not masked")
    kind = _KINDS[kind]
    if kind == "n:m" and n >= m:
        raise ValueError(f"N:M needs n < m, got {n}:{m}")
    return kind


def _blocks(x2d: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[rows, cols] -> [rows//n, n, cols//m, m]: block (i, j) is ``[i, :, j, :]``."""
    rows, cols = x2d.shape
    return x2d.reshape(rows // n, n, cols // m, m)


def _divisible(x2d: torch.Tensor, n: int, m: int) -> bool:
    return x2d.shape[0] % n == 0 and x2d.shape[1] % m == 0


def _expand(block_mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return block_mask.repeat_interleave(n, dim=0).repeat_interleave(m, dim=1)


def block_view(weight: torch.Tensor) -> torch.Tensor:
    """2-D view of a weight on which blocks and N:M groups are laid out.

    Parameters
    ----------
    weight : Linear ``[out, in]`` or Conv ``[Co, Ci, *k]`` tensor (or a mask/score of that shape).

    Returns
    -------
    ``[out, in]`` unchanged, or ``[Co, prod(k) * Ci]`` after permuting to ``[Co, *k, Ci]``, so
    input channels vary fastest (what channel-last sparse kernels group over).

    Raises
    ------
    ValueError
        For a tensor of fewer than 2 dims: biases are not pattern-pruned.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"block_view needs a tensor of 2 or more dims, got {shape}")
    if weight.dim() == 2:
        return weight
    perm = (0, *range(2, weight.dim()), 1)
    return weight.permute(perm).reshape(weight.shape[0], -1)


def unblock_view(mask2d: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`block_view`: put a 2-D mask back into the weight's ``shape``.

    Raises
    ------
    ValueError
        If ``shape`` has fewer than 2 dims or ``mask2d`` is not ``block_view``'s shape for it.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"unblock_view needs a shape of 2 or more dims, got {shape}")
    expected = (shape[0], math.prod(shape[1:]))
    if tuple(mask2d.shape) != expected:
        raise ValueError(f"mask of shape {tuple(mask2d.shape)} does not match the block view "
                         f"{expected} of a weight of shape {shape}")
    if len(shape) == 2:
        return mask2d
    co, ci, *k = shape
    perm = (0, len(shape) - 1, *range(1, len(shape) - 1))
    return mask2d.reshape(co, *k, ci).permute(perm).contiguous()


def block_scores(score2d: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mean ``|score|`` of each ``n`` (rows/out) x ``m`` (cols/in) block.

    Returns
    -------
    Tensor of shape ``[rows // n, cols // m]``.

    Raises
    ------
    ValueError
        If ``score2d`` is not 2-D or its shape is not divisible by ``(n, m)``.
    """
    _check_nm(n, m)
    if score2d.dim() != 2:
        raise ValueError(f"block_scores needs a 2-D tensor (see block_view), got {tuple(score2d.shape)}")
    if not _divisible(score2d, n, m):
        raise ValueError(f"shape {tuple(score2d.shape)} is not divisible by the {n}x{m} block")
    return _blocks(score2d.abs(), n, m).mean(dim=(1, 3))


def _allocate(pool: dict[str, torch.Tensor], frac: float, scope: str, caps: dict[str, int],
              floors: dict[str, int], to_int: Callable[[float], int]) -> dict[str, int]:
    """Units (blocks or groups) to prune per layer; global scope fills the budget lowest first.

    Floors are taken first; the rest of the budget goes to the lowest scores of all
    layers below their caps, so a capped layer's share moves to the others.
    """
    if scope == "local":
        return {k: min(max(to_int(frac * v.numel()), floors[k]), caps[k]) for k, v in pool.items()}
    names = list(pool)
    budget = to_int(frac * sum(v.numel() for v in pool.values())) - sum(floors.values())
    if budget <= 0 or not names:
        return dict(floors)
    # Each layer's candidates are its sorted scores between floor and cap; a stable sort of
    # the concatenation picks a prefix of every layer, ties going to the earlier layer/block.
    cands = [torch.sort(pool[k], stable=True).values[floors[k]:caps[k]] for k in names]
    owner = torch.cat([torch.full((c.numel(),), i, dtype=torch.long, device=c.device)
                       for i, c in enumerate(cands)])
    picked = torch.sort(torch.cat(cands), stable=True).indices[:budget]
    extra = torch.bincount(owner[picked], minlength=len(names))
    return {k: floors[k] + int(extra[i]) for i, k in enumerate(names)}


def _lowest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Bool per entry, True for the ``count`` lowest (stable order, as in :func:`_allocate`)."""
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    out[torch.sort(flat, stable=True).indices[:count]] = True
    return out


def nxm_masks(scores: dict[str, torch.Tensor], sparsity: float, n: int, m: int, *,
              scope: str = "global", max_ratio: float = 0.98,
              min_ratio: float = 0.0) -> dict[str, torch.Tensor]:
    """Masks pruning whole ``n`` (out) x ``m`` (in) blocks of the block view ("4x1", "1x1" ...).

    Parameters
    ----------
    scores : name -> per-element score of the weight's shape (higher = more important).
        Blocks are ranked by mean ``|score|``.
    sparsity : fraction of blocks to prune, in [0, 1).
    scope : "global" prunes exactly ``floor(sparsity * total_blocks)`` blocks pooled over all
        layers, lowest first, whenever the caps allow; "local" prunes
        ``floor(sparsity * blocks)`` in each layer.
    max_ratio, min_ratio : per layer, at most ``floor(max_ratio * blocks)`` and at least
        ``ceil(min_ratio * blocks)`` (clipped to the cap) blocks are pruned. The floors are
        honoured even when they add up to more than the global target.

    Returns
    -------
    name -> bool mask of the weight's shape, True = kept. A layer whose block view is not
    divisible by ``(n, m)`` stays dense and does not count towards ``total_blocks``.

    Raises
    ------
    ValueError
        On a bad ``sparsity``/``n``/``m``/``scope``/ratio, a score of < 2 dims or non-finite scores.
    """
    _check_nm(n, m)
    _check_common(sparsity, scope, max_ratio, min_ratio)
    pool, masks = {}, {}
    for name, s in scores.items():
        s2d = _score2d(name, s)
        if _divisible(s2d, n, m):
            pool[name] = block_scores(s2d, n, m)
        else:
            masks[name] = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    caps = {k: _floor(max_ratio * v.numel()) for k, v in pool.items()}
    floors = {k: min(int(math.ceil(min_ratio * v.numel() - _EPS)), caps[k]) for k, v in pool.items()}
    flat = {k: v.flatten() for k, v in pool.items()}
    counts = _allocate(flat, sparsity, scope, caps, floors, _floor)
    for name, bs in pool.items():
        keep = ~_lowest(flat[name], counts[name]).reshape(bs.shape)
        masks[name] = unblock_view(_expand(keep, n, m), scores[name].shape)
    return {k: masks[k] for k in scores}


def n_of_m_masks(scores: dict[str, torch.Tensor], sparsity: float, n: int, m: int, *,
                 scope: str = "global", max_ratio: float = 0.98) -> dict[str, torch.Tensor]:
    """N:M masks: in chosen groups of ``m`` consecutive inputs, the ``n`` lowest are zeroed.

    Groups run along the input dim of the block view (input channels for a conv). In
    each group the ``n`` lowest ``|score|`` (stable order) are candidates; the groups with
    the lowest candidate sum are pruned first, ``round(sparsity * m / n * total_groups)`` of
    them (half up), so at ``sparsity == n / m`` every group is exactly N:M.

    Parameters
    ----------
    scores : name -> per-element score of the weight's shape (higher = more important).
    sparsity : element sparsity over the pooled layers, in [0, n / m].
    scope : "global" pools the groups of all layers; "local" uses the count per layer.
    max_ratio : per layer, at most ``floor(max_ratio * m / n * groups)`` groups are pruned,
        i.e. an element sparsity cap; a capped layer's share goes to the others. A cap below
        ``n / m`` means not every group of that layer is N:M even at ``sparsity == n / m``.

    Returns
    -------
    name -> bool mask of the weight's shape, True = kept. Layers whose input dim (of the
    block view) is not divisible by ``m`` stay dense and are not pooled.

    Raises
    ------
    ValueError
        On ``n >= m``, ``sparsity > n / m`` or the errors of :func:`nxm_masks`.
    """
    _check_kind("n:m", n, m)
    _check_common(sparsity, scope, max_ratio)
    if sparsity > n / m + _EPS:
        raise ValueError(f"sparsity {sparsity} is above what {n}:{m} allows ({n / m})")
    cands, pool, masks = {}, {}, {}
    for name, s in scores.items():
        s2d = _score2d(name, s)
        if s2d.shape[1] % m:
            masks[name] = torch.ones(s.shape, dtype=torch.bool, device=s.device)
            continue
        groups = s2d.reshape(s2d.shape[0], -1, m)
        cands[name] = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
        pool[name] = groups.gather(-1, cands[name]).sum(-1).flatten()
    caps = {k: min(v.numel(), _floor(max_ratio * m / n * v.numel())) for k, v in pool.items()}
    counts = _allocate(pool, sparsity * m / n, scope, caps, dict.fromkeys(pool, 0), _round)
    for name, idx in cands.items():
        drop = torch.zeros(*idx.shape[:2], m, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
        drop &= _lowest(pool[name], counts[name]).reshape(*idx.shape[:2], 1)
        masks[name] = unblock_view((~drop).reshape(idx.shape[0], -1), scores[name].shape)
    return {k: masks[k] for k in scores}


def pattern_lock_masks(weights: dict[str, torch.Tensor], kind: str, n: int, m: int) -> dict[str, torch.Tensor]:
    """Masks that keep the zeros a model already has, so fine-tuning cannot regrow them.

    Parameters
    ----------
    weights : name -> weight (2 or more dims).
    kind : "block" (NxM; "nxm" also accepted) or "n:m", as in ``Pattern.kind``.

    Returns
    -------
    name -> bool mask, True = kept. "block": a block is kept iff it has any nonzero
    (``1x1`` gives ``W != 0``); a layer not divisible by ``(n, m)`` gets ``W != 0``, the only
    mask that keeps its zeros. "n:m": element-wise, masked iff ``W == 0`` (INC's group-level
    variant is not copied: it can unmask zeros of partly-zero groups).
    """
    kind = _check_kind(kind, n, m)
    out = {}
    for name, w in weights.items():
        nz = block_view(_check_tensor(name, w).detach()) != 0
        if kind == "block" and _divisible(nz, n, m):
            nz = _expand(_blocks(nz, n, m).any(dim=3).any(dim=1), n, m)
        out[name] = unblock_view(nz, w.shape)
    return out


def _first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def check_masks(masks: dict[str, torch.Tensor], kind: str, n: int, m: int, *, full: bool = False) -> None:
    """Raise unless every mask has the declared pattern (on its block view).

    Contract: "block" (NxM) -- every aligned ``n`` x ``m`` block is all kept or all pruned.
    "n:m" -- every group of ``m`` consecutive inputs has either no zero (not pruned) or at
    least ``n`` zeros; with ``full=True`` (a mask at sparsity ``n / m``) every group must have
    at least ``n``. Layers the pattern does not divide are not checked: the maskers leave them
    dense and :func:`pattern_lock_masks` copies their zeros element-wise.

    Raises
    ------
    ValueError
        Naming the first layer and block/group (block-view coordinates) that breaks the pattern,
        or a mask that is not a bool tensor of 2 or more dims.
    """
    kind = _check_kind(kind, n, m)
    for name, mask in masks.items():
        if _check_tensor(name, mask).dtype != torch.bool:
            raise ValueError(f"{name}: a mask must be a bool tensor, got {mask.dtype}")
        m2d = block_view(mask)
        if kind == "block" and _divisible(m2d, n, m):
            b = _blocks(m2d, n, m)
            bad = b.all(dim=3).all(dim=1) != b.any(dim=3).any(dim=1)
            if bad.any():
                raise ValueError(f"{name}: {n}x{m} block {_first_bad(bad)} is partly pruned")
        elif kind == "n:m" and m2d.shape[1] % m == 0:
            zeros = (~m2d).reshape(m2d.shape[0], -1, m).sum(-1)
            bad = (zeros < n) if full else (zeros > 0) & (zeros < n)
            if bad.any():
                raise ValueError(f"{name}: {n}:{m} group {_first_bad(bad)} has "
                                 f"{int(zeros[_first_bad(bad)])} zeros, needs {'' if full else '0 or '}>= {n}")
