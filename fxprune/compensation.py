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

Which inputs a layer is fitted on (``compensation_inputs``):

- ``pruned`` (default): sequentially, on the inputs that pruning leaves it. The changed layers
  are put in waves by their depth in the captured graph (a layer's wave is after every changed
  layer it reads from), and for each wave each calibration batch runs through the model as it
  was before the step and through the pruned, already re-fitted model. The model before the
  step is the same model with the step's saved tensors swapped in (the copies kept to undo a
  failed step), so it costs no copy of the model. The fit maps the pruned inputs onto the
  dense layer's output, with the cross moment ``E[x_dense x_pruned,K^T]`` in place of
  ``G[:, K]``, so a layer also makes up for what the
  layers before it could not restore. The batches run once per wave (two blocks' worth of
  waves per transformer layer for heads + FFN). Pruners that prune at the same step with the
  same compensation settings are fitted together, in one sequence of waves
  (``Masking._step_jointly``): fitted one after another, two pruners splitting heads and FFN
  would fit the heads of every block while the FFNs are still dense, and give another model
  than one pruner over both (measured so on a 14.4 M Llama at 35%, wanda_sp: 4.014 against
  3.996). Under ``dense`` each layer is fitted on ``calibrate``'s statistics either way (4.030
  both there).
- ``dense``: each layer on the statistics ``calibrate`` collected, on its own. One pass over
  the data in all, none at the pruning step.

Under ``pruned``, a pruner whose score is the fit's own residual (``flap`` with ``least_squares``:
``Pruner.reselects_on_pruned_inputs``) also chooses *which* channels go on those inputs: a group
whose readers all sit in one wave (heads at ``o_proj``, FFN channels at ``down_proj``, a conv's
output channels at the next conv) stays whole until that wave, and then loses as many channels as
the step's selection took from it, the ones whose removal the fit restores best on the inputs the
earlier waves left (the greedy Optimal-Brain-Surgeon residual of the fit from the pruned inputs
to the dense output). The counts, and every group read in several waves (the hidden size), stay
as the selection chose them from ``calibrate``'s statistics.

A layer without a bias: a BatchNorm that its output alone feeds takes the shift in its
``running_mean`` (exact in eval mode). Otherwise the shift is skipped with a note: a bias
created now would not be in the captured graph, and ``compact()`` would drop it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from fxprune.adapters.torch_attention import (projection_bias, reads_inputs_unobserved, register_layer_hooks,
                                              separate_projection)
from fxprune.calibration import LayerStats, feature_rows, inference, require_calibration, tap_sums, weight_out_in
from fxprune.errors import PruningError
from fxprune.selection import choose_kept
from fxprune import norms as norm_switches

if TYPE_CHECKING:
    from fxprune.api import Pruning
    from fxprune.pruners import Pruner

__all__ = ["compensate", "bias_target", "damp_", "DAMPING"]

DAMPING = 0.01


def damp_(inner: torch.Tensor) -> torch.Tensor:
    """The fit's ridge, in place: ``DAMPING`` times the mean diagonal (1e-8 where that is zero or empty)."""
    diag = inner.diagonal()
    mean = float(diag.mean()) if diag.numel() else 0.0
    diag += DAMPING * mean if mean > 0 else 1e-8
    return inner


