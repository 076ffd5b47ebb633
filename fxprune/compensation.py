"""Compensation: the kept weights of a consumer take over what its removed inputs contributed.

Removing input channels R of a layer that reads a group's channels (a conv or Linear: a
*consumer*) changes its output by ``W[:, R] x_R``. Without fine-tuning that error stays, so
``compensation`` in the config re-fits every consumer from the calibration statistics
(:mod:`fxprune.calibration`) in the pruning step, after the kept channels are chosen and
before the masks zero the removed weights (``Pruner.after_select``). It edits the kept
weights of ``pruning.model``, so ``compact()`` still equals the masked model.

- ``bias`` (FLAP): the removed channels' mean contribution moves into the bias,
  ``b += W[:, R] E[x_R]``; the output error left is the removed channels' fluctuation. For a conv,
  ``E[x_R]`` is taken per kernel tap over the output positions, so zero padding is accounted for
  (on small feature maps most positions read some padding).
- ``least_squares``: ridge regression of the layer's current output on its kept inputs,
  ``W_K = W G[:, K] (G[K, K] + lambda I)^-1`` with ``G = E[x x^T]``; where the layer can take a
  bias shift, ``G`` is the covariance instead (an unpenalised intercept) and the shift restores
  the layer's mean output.
  ``lambda`` is :data:`DAMPING` times the mean of ``diag(G[K, K])``, SparseGPT's dampening: it
  keeps the solve well posed when kept channels are (nearly) collinear or dead and pulls the
  solution towards ``W_K`` by a relative 1% only. On the calibration data this is the best
  affine re-fit, so it is never worse than ``bias`` there, up to that damping.

A layer without a bias: a BatchNorm that its output alone feeds takes the shift in its
``running_mean`` (exact in eval mode). Otherwise the shift is skipped with a note: a bias
created now would not be in the captured graph, and ``compact()`` would drop it. Statistics
are those of the model when ``calibrate`` ran; each layer is fitted to that data on its own,
not to the inputs that upstream pruning leaves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fxprune.calibration import LayerStats, require_calibration, weight_out_in

if TYPE_CHECKING:
    from fxprune.api import Pruning
    from fxprune.pruners import Pruner

__all__ = ["compensate", "DAMPING"]

DAMPING = 0.01


@torch.no_grad()
def compensate(pruning: "Pruning", pruner: "Pruner", kept: dict[int, np.ndarray]) -> None:
    """Re-fit every consumer that loses input channels when ``kept`` (group index -> keep mask) is applied."""
    mode = pruner.config.compensation
    stats = require_calibration(pruning.calibration, f"compensation {mode!r}")
    params = dict(pruning.model.named_parameters(remove_duplicate=False))
    skipped: dict[str, list[str]] = {"unseen": [], "gram": [], "bias": []}
    for layer, keep, removed in _consumer_changes(pruning, pruner, kept, stats, skipped["unseen"]):
        if not removed.any():
            continue
        view = weight_out_in(params[layer.weight], layer)
        w = view.detach().double().cpu()
        target = _bias_target(pruning, layer)
        if mode == "least_squares" and layer.gram is not None:
            shift = _least_squares(view, w, keep, layer, intercept=target is not None)
        else:
            if mode == "least_squares":
                skipped["gram"].append(layer.module)
            shift = torch.einsum("oit,it->o", w[:, removed], layer.tap_mean[removed])
            if target is None:
                skipped["bias"].append(layer.module)
        if target is not None:
            tensor, sign = target
            tensor.add_((sign * shift).to(tensor.dtype).to(tensor.device))
    for key, why in (("unseen", "saw no calibration input: their removed inputs are not compensated"),
                     ("gram", "have no input Gram matrix (more input features than calibrate()'s max_gram_features, "
                              "or calibrate(gram=False)): their removed inputs are compensated by their mean only"),
                     ("bias", "have no bias and no BatchNorm of their own after them: the mean of their removed inputs "
                              "is not compensated (a new bias would not be in the captured graph)")):
        if skipped[key]:
            names = skipped[key]
            pruner._note(f"{len(names)} layers ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) {why}")


def _least_squares(view: torch.Tensor, w: torch.Tensor, keep: np.ndarray, layer: LayerStats,
                   intercept: bool) -> torch.Tensor:
    """Write the ridge re-fit of the kept columns into ``view``; return the bias shift (zero without one).

    With an intercept the fit is on centred inputs (the covariance instead of ``E[x x^T]``: an unpenalised
    bias), and the shift then matches the layer's mean output exactly, from what each kernel tap reads."""
    gram, mean = layer.gram, layer.mean
    kept = torch.from_numpy(np.flatnonzero(keep))
    if intercept:
        gram = gram - torch.outer(mean, mean)
    cross = gram[:, kept]  # E[x x_K^T], centred with an intercept
    inner = cross[kept].clone()
    diag = inner.diagonal()
    diag += DAMPING * float(diag.mean()) if len(kept) and float(diag.mean()) > 0 else 1e-8
    try:
        fit = torch.linalg.solve(inner, cross.T).T  # inner is symmetric: fit = cross @ inner^-1
    except RuntimeError:
        fit = cross @ torch.linalg.pinv(inner)
    refit = torch.einsum("oit,ik->okt", w, fit)
    view[:, kept, :] = refit.to(view.dtype).to(view.device)
    if not intercept:
        return torch.zeros(w.shape[0], dtype=w.dtype)
    taps = layer.tap_mean
    return torch.einsum("oit,it->o", w, taps) - torch.einsum("okt,kt->o", refit, taps[kept])


