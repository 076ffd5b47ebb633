"""Registered pruners: how channel scores are computed.

``@register_pruners("name")`` adds a class to the registry (:mod:`fxprune.registry`);
``get_pruner`` builds one from a config. A pruner owns the parameters of the groups it
was given, keeps ``scores`` up to date from the training-loop hooks, and on each pruning
step turns scores into kept channels per group (:mod:`fxprune.selection`).
"""

from __future__ import annotations


import numpy as np
import torch

from fxprune.config import parse_config
from fxprune.errors import ConfigError
from fxprune.importance import group_scores
from fxprune.latency import LATENCY_AIM, setting
from fxprune.patterns import n_of_m_masks, nxm_masks, pattern_lock_masks
from fxprune.registry import PRUNERS, registered_names, unknown_pruner
from fxprune.schedulers import get_scheduler
from fxprune.selection import (ALIGN, align_narrow, aligned_widths, choose_kept, latency_counts, prune_counts,
                               repeated_blocks, unaligned_pieces, uniform_counts)
from fxprune.user_warning import warn

__all__ = ["PRUNERS", "register_pruners", "get_pruner", "registered_names", "Pruner", "MagnitudePruner",
           "SnipPruner", "SnipMomentumPruner", "TaylorPruner", "PatternLockPruner"]


def register_pruners(name: str):
    """Class decorator registering a :class:`Pruner` subclass under ``name``.

    >>> @register_pruners("my_random")
    ... class RandomPruner(Pruner):
    ...     def channel_scores(self, group):
    ...         return np.random.rand(group.size)
    """

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, Pruner)):
            raise TypeError(f"register_pruners({name!r}) expects a Pruner subclass, got {cls!r}")
        PRUNERS[name.lower()] = cls
        cls.name = name.lower()
        return cls

    return register


def get_pruner(modules: dict[str, torch.Tensor], config, groups=None) -> "Pruner":
    """Build the registered pruner named by ``config.pruning_type``.

    Raises
    ------
    ConfigError
        The name is not registered; the message lists the registered names.
    """
    if isinstance(config, dict):
        name = str(config.get("pruning_type", config.get("prune_type", ""))).lower()
        if name and name not in PRUNERS:
            raise unknown_pruner(name)
        configs = parse_config(config)
        if len(configs) != 1:
            raise ConfigError("get_pruner builds one pruner: give a config without 'pruners'")
        config = configs[0]
    name = getattr(config, "pruning_type", None)
    cls = PRUNERS.get(str(name).lower())
    if cls is None:
        raise unknown_pruner(name)
    return cls(modules, config, groups or [])