@torch.no_grad()
def compensate(pruning: "Pruning", pruner: "Pruner | list[Pruner]", kept: dict[int, np.ndarray]) -> None:
    """Re-fit every consumer that loses input channels when ``kept`` (group index -> keep mask) is applied.
    ``pruner``: the step's pruner, or the pruners stepping together (the same compensation settings), whose
    layers are then fitted as one pruner's would be."""
    pruners = list(pruner) if isinstance(pruner, (list, tuple)) else [pruner]
    config = pruners[0].config
    mode = config.compensation
    stats = require_calibration(pruning.calibration, f"compensation {mode!r}")
    skipped: dict[str, list[str]] = {"unseen": [], "gram": [], "bias": [], "normed": []}
    owners: dict[str, "Pruner"] = {}  # layer -> the pruner of the step whose channels it reads (for its notes)
    changes = [c for c in _consumer_changes(pruning, pruners, kept, stats, skipped["unseen"], owners) if c[2].any()]
    with _restored_on_error(pruning, changes, kept) as before:
        if config.compensation_inputs == "pruned" and changes:
            moments = _replayed(pruning, pruners, kept, changes, mode, before)
        else:
            moments = ((layer, keep, _dense_moments(layer, keep, mode), None) for layer, keep, _ in changes)
        for layer, keep, (cross, inner, taps, kept_taps), weight in moments:
            _refit(pruning, layer, keep, mode, cross, inner, taps, kept_taps, skipped, weight)
    if skipped["normed"]:  # every layer given its mean only: keep those whose output a norm layer normalises
        normed = set().union(*(g.writers for g in pruning.groups if g.normalized))
        skipped["normed"] = [n for n in skipped["normed"] if n in normed]
    for key, why in (("unseen", "saw no calibration input: their removed inputs are not compensated"),
                     ("gram", "have no input Gram matrix (more input features than calibrate()'s max_gram_features, "
                              "or calibrate(gram=False)): their removed inputs are compensated by their mean only"),
                     ("bias", "have no bias and no BatchNorm of their own after them: the mean of their removed inputs "
                              "is not compensated (a new bias would not be in the captured graph)"),
                     ("normed", "write channels that a norm layer (LayerNorm, RMSNorm, GroupNorm) then divides by "
                                "their root mean square, and were compensated by their mean only: the removed "
                                "channels' mean is restored, their fluctuation is not, so after the norm the mean's "
                                "share grows over the dense model's (on a byte-level Llama at 50%, 42% of the final "
                                "norm's input energy against 21% dense, and a higher perplexity than no "
                                "compensation): least_squares restores both")):
        for owner in pruners:
            names = [n for n in skipped[key] if owners.get(n, pruners[0]) is owner]
            if names:
                owner._note(f"{len(names)} layers ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) {why}")


@contextlib.contextmanager
def _restored_on_error(pruning: "Pruning", changes, kept: dict[int, np.ndarray]):
    """Undo a step that fails part-way (a batch that raises on replay, an interrupt): the weights and bias
    targets it re-fits, the members its masks zero and the kept channels it set go back to what they were,
    so the step can be retried. Yields the saved tensors by name (every name of a shared one): the model's
    state before the step where the step changes it, what the sequential fit runs as the dense model."""
    named = {**dict(pruning.model.named_parameters(remove_duplicate=False)),
             **dict(pruning.model.named_buffers(remove_duplicate=False))}
    wanted = [t for layer, _, _ in changes for t in (named[layer.weight], (bias_target(pruning, layer) or (None,))[0])]
    wanted = [t._base if t is not None and t._base is not None else t for t in wanted]  # a bias that is a view
    wanted += [named.get(m.name) for g, k in kept.items() if not np.array_equal(k, pruning._kept[g])
               for m in pruning.groups[g].parameters]
    ids = {id(t) for t in wanted if t is not None}
    clones: dict[int, torch.Tensor] = {}
    saved = {name: clones.setdefault(id(t), t.detach().clone()) for name, t in named.items() if id(t) in ids}
    kept_before = {g: k.copy() for g, k in pruning._kept.items()}
    try:
        yield saved
    except BaseException:
        with torch.no_grad():
            for name, t in saved.items():
                named[name].copy_(t)
        pruning._kept = kept_before
        pruning._build_masks()
        raise


