"""The masked model while it is pruned: kept channels, masks, and the steps that change them.

The kept channels per group are the one source of truth; the per-parameter masks are
rebuilt from them (and from any NxM / N:M element masks) whenever they change, so the
masks, the norm switch (:mod:`fxprune.norms`) and each pruner's view always agree. The
training-loop hooks live here because all they do is move that state: prune on the
schedule's steps, keep gradients and weights of pruned channels at zero.
"""

from __future__ import annotations

import itertools
import numbers
import types
from typing import TYPE_CHECKING

import numpy as np
import torch

from fxprune.errors import ConfigError, PruningError
from fxprune.latency import LATENCY_OVERSHOOT, LATENCY_RECHECK, LATENCY_TOLERANCE, LatencyModel, setting
from fxprune.norms import sync_norms
from fxprune.passes.compact import space_keep
from fxprune.pruners import Pruner

if TYPE_CHECKING:
    from fxprune.api import Pruning

__all__ = ["Masking"]


def _joint_key(pruner: Pruner) -> tuple[str, str] | None:
    """What pruners that step together must share (their compensation); None: this one steps alone (no
    compensation, an element pattern, a latency target that measures its own plan, its own after_select)."""
    cfg = pruner.config
    if (not pruner.pattern.is_channel or cfg.compensation == "none" or pruner.latency is not None
            or type(pruner).after_select is not Pruner.after_select):
        return None
    return cfg.compensation, cfg.compensation_inputs


