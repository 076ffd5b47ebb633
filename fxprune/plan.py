"""Pruning plans and compact-model persistence.

A plan is the kept channels of every group, as small JSON. Re-applied to a freshly
built copy of the same model it reproduces the identical compact model; the group
layout is fingerprinted so a plan never lands on a different architecture.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re

import numpy as np
import torch

from fxprune.errors import PruningError
from fxprune.passes.ops.registry import LIBRARIES
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
    """Load a model saved by :func:`save_compact` as a callable module.

    Raises ``FileNotFoundError`` where there is no such file, and :class:`PruningError` where the file
    cannot be read as one (truncated, or another kind of file). torch logs such a failure as a
    traceback; that log is held back, and its first line goes into the error instead.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name} is a folder; pass the .pt2 file that fxprune.save_compact wrote")
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{name}: no such file; write one with fxprune.save_compact(model, path, "
                                "example_inputs)")
    for attempt in range(2):
        with _held_log("torch.export") as held:
            try:
                return torch.export.load(name).module()
            except Exception as err:
                cause = next((r.exc_info[1] for r in reversed(held.records) if r.exc_info), err)
                op = re.search(r"torch\.ops\.(\w+)\.(\w+)", str(cause))
                custom = op is not None and op.group(1) not in ("aten", "prims") and attempt == 0
                library = LIBRARIES.get(op.group(1)) if custom else None
                if library is not None:  # a library the graph's ops come from: import it and read again
                    try:
                        importlib.import_module(library)
                        continue
                    except ImportError:
                        pass
                if custom:
                    raise PruningError(f"{name} uses the custom op {op.group(0)}, which nothing imported in this "
                                       f"process defines: import {library or 'the library that defines it'} "
                                       "first, then load it again") from err
                raise PruningError(f"{name} cannot be loaded: truncated or not a .pt2 written by save_compact "
                                   f"({type(cause).__name__}: {_first_sentence(cause)}); save it again with "
                                   "fxprune.save_compact") from err


def _first_sentence(err: BaseException) -> str:
    """torch's reader errors run to several sentences of advice after the cause (and may open with
    ``[enforce fail at file.cc:N] .``): the cause alone."""
    text = re.sub(r"^\[enforce fail[^\]]*\]\s*\.?\s*", "", str(err).strip())
    return (text.splitlines() or [""])[0].split(". ")[0][:200]


class _held_log(logging.Handler):
    """Context manager: the records of logger ``name`` (and of its children that have no handler of their
    own) are kept here instead of going to its handlers."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_held_log":  # torch gives its loggers stderr handlers of their own: swap them out
        self.saved = self.logger.handlers[:], self.logger.propagate
        self.logger.handlers = [self]
        self.logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self.logger.handlers, self.logger.propagate = self.saved