def _refit(pruning: "Pruning", layer: LayerStats, keep: np.ndarray, mode: str, cross, inner, taps: torch.Tensor,
           kept_taps: torch.Tensor, skipped: dict[str, list[str]], weight: torch.Tensor | None = None) -> None:
    """Write one layer's re-fit: the kept columns (``least_squares`` with moments) and the bias shift that
    restores its mean output. ``cross`` = E[x_target x_K^T] and ``inner`` = E[x_K x_K^T] (centred where the
    layer takes a shift); ``taps`` / ``kept_taps``: the mean input each kernel tap reads, of the inputs the
    dense layer saw and of the kept inputs it sees now. ``weight``: the layer's weight before the step, where
    the model's own has been masked already."""
    params = dict(pruning.model.named_parameters(remove_duplicate=False))
    view = weight_out_in(params[layer.weight], layer)
    w = weight_out_in(params[layer.weight] if weight is None else weight, layer).detach().double().cpu()
    target = bias_target(pruning, layer)
    kept = torch.from_numpy(np.flatnonzero(keep))
    if mode == "least_squares" and cross is not None:
        if target is None:  # no intercept: the fit on uncentred moments, no shift
            cross, inner = cross[0], inner[0]
        else:
            cross, inner = cross[1], inner[1]
        inner = damp_(inner.clone())
        try:
            fit = torch.linalg.solve(inner, cross.T).T  # inner is symmetric: fit = cross @ inner^-1
        except RuntimeError:
            fit = cross @ torch.linalg.pinv(inner)
        refit = torch.einsum("oit,ik->okt", w, fit)
        view[:, kept, :] = refit.to(view.dtype).to(view.device)
    else:
        if mode == "least_squares":
            skipped["gram"].append(layer.module)
        refit = w[:, kept]
    mean_only = mode == "bias" or cross is None
    if target is None:
        if mean_only:
            skipped["bias"].append(layer.module)
        return
    if mean_only:
        skipped["normed"].append(layer.module)
    shift = torch.einsum("oit,it->o", w, taps) - torch.einsum("okt,kt->o", refit, kept_taps)
    tensor, sign = target
    tensor.add_((sign * shift).to(tensor.dtype).to(tensor.device))


def _dense_moments(layer: LayerStats, keep: np.ndarray, mode: str):
    """(cross, inner, taps, kept taps) from ``calibrate``'s statistics: the kept inputs are the dense ones.
    ``cross`` and ``inner`` are (uncentred, centred) pairs, or None without a Gram."""
    kept = torch.from_numpy(np.flatnonzero(keep))
    taps = layer.tap_mean
    if mode != "least_squares" or layer.gram is None:
        return None, None, taps, taps[kept]
    gram, mean = layer.gram, layer.mean
    centred = gram - torch.outer(mean, mean)
    return ((gram[:, kept], centred[:, kept]), (gram[kept][:, kept], centred[kept][:, kept]), taps, taps[kept])


