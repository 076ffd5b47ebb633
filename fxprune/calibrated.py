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
- ``flap`` (FLAP's fluctuation): the output error the compensation in use cannot restore. Under
  ``none`` and ``bias`` that is ``sum_j Var(x_j) ||W_:,j||^2``, the output variance the channel
  carries. Under ``least_squares`` the kept inputs are re-fitted, so a channel that the others
  predict costs little however much it varies: the score is the output error that the re-fit leaves,
  ``tr(W_S (P_SS)^-1 W_S^T)`` with ``P = (G + lambda I)^-1`` (Optimal Brain Surgeon's saliency;
  ``G`` the input covariance where the layer takes a bias shift, else ``E[x x^T]``, and ``lambda``
  the fit's relative damping, over all inputs), taken greedily: channels are eliminated cheapest
  first, each step re-fitting the rest (on wide layers the cheapest 1/256 of those left per step),
  and a channel's score is the highest elimination cost up to its own, so the ranking is the
  elimination order. It equals the fluctuation where the inputs are uncorrelated (up to that
  damping). Layers without a Gram (wider than ``max_gram_features``, or ``calibrate(gram=False)``)
  use the fluctuation, with a note. Scores are standardised per group (zero mean, unit variance)
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
import torch

from fxprune.calibration import CalibrationStats, member_channel_sum, require_calibration, weight_out_in
from fxprune.errors import ConfigError, PruningError
from fxprune.pruners import Pruner, register_pruners

__all__ = ["CalibratedPruner", "ActivationPruner", "WandaSPPruner", "FlapPruner", "refit_residual_scores",
           "one_input_per_channel", "loss_weighted", "in_loss", "ROWS_PER_INPUT"]

# Calibration rows (tokens, pixels) per input of a reading layer below which flap's residual ranking fits
# the calibration batches more than the data: on the 14.4 M byte-level Llama (benchmarks/RESULTS.md) the FFN
# readers' 1,536 inputs ranked from 8,192 rows (5.3 per input) left flap + least_squares 6.554 at 50%, from
# 32,768 (21 per input) 6.185, and only there the lowest of the criteria at every ratio. Published setups
# calibrate with about 24 per input (128 x 2,048 tokens for LLaMA-7B's 11,008 FFN channels).
ROWS_PER_INPUT = 16


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
    """FLAP's fluctuation, standardised per group: the output error the compensation cannot restore."""

    scores_in_loss = True  # with calibrate(loss=...), that error is weighed by the loss gradient at the output

    @property
    def scores_with_gram(self) -> bool:
        """Under ``least_squares`` the score is the re-fit's residual, which needs the consumers' Grams."""
        return self.config.compensation == "least_squares"

    def reselects_on_pruned_inputs(self, member) -> bool:
        """Where this pruner scores the fit's residual, the sequential fit measures it on its own inputs."""
        return (self.scores_with_gram and self.config.compensation_inputs == "pruned"
                and self.residual_scored(member))

    def calibrated_scores(self, group, stats):
        parts, marginal = [], []
        consumers = list(self._consumers(group, stats))
        weigh = in_loss([layer for _, layer, _ in consumers], stats)
        if stats.loss and consumers and not weigh:
            unseen = [layer.module for _, layer, _ in consumers if layer.grad_moment is None]
            self._note(f"{group.describe()}: no loss gradient reached {', '.join(unseen)}: the group is scored "
                       "by output error, not by loss")
        for m, layer, w in consumers:
            if weigh:
                w = loss_weighted(w, layer)
            if self.scores_with_gram and layer.gram is not None and self.residual_scored(m):
                self._note_few_rows(layer)
                parts.append(refit_residual_scores(w, _covariance(layer, layer.module in stats.shifted), m.atoms,
                                                   group.size))
                continue
            if self.scores_with_gram and layer.gram is None:
                marginal.append(layer.module)
            parts.append(member_channel_sum(w.square().sum((0, 2)) * layer.var, m.atoms, group.size))
        if marginal:
            self._note(f"{group.describe()}: {', '.join(marginal)} kept no input Gram (wider than max_gram_features, "
                       "or calibrate(gram=False)): scored by the marginal fluctuation there, not the re-fit residual")
        return sum(parts) if parts else None

    def _note_few_rows(self, layer) -> None:
        """Say where the residual that ranks channels is estimated from few calibration rows per input."""
        inputs = layer.gram.shape[0]
        if layer.count < ROWS_PER_INPUT * inputs:
            self._note(f"the re-fit residual that ranks channels is estimated from {layer.count:,} calibration rows "
                       f"for layers of {inputs:,} inputs ({layer.count / inputs:.1f} per input); under "
                       f"{ROWS_PER_INPUT} per input it favours channels the fit predicts on the calibration data "
                       "alone: calibrate on more batches")

    def residual_scored(self, member) -> bool:
        """Whether this consumer member is scored by the re-fit residual (given its Gram): every one here; a
        variant that scores some members by the fluctuation instead overrides it (the benchmarks compare one)."""
        return True

    def normalise(self, score: np.ndarray) -> np.ndarray:
        std = score.std()
        return (score - score.mean()) / std if std > 0 else np.zeros_like(score)


def loss_weighted(w: torch.Tensor, layer) -> torch.Tensor:
    """``w`` (out, in, taps) with its outputs mixed so that a squared output error is an estimated loss increase
    (the Kronecker-factored Fisher: ``d^T G d`` for an output error ``d``, ``G`` the loss gradient's second moment
    at the layer's output): ``L^T w`` with ``L L^T = G``, or ``sqrt(diag G) w`` where only its diagonal was kept."""
    root = layer.__dict__.get("_loss_root")  # one factorisation per layer, however many groups it reads
    if root is None:
        g = layer.grad_moment.double()
        if g.dim() == 1:
            root = g.sqrt()
        else:
            vals, vecs = torch.linalg.eigh(g)
            root = vecs * vals.clamp_min(0).sqrt()  # L with L L^T = G
        layer.__dict__["_loss_root"] = root
    if root.dim() == 1:
        return w * root[:, None, None]
    return torch.einsum("op,oit->pit", root, w)


def in_loss(layers, stats: CalibrationStats) -> bool:
    """Whether a group read by ``layers`` is scored in loss: every one of them has the loss gradient's moments."""
    return stats.loss and all(layer.grad_moment is not None for layer in layers)


def _covariance(layer, centred: bool) -> torch.Tensor:
    """The second moment a least-squares re-fit of ``layer`` solves with, with the fit's relative damping."""
    from fxprune.compensation import damp_
    return damp_(layer.gram - torch.outer(layer.mean, layer.mean) if centred else layer.gram.clone())


def refit_residual_scores(w: torch.Tensor, cov: torch.Tensor, atoms: np.ndarray, size: int) -> np.ndarray:
    """Per group channel: the running maximum of the output error left by eliminating it after the cheaper ones.

    ``w``: (out, in, taps) weight; ``cov``: (in, in) input second moment; ``atoms[i]``: the group channel of
    input ``i`` (-1: not in the group, never removed). Removing the inputs ``S`` and re-fitting the others
    leaves ``tr(W_S (P_SS)^-1 W_S^T)`` with ``P = cov^-1``; after each elimination ``W`` takes the re-fit and
    ``P`` the inverse of the remaining covariance (both rank-``|S|`` downdates), as in Optimal Brain Surgeon.
    """
    if not (torch.isfinite(w).all() and torch.isfinite(cov).all()):
        return np.full(size, np.nan)  # channel_scores names the group; NaN would otherwise vanish in max()
    w = w.permute(0, 2, 1).reshape(-1, w.shape[1]).double().clone()  # a kernel tap is one more output
    p = torch.linalg.inv(cov.double())
    sets = [torch.from_numpy(np.flatnonzero(atoms == c)) for c in range(size)]
    alive = [c for c in range(size) if len(sets[c])]
    scores = np.zeros(size)
    if one_input_per_channel(atoms):
        _eliminate_columns(w, p, atoms, scores)
        return scores
    level = 0.0
    while alive:
        costs = [float(torch.trace(w[:, sets[c]] @ torch.linalg.solve(p[sets[c]][:, sets[c]], w[:, sets[c]].T)))
                 for c in alive]
        k = int(np.argmin(costs))
        c = alive.pop(k)
        level = max(level, costs[k])
        scores[c] = level
        cols = sets[c]
        inv = torch.linalg.inv(p[cols][:, cols])
        w -= w[:, cols] @ inv @ p[cols, :]
        p -= p[:, cols] @ inv @ p[cols, :]
    return scores


def one_input_per_channel(atoms: np.ndarray) -> bool:
    """Whether each group channel owns at most one input of the consumer (``atoms[i]``: its channel, -1 none):
    FFN channels and the hidden size at their readers, not heads at ``o_proj``."""
    owned = atoms[atoms >= 0]
    return owned.size == 0 or int(np.bincount(owned).max()) == 1


def _eliminate_columns(w: torch.Tensor, p: torch.Tensor, atoms: np.ndarray, scores: np.ndarray) -> None:
    """``refit_residual_scores`` where each group channel is one input. While more than ``_BLOCK`` channels are
    left, the cheapest 1/``_BLOCK`` of them go in one step (a rank-k downdate): close to the one-at-a-time order
    (within a few % of its residual) for the work of about ``_BLOCK / 2`` full-size downdates instead of one per
    input. An eliminated input's column of ``w`` and row and column of ``p`` are zero after its downdate, so
    the matrices shrink to the inputs left only when a tenth of them has gone: copying them on every step cost
    about as much as the downdates."""
    atoms = torch.as_tensor(atoms.copy())
    live = atoms >= 0
    level = 0.0
    while bool(live.any()):
        left = int(live.sum())
        costs = w.square().sum(0) / p.diagonal().clamp_min(1e-300)
        costs[~live] = float("inf")
        out = torch.topk(costs, max(1, left // _BLOCK), largest=False).indices.sort().values
        for j in out[costs[out].argsort()].tolist():
            level = max(level, float(costs[j]))
            scores[int(atoms[j])] = level
        inv = torch.linalg.inv(p[out][:, out])
        w -= w[:, out] @ inv @ p[out, :]
        p -= p[:, out] @ inv @ p[out, :]
        live[out] = False
        if 0 < (left - len(out)) * 10 <= 9 * int((atoms >= 0).sum()):
            keep = live | (atoms < 0)
            w, p, atoms, live = w[:, keep], p[keep][:, keep], atoms[keep], live[keep]


_BLOCK = 256
