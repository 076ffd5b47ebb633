"""Channel importance of a group: its members' scores, normalised per member.

Each parameter member scores each group channel by the L1 or L2 norm of the slice
that channel owns; dividing by the member's mean puts a 3x3 conv and a BN scale on
one footing, so every member has an equal say and all lose the same channels.
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.errors import PruningError
from fxprune.passes.group import Group

__all__ = ["member_channel_scores", "group_scores"]


def member_channel_scores(tensor: torch.Tensor, atoms: np.ndarray, dim: int, size: int, p: str = "l2") -> np.ndarray:
    """Per group channel, the norm of ``tensor``'s slices along ``dim`` that belong to it."""
    t = tensor.detach().float().movedim(dim, 0).reshape(tensor.shape[dim], -1)
    per_index = (t.abs().sum(1) if p == "l1" else t.pow(2).sum(1)).cpu().numpy().astype(np.float64)
    valid = atoms >= 0
    per_channel = np.bincount(atoms[valid], weights=per_index[valid], minlength=size)
    return per_channel if p == "l1" else np.sqrt(per_channel)


def group_scores(group: Group, tensors: dict[str, torch.Tensor], p: str = "l2",
                 elementwise: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """Per channel, the mean over the parameter members that hold it of their normalised channel scores.

    A member is normalised by its mean over the channels it holds: one concatenated piece's conv holds only
    that piece, and a mean over the whole group (zeros elsewhere) would inflate narrow pieces and deflate
    wide ones, so a wide branch lost all its channels before any other group lost one.
    ``elementwise`` optionally gives per-element scores (e.g. |W*grad|) to use in
    place of the weights themselves; members without an entry fall back to |W|.
    """
    total, cover = np.zeros(group.size), np.zeros(group.size)
    for m in group.parameters:
        source = elementwise.get(m.name) if elementwise else None
        t = source if source is not None else tensors[m.name]
        s = member_channel_scores(t, m.atoms, m.dim, group.size, "l1" if source is not None else p)
        if not np.isfinite(s).all():
            raise PruningError(f"non-finite channel scores from {m.name} in {group.describe()}: "
                               "its weights (or gradients) hold NaN/inf")
        held = np.zeros(group.size, dtype=bool)
        held[m.atoms[m.atoms >= 0]] = True
        mean = s[held].mean() if held.any() else 0.0
        if np.isfinite(mean) and mean > 0:
            total[held] += s[held] / mean
            cover[held] += 1
    return total / np.maximum(cover, 1)