class _Pair:
    """Float64 sums over the feature vectors a layer reads in the dense copy and in the pruned model at once."""

    def __init__(self, layer: LayerStats, keep: np.ndarray, conv, gram: bool, device: torch.device):
        self.layer, self.conv = layer, conv
        self.kept = torch.from_numpy(np.flatnonzero(keep)).to(device)
        n, k = len(keep), len(self.kept)
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.rows, self.sum_dense, self.sum_kept = zeros(), zeros(n), zeros(k)
        self.cross, self.inner = (zeros(n, k), zeros(k, k)) if gram else (None, None)
        taps = conv.weight[0, 0].numel() if conv is not None else 1
        self.positions, self.taps_dense, self.taps_kept = zeros(), zeros(n, taps), zeros(k, taps)
        self.pending: list[torch.Tensor] = []  # dense inputs waiting for the pruned model's call

    def add(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        if dense.shape != pruned.shape:
            raise RuntimeError(f"{self.layer.module} read inputs of shape {tuple(dense.shape)} in the dense copy and "
                               f"{tuple(pruned.shape)} in the pruned model: their calls do not pair up")
        n = self.sum_dense.numel()
        d = feature_rows(dense, self.layer.batched_dims, n)
        p = feature_rows(pruned, self.layer.batched_dims, n)[:, self.kept]
        self.rows += d.shape[0]
        self.sum_dense += d.sum(0)
        self.sum_kept += p.sum(0)
        if self.cross is not None:
            self.cross += d.T @ p
            self.inner += p.T @ p
        if self.conv is None:
            self.positions += d.shape[0]
            self.taps_dense += d.sum(0)[:, None]
            self.taps_kept += p.sum(0)[:, None]
        else:
            positions, sums = tap_sums(dense.detach(), self.conv, self.layer.batched_dims)
            self.positions += positions
            self.taps_dense += sums
            self.taps_kept += tap_sums(pruned.detach(), self.conv, self.layer.batched_dims)[1][self.kept]

    def add_pruned(self, pruned: torch.Tensor) -> None:
        """The pruned model's input of this layer, paired with the dense copy's input of the same call."""
        if self.pending:
            self.add(self.pending.pop(0), pruned)

    SUMS = ("rows", "sum_dense", "sum_kept", "positions", "taps_dense", "taps_kept", "cross", "inner")

    def restrict(self, keep: np.ndarray) -> None:
        """Keep the sums of the inputs ``keep`` leaves (a subset of those summed over): a group chosen again."""
        sel = torch.from_numpy(np.asarray(keep, dtype=bool)[self.kept.cpu().numpy()])  # the sums are on the CPU
        self.kept = self.kept[sel.to(self.kept.device)]
        self.sum_kept, self.taps_kept = self.sum_kept[sel], self.taps_kept[sel]
        if self.cross is not None:
            self.cross, self.inner = self.cross[:, sel], self.inner[sel][:, sel]

    def to_cpu(self) -> None:
        """Move the sums to the CPU, where the fit is solved (after they were all-reduced on the device)."""
        for name in self.SUMS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).cpu())

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.SUMS if getattr(self, name) is not None]

    def moments(self):
        rows, positions = max(float(self.rows), 1.0), max(float(self.positions), 1.0)
        taps, kept_taps = self.taps_dense / positions, self.taps_kept / positions
        if self.cross is None:
            return None, None, taps, kept_taps
        mean_d, mean_k = self.sum_dense / rows, self.sum_kept / rows
        cross, inner = self.cross / rows, self.inner / rows
        return ((cross, cross - torch.outer(mean_d, mean_k)), (inner, inner - torch.outer(mean_k, mean_k)),
                taps, kept_taps)


