"""Pruning plans and compact-model persistence.

A plan is the kept channels of every group, as small JSON. Re-applied to a freshly
built copy of the same model it reproduces the identical compact model; the group
layout is fingerprinted so a plan never lands on a different architecture.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from fxprune.errors import PruningError
from fxprune.passes.shapes import export_program

__all__ = ["plan_of", "save_plan", "load_plan", "apply_plan", "save_compact", "load_compact"]

PLAN_VERSION = 1


def _fingerprint(groups) -> list:
    return [[g.size, sorted(f"{m.name}:{m.dim}" for m in g.parameters)] for g in groups]


def plan_of(pruning) -> dict:
    """The kept channel indices of every group, with a fingerprint of the group layout."""
    return {"version": PLAN_VERSION,
            "groups": [{"index": g.index, "size": g.size, "members": sorted(f"{m.name}:{m.dim}" for m in g.parameters),
                        "kept": pruning.kept_channels[g.index].tolist()} for g in pruning.groups]}


def save_plan(pruning, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(plan_of(pruning), f, indent=1)


def load_plan(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise PruningError(f"{path} is not a plan: not JSON ({err})") from err


def apply_plan(pruning, plan: dict) -> None:
    """Set ``pruning``'s kept channels from ``plan``; the group layout must match exactly."""
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        version = plan.get("version") if isinstance(plan, dict) else None
        raise PruningError(f"plan version {version!r} is not supported (expected {PLAN_VERSION})")
    entries = plan.get("groups")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"size", "members", "kept"} <= set(e)
                                                for e in entries):
        raise PruningError("the plan is malformed: 'groups' must be a list of {size, members, kept} entries, as "
                           "save_plan writes them")
    mine = _fingerprint(pruning.groups)
    theirs = [[e["size"], e["members"]] for e in entries]
    if mine != theirs:
        diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise PruningError(f"the plan was made for a different model: its group {diff} does not match this model's "
                           f"({len(theirs)} groups in the plan, {len(mine)} here)")
    kept = {}
    for g, e in zip(pruning.groups, entries):
        idx = e["kept"]
        ok = isinstance(idx, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
        if not ok or idx != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < g.size):
            raise PruningError(f"plan group {g.index}: 'kept' must be sorted, unique integer channel indices in "
                               f"[0, {g.size}), got {str(idx)[:80]}")
        mask = np.zeros(g.size, dtype=bool)
        mask[np.asarray(idx, dtype=np.int64)] = True
        kept[g.index] = mask
    pruning.set_kept(kept)


def save_compact(module: torch.nn.Module, path: str | os.PathLike, example_inputs: tuple,
                 example_kwargs: dict | None = None, *, dynamic_shapes=None) -> None:
    """Save a compact model as a torch.export ``.pt2``: it reloads without the original class.

    The dims that capture made dynamic (by default the batch) stay dynamic in the file;
    ``dynamic_shapes`` (torch.export's form) overrides that.
    """
    torch.export.save(export_program(module, example_inputs, example_kwargs, dynamic_shapes), path)


def load_compact(path: str | os.PathLike) -> torch.nn.Module:
    """Load a model saved by :func:`save_compact` as a callable module."""
    return torch.export.load(path).module()