def _consumer_changes(pruning: "Pruning", pruner: "Pruner", kept: dict[int, np.ndarray], stats, unseen: list[str]):
    """(layer statistics, inputs kept after the step, inputs this step removes) per consumer the step touches."""
    touched: set[str] = set()
    for g in pruner.groups:
        for m in g.parameters:
            layer = stats.for_parameter(m.name)
            if layer is not None and layer.is_consumer(m.dim):
                touched.add(layer.module)
            elif layer is not None and m.dim == layer.in_dim and layer.groups == 1 and not kept[g.index].all():
                unseen.append(layer.module)
    changes: dict[str, list] = {}
    for g in pruning.groups:
        for m in g.parameters:
            layer = stats.for_parameter(m.name)
            if layer is None or layer.module not in touched or not layer.is_consumer(m.dim):
                continue
            new, old = kept.get(g.index, pruning._kept[g.index]), pruning._kept[g.index]
            n = len(m.atoms)
            entry = changes.setdefault(layer.module, [layer, np.ones(n, dtype=bool), np.ones(n, dtype=bool)])
            valid = m.atoms >= 0
            entry[1][valid] &= np.asarray(new, dtype=bool)[m.atoms[valid]]
            entry[2][valid] &= np.asarray(old, dtype=bool)[m.atoms[valid]]
    return [(layer, new, old & ~new) for layer, new, old in changes.values()]


def _bias_target(pruning: "Pruning", layer: LayerStats) -> tuple[torch.Tensor, float] | None:
    """Where a shift of the layer's output goes: its bias (+), else its BatchNorm's running mean (-), else None."""
    module = pruning.model.get_submodule(layer.module)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        return bias, 1.0
    running_mean = _batch_norm_after(pruning.captured.graph_module, layer.weight)
    if running_mean is not None:
        try:
            return pruning.model.get_buffer(running_mean), -1.0
        except AttributeError:
            return None
    return None


def _batch_norm_after(gm: torch.fx.GraphModule, weight: str) -> str | None:
    """The running-mean buffer of a batch norm that alone reads the output of the one op using ``weight``."""
    ops = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == weight for u in n.users]
    if len(ops) != 1:
        return None
    op = ops[0]
    has_bias = len(op.args) > 2 and op.args[2] is not None
    if len(op.args) < 2 or getattr(op.args[1], "target", None) != weight or has_bias:
        return None
    users = list(op.users)
    if len(users) != 1 or "batch_norm" not in str(users[0].target) or users[0].args[0] is not op:
        return None
    mean = users[0].args[3] if len(users[0].args) > 3 else None
    return mean.target if getattr(mean, "op", None) == "get_attr" else None