def _replayed(pruning: "Pruning", pruners: "list[Pruner]", kept: dict[int, np.ndarray], changes, mode: str,
              before: dict[str, torch.Tensor]):
    """Per changed layer, wave by wave, (layer, keep, moments) measured on the pruned model as re-fitted so far;
    the caller writes each wave's fits before the next wave runs (this is a generator). The fourth item is
    the layer's weight before the step (the model's own is masked by then). ``before``: the tensors the step
    changes, as they were; with them (and the norm switches as they were) swapped in, the model runs as it
    was before the step, so the dense side of each pair costs no copy of the model. The groups that are
    chosen again in their wave (:func:`_reselectable`) get their new keep masks in ``kept``."""
    batches = pruning._calibration_batches
    if batches is None:
        raise PruningError("compensation_inputs 'pruned' runs the calibration batches again, and this pruning object "
                           "has statistics but not the batches (loaded with load_state_dict): call "
                           "pruning.calibrate(batches) again, or set compensation_inputs: 'dense'")
    model = pruning.model
    then = norm_switches.switches(model)
    waves = _waves(pruning.captured.graph_module, {layer.weight for layer, _, _ in changes})
    reads = _inputs_of(pruning, pruning.calibration)
    later = _reselectable(pruning, pruners, kept, changes, waves, reads) if mode == "least_squares" else {}
    chosen = dict(kept)
    # every group's keep mask as the pruned model has it: a group chosen again stays as it was until its wave
    now = {**pruning._kept, **kept, **{g: pruning._kept[g] for g in later}}
    pruning.set_kept(now)  # masks applied now, so the pruned model reads the inputs it will have
    switched = (then, norm_switches.switches(model))  # the norm switches before and after the step
    dense_side = [False]
    for wave in sorted(set(waves.values())):
        pairs = {}
        handles = []
        try:
            for layer, _, _ in changes:
                if waves[layer.weight] != wave:
                    continue
                conv = model.get_submodule(layer.module) if layer.batched_dims and layer.groups == 1 else None
                wants_gram = mode == "least_squares" and layer.sum.numel() <= pruning.calibration.max_gram_features
                device = model.get_parameter(layer.weight).device
                keep = _keep_of(reads[layer.module][1], now)  # a group chosen in this wave: whole as before
                pair = pairs[layer.module] = _Pair(layer, keep, conv, wants_gram, device)
                handles += register_layer_hooks(model, layer.module, _paired(pair, dense_side))
            with inference(model) as run:
                for batch in batches:
                    with _as_before(model, before, switched):
                        dense_side[0] = True
                        try:
                            run(batch)
                        finally:
                            dense_side[0] = False
                    run(batch)
                    for pair in pairs.values():
                        pair.pending.clear()
        finally:
            for h in handles:
                h.remove()
        for pair in pairs.values():
            if dist.is_available() and dist.is_initialized():
                for t in pair.tensors():
                    dist.all_reduce(t)
            pair.to_cpu()
        here = [g for g, w in later.items() if w == wave]
        if here:
            for g in here:
                chosen[g] = _choose_again(pruning, pruning.groups[g], kept[g], now[g], pairs, before, reads)
            now.update({g: chosen[g] for g in here})
            pruning.set_kept(now)
            switched = (then, norm_switches.switches(model))
            for pair in pairs.values():
                pair.restrict(_keep_of(reads[pair.layer.module][1], now))
        for pair in pairs.values():
            yield pair.layer, _keep_of(reads[pair.layer.module][1], now), pair.moments(), before[pair.layer.weight]
        pruning.apply_masks()  # a re-fitted layer that also loses outputs: those rows are zero again
    kept.update(chosen)  # the caller applies these


def _paired(pair: _Pair, dense_side: list[bool]):
    """One layer's input: queued on the dense side of a batch, paired with the queue on the pruned side."""
    def observe(x: torch.Tensor) -> None:
        if dense_side[0]:
            pair.pending.append(x)
        else:
            pair.add_pruned(x)

    return observe


@contextlib.contextmanager
def _as_before(model: torch.nn.Module, before: dict[str, torch.Tensor], switched: tuple[dict, dict]):
    """``model`` with the tensors of ``before`` in place of its own and its norm switches as before the step
    (``switched``: the switches before and after it): slots are swapped, nothing is copied, and all is put back
    on exit."""
    slots = []
    then, now = switched
    try:
        for name, tensor in before.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            store = module._parameters if attr in module._parameters else module._buffers
            slots.append((store, attr, store[attr]))
            store[attr] = tensor
        norm_switches.set_switches(model, then, now)
        yield
    finally:
        for store, attr, tensor in reversed(slots):
            store[attr] = tensor
        norm_switches.set_switches(model, now, then)


def _waves(gm: torch.fx.GraphModule, weights: set[str]) -> dict[str, int]:
    """Per weight, the wave of the layer using it: the number of changed layers on the longest path to it in
    the graph (0: it reads nothing a changed layer wrote). A weight the graph does not read is in wave 0."""
    depth: dict[torch.fx.Node, int] = {}
    wave: dict[str, int] = {w: 0 for w in weights}
    for node in gm.graph.nodes:  # topological order
        inputs = node.all_input_nodes
        d = max((depth[a] for a in inputs), default=0)
        mine = [a.target for a in inputs if a.op == "get_attr" and a.target in weights]
        for w in mine:
            wave[w] = max(wave[w], d)
        depth[node] = d + 1 if mine else d
    return wave