class Pruner:
    """Base pruner: magnitude-free plumbing shared by every criterion.

    Attributes mirror the reference API: ``modules`` (name -> parameter), ``config``,
    ``masks`` (name -> bool mask), ``scores`` (name -> per-element score),
    ``pattern``, ``scheduler``, ``current_sparsity_ratio``, ``global_step``,
    ``start_step``, ``end_step``, ``update_frequency_on_step``,
    ``target_sparsity_ratio``, ``max_sparsity_ratio_per_layer``.
    """

    name = "base"

    def __init__(self, modules: dict[str, torch.Tensor], config, groups=()):
        self.modules = modules
        self.config = config
        self.groups = list(groups)
        self.masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in modules.items()}
        self.scores: dict[str, torch.Tensor] = {}
        self.pattern = config.parsed_pattern
        self.scheduler = get_scheduler(config)
        self.current_sparsity_ratio = 0.0
        self.global_step = 0
        self.start_step = config.start_step
        self.end_step = config.end_step
        self.update_frequency_on_step = config.update_frequency_on_step
        self.target_sparsity_ratio = config.target_sparsity
        self.max_sparsity_ratio_per_layer = config.max_sparsity_ratio_per_layer
        self.notes: list[str] = []  # where a request was adjusted to be feasible (see _note_adjustments)
        # under target_speedup / target_latency_ms: the latency model and every group's kept fraction
        # (set by Pruning, see fxprune.latency); predicted_ms is the last plan's predicted latency
        self.latency = None
        self.kept_fraction = None
        self.predicted_ms: float | None = None

    # -- scoring hooks (override what the criterion needs) ---------------------------
    def on_before_optimizer_step(self) -> None:
        """Gradients of this step are available here, before the weights change."""

    def on_pruning_step(self) -> None:
        """Called after each pruning step; criteria that accumulate per interval reset here."""

    def channel_scores(self, group) -> np.ndarray:
        """Score per channel of ``group``; lower is pruned first."""
        return group_scores(group, self.modules, self.config.magnitude_norm, self.scores or None)

    def reselects_on_pruned_inputs(self, member) -> bool:
        """Under ``compensation: least_squares`` with ``compensation_inputs: pruned``: whether the fit chooses
        again, in its wave, which of a group's channels go where ``member`` reads them (as many as ``select``
        took), by the fit's residual on the inputs the earlier layers' pruning leaves
        (:mod:`fxprune.compensation`). False here: this criterion is not that residual."""
        return False

    def after_select(self, pruning, kept: dict[int, np.ndarray]) -> None:
        """Between choosing ``kept`` and masking the rest, while removed weights still hold their values:
        ``compensation`` re-fits the kept weights here (:mod:`fxprune.compensation`)."""
        if self.config.compensation != "none":
            pruning.compensate(self, kept)

    # -- selection ------------------------------------------------------------------
    def prepare(self) -> None:
        """Before a pruning step. A latency target times its tables and the dense model here (once), and
        ``target_latency_ms`` becomes the fraction of the dense latency the schedule removes."""
        if self.latency is None:
            return
        self.latency.build()
        ms = self.config.target_latency_ms
        if ms is not None:
            dense = self.latency.dense_ms
            self.scheduler.target = max(0.0, 1.0 - ms / dense)
            if ms >= dense:
                self._note(f"target_latency_ms {ms} is not below the dense model's {dense:.3f} ms "
                           f"({setting(self.config.latency_threads, self.latency.batch)}): nothing is pruned")
        self.target_sparsity_ratio = self.scheduler.target

    def select(self, sparsity: float) -> dict[int, np.ndarray]:
        """Kept-channel mask per group index at overall ``sparsity`` (under a latency target: the fraction
        of the dense latency to remove)."""
        scores = {g.index: self.channel_scores(g) for g in self.groups}
        cfg = self.config
        narrow = align_narrow(self.groups, cfg.prune_domain == "global" or cfg.latency_target)
        round_to, min_kept = cfg.round_to, None
        if cfg.round_to == "auto":
            widths = {g.index: aligned_widths(g, narrow) for g in self.groups}
            round_to = {g: w[0] for g, w in widths.items()}
            min_kept = {g: w[1] for g, w in widths.items()}
        if cfg.latency_target:
            return self._select_latency(scores, sparsity, round_to, min_kept)
        options = dict(target=sparsity, scope=cfg.prune_domain, max_ratio=cfg.max_sparsity_ratio_per_layer,
                       min_ratio=cfg.min_sparsity_ratio_per_op, round_to=round_to, min_kept=min_kept)
        if cfg.uniform_layers:
            counts = uniform_counts(scores, repeated_blocks(self.groups), **options)
        else:
            counts = prune_counts(scores, **options)
        kept = self._kept_masks(scores, counts, round_to)
        self._note_adjustments(sparsity, counts, round_to, min_kept)
        self._note_unaligned(kept, round_to)
        return kept

    def _kept_masks(self, scores, counts, round_to) -> dict[int, np.ndarray]:
        """Per group, the keep mask of its ``counts`` removed channels (concat pieces aligned as the group)."""
        parts = {g.index: g.parts for g in self.groups}
        align = round_to if isinstance(round_to, dict) else {g: round_to for g in scores}
        return {g: choose_kept(scores[g], counts[g], parts[g], align[g]) for g in scores}

    def _select_latency(self, scores, removed: float, round_to, min_kept=None) -> dict[int, np.ndarray]:
        """Widths by importance per predicted ms saved, aiming the prediction by the last measured error."""
        lat, cfg = self.latency, self.config
        target_ms = lat.dense_ms * (1.0 - removed) / lat.correction * (LATENCY_AIM if removed > 0 else 1.0)
        per_group = round_to if isinstance(round_to, dict) else {g: round_to for g in scores}
        counts, self.predicted_ms = latency_counts(scores, lat, self.kept_fraction(), target_ms,
                                                   cfg.max_sparsity_ratio_per_layer, cfg.min_sparsity_ratio_per_op,
                                                   per_group, min_kept)
        if self.predicted_ms > target_ms * 1.01:
            self._note(f"latency target {target_ms:.3f} ms (predicted) cannot be reached: the groups are at their "
                       f"cap at {self.predicted_ms:.3f} ms (max_sparsity_ratio_per_layer="
                       f"{cfg.max_sparsity_ratio_per_layer}, the layers this config leaves alone, and the ops no "
                       "channel pruning shrinks)")
        kept = self._kept_masks(scores, counts, per_group)
        self._note_unaligned(kept, per_group)
        return kept

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)
            warn(f"{self.config.pruning_type} pruner: {note}")

    def _note_unaligned(self, kept: dict[int, np.ndarray], round_to) -> None:
        """Say where concatenated pieces keep unaligned widths because whole chunks could not meet the target."""
        align = round_to if isinstance(round_to, dict) else {g: round_to for g in kept}
        parts = {g.index: g.parts for g in self.groups}
        n = sum(unaligned_pieces(k, parts[g], align[g]) for g, k in kept.items())
        if n:
            self._note(f"{n} concatenated pieces keep widths that are not multiples of their alignment: whole chunks "
                       "could not remove the channels the target asks of their groups (onnxruntime runs such a "
                       "concat and the convs after it outside its blocked layout; a lower target avoids it)")

    def _note_adjustments(self, sparsity: float, counts: dict[int, int], round_to, min_kept=None) -> None:
        """Say where the requested target could not be met as asked, once per reason (a warning and the report)."""
        cfg, sizes = self.config, {g.index: g.size for g in self.groups}
        rounding = cfg.round_to if isinstance(cfg.round_to, int) else 1  # "auto" rounds only where it fits
        total = sum(sizes.values())
        reached = sum(counts.values()) / total if total else 0.0
        found = []
        small = sorted({n for n in sizes.values() if 1 < rounding and n <= rounding})
        if small:
            found.append(f"round_to={cfg.round_to} is not smaller than {sum(n in small for n in sizes.values())} "
                         f"groups (sizes {small[:5]}), which are pruned without rounding")
        # what an explicit round_to alone may move the total by; "auto" is held to 1% of the channels
        step = rounding * (len(sizes) if cfg.prune_domain == "local" else 1) if isinstance(cfg.round_to, int) else 1
        if sparsity == cfg.target_sparsity and total and abs(reached - sparsity) > max(0.01, step / total):
            least = min_kept or {}
            capped = [g for g, n in sizes.items()
                      if counts[g] >= min(int(n * cfg.max_sparsity_ratio_per_layer), n - least.get(g, 1))]
            reasons = []
            if capped:
                held = f", narrow groups a {ALIGN}-element block under round_to 'auto'" if any(
                    least.get(g, 1) > 1 for g in capped) else ""
                reasons.append(f"{len(capped)} groups are at their cap (every group keeps at least one channel{held}, "
                               f"and at most max_sparsity_ratio_per_layer={cfg.max_sparsity_ratio_per_layer} of its "
                               "channels go)")
            if max(round_to.values(), default=1) > 1 if isinstance(round_to, dict) else round_to > 1:
                reasons.append(f"kept counts are rounded to aligned widths (round_to={cfg.round_to!r}; round_to=1 "
                               "gives exact counts)")
            why = "; ".join(reasons) or "groups are pruned in whole channels"
            found.append(f"target_sparsity {sparsity} reached {reached:.4f} over its {len(sizes)} groups: {why}")
        for note in found:
            self._note(note)

    def element_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Masks of the mask-only patterns (NxM blocks, N:M) at ``sparsity``."""
        scores = {n: (self.scores[n] if n in self.scores else p.detach()).abs() for n, p in self.modules.items()}
        pat, cfg = self.pattern, self.config
        if pat.kind == "block":
            return nxm_masks(scores, sparsity, pat.n, pat.m, scope=cfg.prune_domain,
                             max_ratio=cfg.max_sparsity_ratio_per_layer, min_ratio=cfg.min_sparsity_ratio_per_op)
        return n_of_m_masks(scores, sparsity, pat.n, pat.m, scope=cfg.prune_domain,
                            max_ratio=cfg.max_sparsity_ratio_per_layer)

    def state_dict(self) -> dict:
        state = {"scores": {k: v.clone() for k, v in self.scores.items()}, "global_step": self.global_step,
                 "current_sparsity_ratio": self.current_sparsity_ratio}
        if self.latency is not None:
            state["latency"] = self.latency.state_dict()
            state["latency_target"] = self.scheduler.target
        return state

    def load_state_dict(self, state: dict) -> None:
        self.scores = {k: v.clone() for k, v in state["scores"].items()}
        self.global_step = state["global_step"]
        self.current_sparsity_ratio = state["current_sparsity_ratio"]
        if self.latency is not None and state.get("latency"):
            self.latency.load_state_dict(state["latency"])
            self.scheduler.target = self.target_sparsity_ratio = state["latency_target"]


@register_pruners("magnitude")
class MagnitudePruner(Pruner):
    """|W|: channels whose weights (over all group members) are smallest go first."""


@register_pruners("snip")
class SnipPruner(Pruner):
    """|W * dL/dW| of the latest step, taken before the optimizer moves the weights."""

    def on_before_optimizer_step(self) -> None:
        for name, p in self.modules.items():
            if p.grad is not None:
                self.scores[name] = (p.detach() * p.grad.detach()).abs()


@register_pruners("snip_momentum")
class SnipMomentumPruner(Pruner):
    """S <- 0.9 * S + |W * dL/dW| every step (momentum 0.9 on the old score)."""

    momentum = 0.9

    def on_before_optimizer_step(self) -> None:
        for name, p in self.modules.items():
            if p.grad is not None:
                s = (p.detach() * p.grad.detach()).abs()
                old = self.scores.get(name)
                self.scores[name] = s if old is None else self.momentum * old + s


@register_pruners("taylor")
class TaylorPruner(Pruner):
    """First-order Taylor: the loss change from removing a channel, |sum over the channel of W * dL/dW|,
    accumulated over the steps since the last pruning step (Molchanov et al. 2019)."""

    def on_before_optimizer_step(self) -> None:
        for name, p in self.modules.items():
            if p.grad is not None:
                s = (p.detach() * p.grad.detach())
                self.scores[name] = s if name not in self.scores else self.scores[name] + s

    def channel_scores(self, group) -> np.ndarray:
        if not self.scores:
            return super().channel_scores(group)
        total = np.zeros(group.size)
        for m in group.parameters:
            s = self.scores.get(m.name)
            if s is None:
                continue
            flat = s.detach().double().movedim(m.dim, 0).reshape(s.shape[m.dim], -1).sum(1).numpy()
            valid = m.atoms >= 0
            total += np.bincount(m.atoms[valid], weights=flat[valid], minlength=group.size)
        return np.abs(total)

    def on_pruning_step(self) -> None:
        self.scores = {}  # the next interval accumulates afresh


@register_pruners("pattern_lock")
class PatternLockPruner(Pruner):
    """Keeps the zero pattern the model already has: a channel is pruned iff all its weights are zero."""

    def select(self, sparsity: float) -> dict[int, np.ndarray]:
        kept = {}
        for g in self.groups:
            alive = np.zeros(g.size, dtype=bool)
            for m in g.parameters:
                t = self.modules[m.name].detach()
                nz = (t != 0).movedim(m.dim, 0).reshape(t.shape[m.dim], -1).any(1).numpy()
                valid = m.atoms >= 0
                alive |= np.bincount(m.atoms[valid], weights=nz[valid], minlength=g.size) > 0
            kept[g.index] = alive if alive.any() else np.ones(g.size, dtype=bool)
        return kept

    def element_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        return pattern_lock_masks({n: p.detach() for n, p in self.modules.items()}, self.pattern.kind,
                                  self.pattern.n, self.pattern.m)