class Masking:
    """Mask state and the hooks that move it; a part of :class:`fxprune.Pruning`.

    Reads ``model``, ``groups``, ``grouping``, ``pruners`` and ``_claimed`` (the groups the
    pruners own) from the object it is part of; :meth:`_init_masks` sets up the rest.
    """

    def _init_masks(self) -> None:
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._kept = {g.index: np.ones(g.size, dtype=bool) for g in self.groups}
        self.masks: dict[str, torch.Tensor] = {}
        self._pruned: dict[str, torch.Tensor] = {}
        self._element_masks: dict[str, torch.Tensor] = {}
        self.global_step = 0
        self._training = False
        self.latency_checks: list[dict] = []  # measured compact latency after each latency-target pruning step
        for pruner in self.pruners:
            if pruner.config.latency_target:
                cfg = pruner.config
                pruner.latency = LatencyModel(self, cfg.latency_threads, cfg.latency_batch, cfg.latency_cache,
                                              groups=[g.index for g in pruner.groups],
                                              target_speedup=cfg.target_speedup, target_ms=cfg.target_latency_ms,
                                              round_to=cfg.round_to)
                pruner.kept_fraction = lambda: np.array([k.mean() for k in self._kept.values()])

    # -- kept channels and masks ----------------------------------------------------------
    @property
    def kept_channels(self) -> dict[int, np.ndarray]:
        """Group index -> indices of the channels kept."""
        return {g: np.flatnonzero(k) for g, k in self._kept.items()}

    def set_kept(self, kept: dict[int, np.ndarray]) -> None:
        """Replace the kept channels of some groups (boolean masks) and re-mask the model."""
        self._check_kept(kept)
        self._apply_kept(kept)

    def _apply_kept(self, kept: dict[int, np.ndarray]) -> None:
        for g, mask in kept.items():
            self._kept[g] = np.asarray(mask, dtype=bool).copy()
        self._build_masks()
        self.apply_masks()

    def _check_kept(self, kept: dict[int, np.ndarray]) -> None:
        """Refuse keep masks of the wrong shape or that empty a group or a concatenated piece."""
        for g, mask in kept.items():
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != self._kept[g].shape:
                raise PruningError(f"group {g} has {self._kept[g].size} channels, got a mask of shape {mask.shape}")
            if not mask.any():
                raise PruningError(f"{self.groups[g].describe()} would lose all its channels; keep at least one")
            for part in self.groups[g].parts:
                if not mask[part].any():
                    raise PruningError(f"{self.groups[g].describe()}: channels {part.tolist()} form one tensor "
                                       "(e.g. a concat branch) and would all be removed; keep at least one")

    def _build_masks(self) -> None:
        masks: dict[str, torch.Tensor] = {}
        for g in self.groups:
            keep = self._kept[g.index]
            if keep.all():
                continue
            for m in g.parameters:
                p = self._params.get(m.name)
                if p is None:
                    continue
                along = torch.from_numpy(np.where(m.atoms >= 0, keep[np.maximum(m.atoms, 0)], True))
                shape = [1] * p.dim()
                shape[m.dim] = -1
                mask = along.view(shape).expand_as(p)
                masks[m.name] = mask if m.name not in masks else masks[m.name] & mask
        for name, mask in self._element_masks.items():
            masks[name] = mask if name not in masks else masks[name] & mask
        self.masks = {k: v.contiguous().to(self._params[k].device) for k, v in masks.items()}
        # masked_fill_ with a stored inverse is ~2.7x faster than mul_ by a bool mask (no float copy of
        # the mask per call) and leaves pruned weights exactly zero even if they went NaN
        self._pruned = {k: ~v for k, v in self.masks.items()}
        for pruner in self.pruners:
            pruner.masks = {k: self.masks.get(k, torch.ones_like(v, dtype=torch.bool)) for k, v in pruner.modules.items()}
        if any(g.normalized for g in self.groups):
            sync_norms(self.model, self.grouping, space_keep(self.grouping, self._atom_kept()))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned channels of every member parameter."""
        for name, pruned in self._pruned.items():
            self._params[name].masked_fill_(pruned, 0)

    @property
    def sparsity(self) -> float:
        """Fraction of channels removed, over the groups the pruners work on and any group pruned by hand."""
        kept = [k for g, k in self._kept.items() if g in self._claimed or not k.all()]
        total = sum(k.size for k in kept)
        return float(sum((~k).sum() for k in kept) / total) if total else 0.0

    @property
    def weight_sparsity(self) -> float:
        """Fraction of zeroed elements over the masked parameters (what NxM / N:M patterns are measured by)."""
        total = sum(self._params[k].numel() for k in self.masks)
        return float(sum((~m).sum() for m in self.masks.values()) / total) if total else 0.0

    def _atom_kept(self, group_kept: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Per atom, whether it is kept: under the current masks, or under ``group_kept`` (group -> bool mask)."""
        group_kept = self._kept if group_kept is None else group_kept
        kept = np.ones(len(self.grouping.atom_group), dtype=bool)
        valid = self.grouping.atom_group >= 0
        idx = np.flatnonzero(valid)
        kept[idx] = [group_kept[g][c] for g, c in zip(self.grouping.atom_group[idx], self.grouping.atom_local[idx])]
        return kept

    # -- pruning steps --------------------------------------------------------------------
    def prune(self, sparsity: float | None = None) -> "Pruning":
        """One-shot pruning: every pruner prunes up to its target now (or to ``sparsity``, in [0, 1))."""
        if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real)
                                     or not 0.0 <= sparsity < 1.0):
            raise ValueError(f"prune(sparsity) takes a number in [0, 1), got {sparsity!r}; 0.5 removes half "
                             "the channels")
        if sparsity is not None and any(p.config.latency_target for p in self.pruners):
            raise ConfigError("this config prunes to a latency target (target_speedup / target_latency_ms): call "
                              "prune() without a sparsity, or drop the latency target to prune to one")
        self._step_pruners(self.pruners, lambda p: p.target_sparsity_ratio if sparsity is None else sparsity)
        return self

    def _step_pruners(self, pruners: list[Pruner], target_of) -> None:
        """Run one pruning step of ``pruners`` (``target_of(pruner)``: its sparsity now, read after its
        ``prepare``). Consecutive channel pruners that compensate alike step together (see
        :meth:`_step_jointly`); the others one after another, each seeing what the ones before it pruned."""
        # a pruner that steps alone is a run of its own (its id), never joined to a neighbour
        for _, run in itertools.groupby(pruners, key=lambda p: _joint_key(p) or id(p)):
            batch = list(run)
            for pruner in batch:
                pruner.prepare()
            if len(batch) == 1:
                self._step_pruner(batch[0], target_of(batch[0]))
            else:
                self._step_jointly(batch, [target_of(p) for p in batch])

    def _step_jointly(self, pruners: list[Pruner], targets: list[float]) -> None:
        """One step of pruners that compensate alike, as one pruner over all their groups would take it: each
        selects on the model as the step finds it, then one compensation re-fits every layer they change
        (under ``compensation_inputs: pruned`` in one sequence of waves, each layer on the inputs all the
        step's pruning leaves it), then the masks. Stepped one after another, each pruner's fit would see
        the layers of the later ones still dense."""
        kept: dict[int, np.ndarray] = {}
        for pruner, target in zip(pruners, targets):
            chosen = pruner.select(target)
            self._check_kept(chosen)
            kept.update(chosen)
        self.compensate(pruners, kept)
        self._apply_kept(kept)
        for pruner, target in zip(pruners, targets):
            pruner.current_sparsity_ratio = target
            pruner.on_pruning_step()

    def _step_pruner(self, pruner: Pruner, target: float) -> None:
        checked = pruner.latency is not None and target == pruner.scheduler.target and pruner.config.latency_verify
        unmasked = None
        if pruner.pattern.is_channel:
            kept = pruner.select(target)
            self._check_kept(kept)  # before compensation edits any weight
            pruner.after_select(self, kept)
            if checked:  # a later plan of the check may keep what this one zeroes
                unmasked = self._member_copies(pruner)
            self._apply_kept(kept)
        else:
            self._element_masks.update({k: v.to(torch.bool) for k, v in pruner.element_masks(target).items()})
            self._build_masks()
            self.apply_masks()
        pruner.current_sparsity_ratio = target
        if checked:
            self._meet_latency(pruner, unmasked)
        pruner.on_pruning_step()

    def _member_copies(self, pruner: Pruner) -> dict[str, torch.Tensor]:
        """Copies of the parameters ``pruner``'s groups mask, as they are before its plan zeroes any of them."""
        names = {m.name for g in pruner.groups for m in g.parameters if m.name in self._params}
        return {n: self._params[n].detach().clone() for n in names}

    def _restore(self, unmasked: dict[str, torch.Tensor] | None) -> None:
        """Write back the parameters as they were before the step's plan masked them (the masks stay)."""
        with torch.no_grad():
            for name, t in (unmasked or {}).items():
                self._params[name].copy_(t)

    def _set_plan(self, kept: dict[int, np.ndarray], unmasked: dict[str, torch.Tensor] | None) -> None:
        """Mask the model as ``kept`` from the weights before the step (``unmasked``), so a plan that keeps
        channels another plan removed gets their weights back, not the zeros that plan left."""
        self._restore(unmasked)
        self.set_kept(kept)

    def _meet_latency(self, pruner: Pruner, unmasked: dict[str, torch.Tensor] | None = None,
                      tries: int = 3) -> None:
        """Time the compact model against the dense one; where it misses the latency target, or beats it by
        more than :data:`LATENCY_OVERSHOOT` (channels removed for nothing), aim the prediction by the measured
        error and prune again, up to ``tries`` measurements (a measurement more than :data:`LATENCY_RECHECK` off its
        prediction is timed twice first). The plan kept is the one that meets the target with the fewest channels
        removed (else the fastest); where only a plan that overshoots meets it, the nearest miss is timed once more
        first (:meth:`_retime_near_miss`). Every measurement is in ``pruning.latency_checks``
        (the plan kept marked ``"kept": True``); a target still missed is a warning."""
        lat, cfg = pruner.latency, pruner.config
        want = 1.0 / cfg.target_speedup if cfg.target_speedup else cfg.target_latency_ms / lat.dense_ms
        if want >= 1.0:
            return
        tried = []
        for attempt in range(tries):
            predicted, timed = pruner.predicted_ms / lat.dense_ms, 1
            if all(k.all() for k in self._kept.values()):  # re-aimed so far that nothing is pruned: the dense model
                dense_ms = compact_ms = lat.dense_ms
            else:
                dense_ms, compact_ms = lat.measure(compact := self.compact(check=False))
                if abs(compact_ms / dense_ms / predicted - 1) > LATENCY_RECHECK:
                    # far from its prediction: timed again before the plan is changed, each model at its faster
                    # time (a host that slows runs for seconds at a time moved one measurement by 25% on a 2-vCPU VM)
                    again = lat.measure(compact)
                    dense_ms, compact_ms, timed = min(dense_ms, again[0]), min(compact_ms, again[1]), 2
            measured = compact_ms / dense_ms
            self.latency_checks.append({"step": self.global_step, "attempt": attempt, "dense_ms": dense_ms,
                                        "compact_ms": compact_ms, "measured_speedup": 1.0 / measured,
                                        "predicted_speedup": float(1.0 / predicted), "target_speedup": 1.0 / want,
                                        "threads": lat.threads, "batch": lat.batch, "timed": timed, "kept": False})
            tried.append((measured, {g: k.copy() for g, k in self._kept.items()}, self.latency_checks[-1]))
            if want * LATENCY_OVERSHOOT <= measured <= want * LATENCY_TOLERANCE or attempt == tries - 1:
                break
            # the next plan is aimed by the prediction's error at this one (measured over predicted), so it lands
            # where this one was aimed, at LATENCY_AIM of the target; scaling the aim by measured over *wanted*
            # cancelled that margin and put the next plan on the window's edge, where noise half the time
            # fails it. One measurement moves the aim by at most 2x either way: a plan far off (a small model
            # whose fixed costs the tables do not see) would otherwise swing the next one past the dense model
            lat.correction = min(2.0 * lat.correction, max(0.5 * lat.correction, measured / predicted))
            self._restore(unmasked)  # scored on the weights before the step, as the first plan was
            self.set_kept(pruner.select(pruner.scheduler.target))
        meeting = [t for t in tried if t[0] <= want * LATENCY_TOLERANCE]
        if meeting and max(t[0] for t in meeting) < want * LATENCY_OVERSHOOT:
            self._retime_near_miss(lat, tried, want, unmasked)
            meeting = [t for t in tried if t[0] <= want * LATENCY_TOLERANCE]
        measured, kept, check = max(meeting, key=lambda t: t[0]) if meeting else min(tried, key=lambda t: t[0])
        check["kept"] = True
        if any(not np.array_equal(k, self._kept[g]) for g, k in kept.items()):
            self._set_plan(kept, unmasked)
        if measured > want * LATENCY_TOLERANCE:
            pruner._note(f"latency target missed after {tries} measurements: the compact model runs "
                         f"{1.0 / measured:.2f}x faster than the dense one where {1.0 / want:.2f}x was asked "
                         f"({setting(lat.threads, lat.batch)}); see pruning.latency_checks")
        elif measured < want * LATENCY_OVERSHOOT:
            pruner._note(f"latency target overshot after {len(tried)} measurements: the plan kept runs "
                         f"{1.0 / measured:.2f}x faster than the dense one where {1.0 / want:.2f}x was asked, so it "
                         f"removes channels the target did not need; no plan measured within "
                         f"{LATENCY_OVERSHOOT:.0%}-{LATENCY_TOLERANCE:.0%} of the target, and the closer ones missed "
                         f"it ({setting(lat.threads, lat.batch)}; timings that move between measurements cause "
                         "this: see pruning.latency_checks, or ask for a lower target_speedup)")

    def _retime_near_miss(self, lat: LatencyModel, tried: list, want: float,
                          unmasked: dict[str, torch.Tensor] | None) -> None:
        """Where only an overshooting plan met the target, time once more the plan that missed it by the least,
        if by less than :data:`LATENCY_RECHECK` and timed once, each model at its faster time: at 2 threads a
        2-vCPU VM moved ConvNeXt-tiny's timings by up to 30%, and a plan measured 3.7% short of 3x was dropped
        for one 45% faster than asked. ``tried`` is updated in place."""
        misses = [i for i, t in enumerate(tried)
                  if want * LATENCY_TOLERANCE < t[0] <= want * (1 + LATENCY_RECHECK) and t[2]["timed"] == 1]
        if not misses:
            return
        i = min(misses, key=lambda j: tried[j][0])
        _, kept, check = tried[i]
        self._set_plan(kept, unmasked)
        dense_ms, compact_ms = lat.measure(self.compact(check=False))
        dense_ms, compact_ms = min(dense_ms, check["dense_ms"]), min(compact_ms, check["compact_ms"])
        check.update(dense_ms=dense_ms, compact_ms=compact_ms, measured_speedup=dense_ms / compact_ms, timed=2)
        tried[i] = (compact_ms / dense_ms, kept, check)

    # -- training-loop hooks --------------------------------------------------------------
    def on_train_begin(self) -> None:
        """Start of fine-tuning: masks are applied so training starts from the masked model."""
        self._training = True
        self.apply_masks()

    def _require_training(self, hook: str) -> None:
        if not self._training:
            raise PruningError(f"{hook}() was called before on_train_begin(); call on_train_begin() (or "
                               "attach(optimizer)) once before the training loop")

    def on_epoch_begin(self, epoch: int | None = None) -> None:
        """Nothing to do; present so every hook of the reference exists."""

    def on_step_begin(self, step: int | None = None) -> None:
        """Prune if ``step`` is one of a pruner's pruning steps (then masks change)."""
        self._require_training("on_step_begin")
        if step is not None:
            self.global_step = step
        due = []
        for pruner in self.pruners:
            pruner.global_step = self.global_step
            if pruner.scheduler.is_pruning_step(self.global_step):
                due.append(pruner)
        self._step_pruners(due, lambda p: p.scheduler.sparsity(self.global_step))

    def on_before_optimizer_step(self) -> None:
        """Scores from this step's gradients, then gradients of pruned weights are zeroed."""
        self._require_training("on_before_optimizer_step")
        for pruner in self.pruners:
            pruner.on_before_optimizer_step()
        for name, pruned in self._pruned.items():
            grad = self._params[name].grad
            if grad is not None:
                grad.masked_fill_(pruned, 0)

    def on_after_optimizer_step(self) -> None:
        """Re-zero pruned weights (momentum or weight decay may have moved them); count the step."""
        self._require_training("on_after_optimizer_step")
        self.apply_masks()
        self.global_step += 1

    def on_step_end(self) -> None:
        """Nothing to do; present so every hook of the reference exists."""

    def on_epoch_end(self) -> None:
        """Nothing to do; present so every hook of the reference exists."""

    def on_train_end(self) -> None:
        """End of fine-tuning: masks applied once more."""
        self._require_training("on_train_end")
        self._training = False
        self.apply_masks()

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Wire every hook into a plain loop through ``optimizer.step``.

        After ``attach``, each ``optimizer.step()`` runs ``on_before_optimizer_step``,
        the real step, ``on_after_optimizer_step`` and the next ``on_step_begin``.
        """
        if getattr(optimizer, "_fxprune_attached", None) is not None:
            raise PruningError("this optimizer is already attached: a second attach() would run every hook twice "
                               "per step (the schedule twice as fast)")
        own = {id(p) for p in self.model.parameters()}
        theirs = [p for group in optimizer.param_groups for p in group["params"]]
        if theirs and not any(id(p) in own for p in theirs):
            raise PruningError("the optimizer holds none of pruning.model's parameters, so the masked model would "
                               "never train; build it from pruning.model.parameters()")
        step = optimizer.step
        pruning = self

        def hooked_step(opt, *args, **kwargs):
            pruning.on_before_optimizer_step()
            out = step(*args, **kwargs)
            pruning.on_after_optimizer_step()
            pruning.on_step_end()
            pruning.on_step_begin()
            return out

        # a bound method, as LR schedulers expect (they wrap optimizer.step.__func__); keep the mark a
        # scheduler created earlier left on step, or it warns that step was overridden
        if getattr(step, "_wrapped_by_lr_sched", False):
            hooked_step._wrapped_by_lr_sched = True
        optimizer.step = types.MethodType(hooked_step, optimizer)
        optimizer._fxprune_attached = self
        self.on_train_begin()
        self.on_step_begin()
        return optimizer

    # -- saved state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks' source (kept channels per group), pruner scores, the step and the calibration statistics."""
        return {"kept": {g: torch.from_numpy(k.copy()) for g, k in self._kept.items()},
                "element_masks": {k: v.clone() for k, v in self._element_masks.items()},
                "global_step": self.global_step, "pruners": [p.state_dict() for p in self.pruners],
                "calibration": self._calibration_state()}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("kept", "global_step", "pruners") if not isinstance(state, dict) or k not in state]
        if missing:
            raise PruningError(f"not a pruning state: {', '.join(missing)} missing (expected what "
                               "Pruning.state_dict() returns)")
        if set(state["kept"]) != set(self._kept):
            raise PruningError("state was saved for a model with different groups")
        self.global_step = state["global_step"]
        for pruner, ps in zip(self.pruners, state["pruners"]):
            pruner.load_state_dict(ps)
        self._element_masks = {k: v.clone() for k, v in state.get("element_masks", {}).items()}
        if "calibration" in state:
            self._load_calibration_state(state["calibration"])
        self.set_kept({g: np.asarray(k, dtype=bool) for g, k in state["kept"].items()})