def _consumer_changes(pruning: "Pruning", pruners: "list[Pruner]", kept: dict[int, np.ndarray], stats,
                      unseen: list[str], owners: dict[str, "Pruner"]):
    """(layer statistics, inputs kept after the step, inputs this step removes) per consumer the step touches;
    ``owners`` gets, per layer named, the first of ``pruners`` whose group it reads."""
    touched: set[str] = set()
    for pruner, g in ((pruner, g) for pruner in pruners for g in pruner.groups):
        for m in g.parameters:
            layer = stats.for_parameter(m.name)
            if layer is not None and layer.is_consumer(m.dim):
                touched.add(layer.module)
                owners.setdefault(layer.module, pruner)
            elif layer is not None and m.dim == layer.in_dim and layer.groups == 1 and not kept[g.index].all():
                unseen.append(layer.module)
                owners.setdefault(layer.module, pruner)
            elif (layer is None and not kept[g.index].all()
                  and reads_inputs_unobserved(pruning.model, m.name, m.dim)):
                unseen.append(m.name)
                owners.setdefault(m.name, pruner)
    changes = []
    for module, (layer, reads) in _inputs_of(pruning, stats).items():
        if module in touched:
            new, old = _keep_of(reads, {**pruning._kept, **kept}), _keep_of(reads, pruning._kept)
            changes.append((layer, new, old & ~new))
    return changes


def _inputs_of(pruning: "Pruning", stats) -> dict[str, tuple[LayerStats, list[tuple[int, np.ndarray]]]]:
    """Per measured consumer layer (its module name): its statistics and, per group whose channels it reads,
    (group index, the group channel of each of its inputs: -1 where the input is not the group's)."""
    out: dict[str, tuple[LayerStats, list]] = {}
    for g in pruning.groups:
        for m in g.parameters:
            layer = stats.for_parameter(m.name)
            if layer is not None and layer.is_consumer(m.dim):
                out.setdefault(layer.module, (layer, []))[1].append((g.index, m.atoms))
    return out


def _keep_of(reads: list[tuple[int, np.ndarray]], kept: dict[int, np.ndarray]) -> np.ndarray:
    """A consumer's kept inputs when its groups keep ``kept`` (``reads``: as :func:`_inputs_of` gives them)."""
    keep = np.ones(len(reads[0][1]), dtype=bool)
    for g, atoms in reads:
        valid = atoms >= 0
        keep[valid] &= np.asarray(kept[g], dtype=bool)[atoms[valid]]
    return keep


def _reselectable(pruning: "Pruning", pruners: "list[Pruner]", kept: dict[int, np.ndarray], changes,
                  waves: dict[str, int], reads) -> dict[int, int]:
    """The groups whose channels the sequential fit chooses again, each with its wave: those whose pruner
    scores them by the fit's residual where they are read (``reselects_on_pruned_inputs``), that lose channels
    in this step, have no concatenated pieces and no norm over their channels (removing some would change the
    others' values), and whose every reader is a measured consumer with an input Gram, fitted in one wave,
    that loses no other group's inputs in this step. Their channels reach no layer before that wave, so
    choosing them there changes no input an earlier wave was fitted on. ``reads``: :func:`_inputs_of`."""
    stats = pruning.calibration
    removed = {layer.module: gone for layer, _, gone in changes}
    out: dict[int, int] = {}
    for pruner in pruners:
        for group in pruner.groups:
            g = group.index
            if np.array_equal(kept[g], pruning._kept[g]) or len(group.parts) or group.normalized:
                continue
            readers, ok = set(), True
            for m in group.parameters:
                layer = stats.for_parameter(m.name)
                if layer is None:
                    ok &= not reads_inputs_unobserved(pruning.model, m.name, m.dim)
                elif layer.is_consumer(m.dim):
                    readers.add(layer.module)
                    ok &= pruner.reselects_on_pruned_inputs(m)
                else:
                    ok &= not (m.dim == layer.in_dim and layer.groups == 1)
            if not ok or not readers or not readers <= removed.keys():
                continue
            if len({waves[reads[r][0].weight] for r in readers}) != 1:
                continue
            if any(reads[r][0].sum.numel() > stats.max_gram_features for r in readers):
                continue
            if any((removed[r] & (_group_atoms(reads[r][1], g) < 0)).any() for r in readers):
                continue
            out[g] = waves[reads[next(iter(readers))][0].weight]
    return out


