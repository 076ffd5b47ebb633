"""Pruners that score channels from calibration statistics: one shot, no gradients, no fine-tuning.

They read what ``pruning.calibrate(batches)`` collected (:mod:`fxprune.calibration`) and score a
whole group through ``channel_scores``, so heads, FFN channels and the hidden size are pruned
as with every pruner. A group channel is seen from the layers that read it (its *consumers*:
a Linear or conv whose weight is a member along its input dim) and, for ``activation`` where
no consumer was measured, the layers that write it (*producers*):

- ``activation`` (Minitron): the L2 norm of the channel's activation, ``sqrt(sum_j E[x_j^2])`` over
  the consumer inputs ``j`` it owns, summed over its consumers.
- ``wanda_sp`` (Wanda-SP): ``sum_j sum_i |W_ij| sqrt(E[x_j^2])`` over the consumer weight columns ``j``
  it owns: what its inputs weigh in the outputs.
- ``flap`` (FLAP's fluctuation): ``sum_j Var(x_j) ||W_:,j||^2``, the output variance it carries, the part
  bias compensation cannot restore. Scores are standardised per group (zero mean, unit variance)
  before the global ranking, as FLAP standardises per layer, so that layers of different scale
  compete on equal terms.

``activation`` and ``wanda_sp`` divide a group's scores by their mean, as magnitude scores are, so a
global ranking compares each channel with its own group's typical one. A group that no
calibrated layer reaches (a layer whose weight a parent module reads without calling it) is
scored by |W|, with a note; ``nn.MultiheadAttention``'s ``out_proj`` is such a layer, and is
observed through the attention module instead (:mod:`fxprune.adapters.torch_attention`).
"""

from __future__ import annotations

import numpy as np

from fxprune.calibration import CalibrationStats, member_channel_sum, require_calibration, weight_out_in
from fxprune.errors import ConfigError, PruningError
from fxprune.pruners import Pruner, register_pruners

__all__ = ["CalibratedPruner", "ActivationPruner", "WandaSPPruner", "FlapPruner"]


class CalibratedPruner(Pruner):
    """Base of the calibration criteria: ``calibration`` is set by ``pruning.calibrate``."""

    calibration: CalibrationStats | None = None

    def __init__(self, modules, config, groups=()):
        if not config.parsed_pattern.is_channel:
            raise ConfigError(f"the {config.pruning_type} pruner scores whole channels from activations; pattern "
                              f"{config.pattern!r} masks single weights: use 'channelx1', or magnitude for NxM/N:M")
        super().__init__(modules, config, groups)

    def channel_scores(self, group) -> np.ndarray:
        stats = require_calibration(self.calibration, f"the {self.name} pruner")
        score = self.calibrated_scores(group, stats)
        if score is None:
            self._note(f"no calibration statistics reached {group.describe()}: those channels are scored by |W|")
            score = super().channel_scores(group)
        if not np.isfinite(score).all():
            raise PruningError(f"non-finite {self.name} scores in {group.describe()}: the calibration batches or "
                               "the weights hold NaN/inf")
        return self.normalise(score)

    def calibrated_scores(self, group, stats: CalibrationStats) -> np.ndarray | None:
        """Raw per-channel score, or None when no member layer was measured."""
        raise NotImplementedError

    def normalise(self, score: np.ndarray) -> np.ndarray:
        mean = score.mean()
        return score / mean if mean > 0 else score

    def _consumers(self, group, stats: CalibrationStats):
        """(member, layer statistics, (out, in, taps) weight) of every measured consumer in ``group``."""
        for m in group.parameters:
            layer = stats.for_parameter(m.name)
            if layer is not None and layer.is_consumer(m.dim) and m.name in self.modules:
                yield m, layer, weight_out_in(self.modules[m.name].detach(), layer).double().cpu()


@register_pruners("activation")
class ActivationPruner(CalibratedPruner):
    """Channel activation norm (Minitron): channels that carry the least signal go first."""

    def calibrated_scores(self, group, stats):
        parts = [member_channel_sum(layer.mean_sq, m.atoms, group.size)
                 for m, layer, _ in self._consumers(group, stats)]
        if not parts:
            parts = [member_channel_sum(layer.out_mean_sq, m.atoms, group.size) for m in group.parameters
                     if (layer := stats.for_parameter(m.name)) is not None and layer.is_producer(m.dim)]
        return sum(np.sqrt(p) for p in parts) if parts else None


@register_pruners("wanda_sp")
class WandaSPPruner(CalibratedPruner):
    """|W| * ||X|| of the consumers (Wanda, structured): weights that meet small inputs matter little."""

    def calibrated_scores(self, group, stats):
        parts = [member_channel_sum(w.abs().sum((0, 2)) * layer.mean_sq.sqrt(), m.atoms, group.size)
                 for m, layer, w in self._consumers(group, stats)]
        return sum(parts) if parts else None


@register_pruners("flap")
class FlapPruner(CalibratedPruner):
    """FLAP's fluctuation Var(x_j) * ||W_:,j||^2, standardised per group: what bias compensation cannot restore."""

    def calibrated_scores(self, group, stats):
        parts = [member_channel_sum(w.square().sum((0, 2)) * layer.var, m.atoms, group.size)
                 for m, layer, w in self._consumers(group, stats)]
        return sum(parts) if parts else None

    def normalise(self, score: np.ndarray) -> np.ndarray:
        std = score.std()
        return (score - score.mean()) / std if std > 0 else np.zeros_like(score)