def _group_atoms(reads: list[tuple[int, np.ndarray]], g: int) -> np.ndarray:
    """Per input of a consumer, group ``g``'s channel it is (-1: another group's, or none)."""
    out = np.full(len(reads[0][1]), -1)
    for gi, atoms in reads:
        if gi == g:
            out = np.where(atoms >= 0, atoms, out)
    return out


def _choose_again(pruning: "Pruning", group, selected: np.ndarray, before_step: np.ndarray,
                  pairs: dict[str, "_Pair"], before: dict[str, torch.Tensor], reads) -> np.ndarray:
    """``group``'s keep mask with as many channels removed as ``selected`` removes, chosen among
    ``before_step`` (those kept before the step) by the residual of the fit from each reader's pruned inputs
    to its dense output: with ``V`` that fit over all its inputs and ``G`` their damped second moment,
    removing the inputs ``S`` and re-fitting leaves ``tr(V_S (G^-1)_SS^-1 V_S^T)``
    (:func:`fxprune.calibrated.refit_residual_scores`, the cheapest eliminated first). ``pairs``: the wave's
    moments, each over the inputs its layer keeps with this group as before the step. Where the scores are
    not finite (a singular fit), the selection's choice stands."""
    from fxprune.calibrated import in_loss, loss_weighted, refit_residual_scores

    score = np.zeros(group.size)
    readers = [(pair, atoms) for pair in pairs.values()
               if ((atoms := _group_atoms(reads[pair.layer.module][1], group.index)) >= 0).any()]
    weigh = in_loss([pair.layer for pair, _ in readers], pruning.calibration)
    for pair, atoms in readers:
        (cross, cross_c), (inner, inner_c), _, _ = pair.moments()
        if bias_target(pruning, pair.layer) is not None:
            cross, inner = cross_c, inner_c
        inner = damp_(inner.clone())
        try:
            fit = torch.linalg.solve(inner, cross.T).T
        except RuntimeError:
            return selected
        w = weight_out_in(before[pair.layer.weight], pair.layer).detach().double().cpu()
        candidates = pair.kept.cpu().numpy()
        if weigh:
            w = loss_weighted(w, pair.layer)
        score += refit_residual_scores(torch.einsum("oit,ik->okt", w, fit), inner, atoms[candidates], group.size)
    if not np.isfinite(score).all():
        return selected
    score[~before_step] = -np.inf  # removed before this step: they stay removed
    return choose_kept(score, int((~selected).sum()))


def bias_target(pruning: "Pruning", layer: LayerStats) -> tuple[torch.Tensor, float] | None:
    """Where a shift of the layer's output goes: its bias (+), else its BatchNorm's running mean (-), else None."""
    separate = separate_projection(pruning.model, layer.weight)
    if separate is not None:  # an attention's separate q/k/v weight: its third of in_proj_bias
        bias = projection_bias(*separate)
        return None if bias is None else (bias, 1.0)
    module = pruning.model.get_submodule(layer.module)
    # the bias beside the weight: ``bias`` for ``weight``, ``in_proj_bias`` for an attention's ``in_proj_weight``
    bias = getattr(module, layer.weight.rpartition(".")[2].removesuffix("weight") + "bias", None)
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
