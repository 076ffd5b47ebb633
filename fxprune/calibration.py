"""Activation statistics from calibration data, for pruning without fine-tuning.

Criteria such as Wanda-SP and FLAP rank channels by what flows through them, and
compensation re-fits the kept weights to what the removed ones contributed; both need the
layers' input statistics. ``pruning.calibrate(batches)`` runs the masked model over the
batches once and streams, per prunable layer (``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging
Face's ``Conv1D`` and ``nn.MultiheadAttention``'s input projections, packed or separate q/k/v, whose
weights are group members), sums in float64: per input feature the sum
and sum of squares, per output feature the same, and for layers that consume a group's
channels the second moment ``sum x x^T`` of their inputs. No activation is stored.

A conv's second moment is the channel Gram over pixels: every position's ``C_in`` vector
counts as one sample, so memory is ``C_in^2`` whatever the kernel. It is exact for 1x1 convs
and Linear layers; for a kxk conv it treats every kernel tap as seeing the same channel
covariance and ignores the correlation between neighbouring pixels (least squares then
re-fits each tap with the same map). The Gram is collected only where it is used (a pruner
with ``compensation: least_squares`` on ``compensation_inputs: dense``, ``flap`` under
``least_squares``, which scores with it, or ``calibrate(gram=True)``), and not for layers with
more input features than ``max_gram_features`` (4096: 128 MB in float64). Compensation on pruned
inputs (the default) does not use them: it measures its own moments at the pruning step, one wave
of layers at a time, so with another criterion ``calibrate()`` then holds no matrix at all.

``calibrate(batches, loss=fn)`` also backpropagates ``fn(output, batch)`` to the outputs of the layers that
read pruned channels (only there: no parameter gradient is computed) and keeps the second moment of the
loss gradient at each, ``E[g g^T]`` (its diagonal for outputs wider than ``max_gram_features``). ``flap``
then measures an output error ``d`` as ``d^T E[g g^T] d``, the loss increase the Kronecker-factored Fisher
predicts, instead of ``|d|^2``: outputs the loss does not read cost nothing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree
from tqdm import tqdm

from fxprune.adapters.hf_attention import is_transposed_linear
from fxprune.adapters.torch_attention import (SEPARATE_PROJECTIONS, owning_attention, packed_in_projection,
                                              register_layer_hooks, separate_projection)
from fxprune.batch_norms import reestimate_batch_norms
from fxprune.errors import PruningError

if TYPE_CHECKING:
    from fxprune.api import Pruning
    from fxprune.pruners import Pruner

__all__ = ["Calibration", "CalibrationStats", "LayerStats", "require_calibration"]


@dataclass
class LayerStats:
    """Float64 sums over every input (and output) feature vector a layer saw during calibration.

    ``in_dim`` / ``out_dim`` are the weight dims of its input and output features (Linear and
    conv: 1 and 0; Hugging Face ``Conv1D``: 0 and 1). A conv's sums run over its pixels, channel by channel.
    """

    module: str
    weight: str
    in_dim: int
    out_dim: int
    groups: int
    batched_dims: int  # dims of a batched conv input (its channels at 1, else at 0); 0: features last
    rows: torch.Tensor  # feature vectors seen (a float64 scalar, so it all-reduces with the sums)
    sum: torch.Tensor
    sum_sq: torch.Tensor
    out_rows: torch.Tensor
    out_sum: torch.Tensor
    out_sum_sq: torch.Tensor
    gram_sum: torch.Tensor | None = None
    conv: nn.Module | None = None  # a conv consumer: its geometry, for what each kernel tap reads
    tap_rows: torch.Tensor | None = None  # output positions seen
    tap_sum: torch.Tensor | None = None  # (in, taps): the input each tap reads, summed over output positions
    # calibrate(loss=...): output feature vectors of the calls watched (a call the loss does not reach counts, with
    # a zero gradient), how many of those calls a gradient reached, and the gradient's sums at the layer's output
    grad_rows: torch.Tensor | None = None
    grad_calls: torch.Tensor | None = None
    grad_sum_sq: torch.Tensor | None = None  # (out,): sum g^2
    grad_gram_sum: torch.Tensor | None = None  # (out, out): sum g g^T, for outputs up to max_gram_features wide

    @property
    def grad_moment(self) -> torch.Tensor | None:
        """The second moment of the loss gradient at the layer's output over its output feature vectors: ``E[g g^T]``
        (out, out), or its diagonal ``E[g^2]`` (out,) for a wider output; None where no gradient was seen."""
        if self.grad_calls is None or float(self.grad_calls) == 0:
            return None
        return _per_row(self.grad_sum_sq if self.grad_gram_sum is None else self.grad_gram_sum, self.grad_rows)

    @property
    def count(self) -> int:
        return int(self.rows)

    @property
    def mean(self) -> torch.Tensor:
        return _per_row(self.sum, self.rows)

    @property
    def mean_sq(self) -> torch.Tensor:
        return _per_row(self.sum_sq, self.rows)

    @property
    def var(self) -> torch.Tensor:
        return (self.mean_sq - self.mean ** 2).clamp_min(0.0)

    @property
    def gram(self) -> torch.Tensor | None:
        """E[x x^T] over the input feature vectors."""
        return None if self.gram_sum is None else _per_row(self.gram_sum, self.rows)

    @property
    def tap_mean(self) -> torch.Tensor:
        """(in, taps): the mean input each kernel tap reads over the output positions, zero padding included;
        for a Linear layer its input mean. The mean output of the layer is ``sum W[:, i, t] tap_mean[i, t]``."""
        return self.mean[:, None] if self.tap_sum is None else _per_row(self.tap_sum, self.tap_rows)

    @property
    def out_mean(self) -> torch.Tensor:
        return _per_row(self.out_sum, self.out_rows)

    @property
    def out_mean_sq(self) -> torch.Tensor:
        return _per_row(self.out_sum_sq, self.out_rows)

    def is_consumer(self, dim: int) -> bool:
        """A member along ``dim`` of this weight reads the layer's input features one to one."""
        return dim == self.in_dim and self.groups == 1 and self.count > 0

    def is_producer(self, dim: int) -> bool:
        return dim == self.out_dim and self.out_rows > 0

    def _sums(self) -> list[str]:
        """The names of the sums this layer holds (every tensor field, in field order: the same on every rank)."""
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def _watch_gradient(self, watched: list[torch.Tensor], out):
        """Have the loss gradient at the layer's output ``out`` added to the gradient moments in the backward pass;
        returns a copy for the model to go on with, so an op that then changes it in place (``ReLU(inplace=True)``,
        ``+=``) does not bypass the output whose gradient is taken."""
        if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
            return None
        self.grad_rows += out.numel() // self.grad_sum_sq.numel()
        if not out.requires_grad:
            return None
        out.register_hook(self._add_gradient)
        watched.append(out)
        return out.clone()

    def _add_gradient(self, g: torch.Tensor) -> None:
        rows = feature_rows(g, self.batched_dims, self.grad_sum_sq.numel())
        self.grad_calls += 1
        self.grad_sum_sq += rows.square().sum(0)
        if self.grad_gram_sum is not None:
            self.grad_gram_sum += rows.T @ rows

    def _add(self, x: torch.Tensor, out: bool) -> None:
        rows = feature_rows(x, self.batched_dims, (self.out_sum if out else self.sum).numel())
        if out:
            self.out_rows += rows.shape[0]
            self.out_sum += rows.sum(0)
            self.out_sum_sq += rows.square().sum(0)
            return
        self.rows += rows.shape[0]
        self.sum += rows.sum(0)
        self.sum_sq += rows.square().sum(0)
        if self.gram_sum is not None:
            self.gram_sum += rows.T @ rows
        if self.conv is not None:
            positions, sums = tap_sums(x.detach(), self.conv, self.batched_dims)
            self.tap_rows += positions
            self.tap_sum += sums


def _per_row(total: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return total / max(float(rows), 1.0)


@dataclass
class CalibrationStats:
    """What :meth:`Calibration.calibrate` collected: :class:`LayerStats` per module name."""

    layers: dict[str, LayerStats]
    batches: int = 0
    missed: list[str] = field(default_factory=list)  # hooked layers whose forward never ran as a module
    max_gram_features: int = 4096  # the widest input a least-squares fit solves for (0: calibrate(gram=False))
    shifted: frozenset[str] = frozenset()  # layers whose output takes a bias shift (a bias, or a BatchNorm alone after)
    loss: bool = False  # calibrate(loss=...) measured the loss gradient at the consumers' outputs

    def for_parameter(self, name: str) -> LayerStats | None:
        """The statistics of the layer whose weight is parameter ``name`` (None if it has none)."""
        module, _, attr = name.rpartition(".")
        stats = self.layers.get(module)
        if stats is None and attr in SEPARATE_PROJECTIONS:  # an attention's separate projection: named by its weight
            stats = self.layers.get(name)
        # the attribute, not the whole name: a module under two names has one set of statistics, named once
        return stats if stats is not None and stats.weight.rpartition(".")[2] == attr else None


def feature_rows(x: torch.Tensor, batched_dims: int, features: int) -> torch.Tensor:
    """``x`` as float64 rows of ``features``, one per sample and position."""
    axis = -1 if not batched_dims else (1 if x.dim() == batched_dims else 0)
    return x.detach().movedim(axis, -1).reshape(-1, features).double()


def tap_sums(x: torch.Tensor, conv: nn.Module, batched_dims: int) -> tuple[int, torch.Tensor]:
    """(output positions, (C_in, taps) sums of the input each kernel tap reads there): padding is linear, so
    the batch is summed first and padded once, and each tap's strided window of it is summed."""
    total = x.double().sum(0) if x.dim() == batched_dims else x.double()  # (C, *spatial)
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "valid":
        pads = [(0, 0)] * len(kernel)
    elif conv.padding == "same":
        pads = [((d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2) for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in conv.padding]
    flat = [side for pad in reversed(pads) for side in pad]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = torch.nn.functional.pad(total[None], flat, mode=mode)[0] if any(flat) else total
    out = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(padded.shape[1:], kernel, stride, dilation)]
    sums = [padded[(slice(None), *(slice(j * d, j * d + (o - 1) * s + 1, s)
                                   for j, d, o, s in zip(tap, dilation, out, stride)))].sum(tuple(range(1, padded.dim())))
            for tap in itertools.product(*(range(k) for k in kernel))]
    samples = x.shape[0] if x.dim() == batched_dims else 1
    return samples * math.prod(out), torch.stack(sums, 1)


def _prunable_layer(model: nn.Module, name: str) -> tuple[nn.Module, str, str] | None:
    """(the module holding the layer's weight, the weight's attribute, the weight's parameter name) of the layer
    ``name`` (a module, or an attention's separate projection weight), else None."""
    separate = separate_projection(model, name)
    if separate is not None:
        return separate[0], name.rpartition(".")[2], name
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    attr = "in_proj_weight" if packed_in_projection(module) else "weight"  # a packed input projection's weight
    return module, attr, f"{name}.{attr}"


def called_as_module(model: nn.Module, name: str) -> bool:
    """Whether layer ``name``'s output is its own module's forward output (not an attention's projection, which
    its attention module computes from the weight)."""
    return separate_projection(model, name) is None and owning_attention(model, name) is None \
        and not packed_in_projection(model.get_submodule(name))


def _layer_kind(module: nn.Module, attr: str) -> tuple[int, int, int, int, int, int] | None:
    """(in_dim, out_dim, groups, batched_dims, in_features, out_features) of a prunable layer, else None."""
    if attr in SEPARATE_PROJECTIONS:  # (embed_dim, kdim or vdim): a Linear on the query, key or value
        weight = getattr(module, attr)
        return 1, 0, 1, 0, weight.shape[1], weight.shape[0]
    if packed_in_projection(module):  # nn.MultiheadAttention's in_proj_weight (3E, E): a Linear on the query
        return 1, 0, 1, 0, module.embed_dim, 3 * module.embed_dim
    if isinstance(module, nn.Linear):
        return 1, 0, 1, 0, module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1, 0, module.groups, module.weight.dim(), module.in_channels, module.out_channels
    if is_transposed_linear(module):  # Hugging Face GPT-2: weight (in, out)
        return 0, 1, 1, 0, module.weight.shape[0], module.nf
    return None


def _cross_attention(name: str, stats: LayerStats, layers: dict[str, LayerStats]) -> bool:
    """An attention module's input projection that saw nothing while its ``out_proj`` saw inputs: the module ran,
    as cross-attention (which it is not observed in; the graph slices the weight there, so its input channels are
    not prunable), not a layer calibration missed."""
    out_proj = layers.get(f"{name}.out_proj")
    return stats.weight.endswith(".in_proj_weight") and out_proj is not None and out_proj.count > 0


def require_calibration(stats: CalibrationStats | None, who: str) -> CalibrationStats:
    """The statistics, or an error that says how to collect them."""
    if stats is None:
        raise PruningError(f"{who} needs activation statistics and none were collected: call "
                           "pruning.calibrate(batches) before prune(), with batches an iterable of model inputs "
                           "(tensors, tuples of positional args or dicts of kwargs), e.g. 8-32 batches of "
                           "training data")
    return stats


class Calibration:
    """Calibration statistics and compensation; a part of :class:`fxprune.Pruning`.

    Reads ``model``, ``groups``, ``pruners``, ``_claimed`` and ``captured`` from the object it is
    part of; ``calibration`` is None until :meth:`calibrate` runs.
    """

    calibration: CalibrationStats | None = None
    _calibration_batches = None

    @torch.no_grad()
    def calibrate(self, batches: Iterable, progress: bool | None = None, gram: bool | None = None,
                  max_gram_features: int = 4096, loss: Callable | None = None) -> "Pruning":
        """Run ``pruning.model`` (eval mode, no grad unless ``loss``) over ``batches`` and keep its layers' input
        statistics.

        Each batch is a tensor, a tuple of positional arguments or a dict of keyword arguments, of any
        batch shape the model takes; tensors are moved to the model's device. A tqdm bar shows on a
        terminal unless ``progress=False``. ``gram``: collect the consumers' input
        Gram matrices (what ``compensation: least_squares`` on dense inputs solves with, and ``flap`` under
        ``least_squares`` scores with); None collects them when a pruner asks for that, and False also turns
        the least-squares fit on pruned inputs off (the removed inputs are then compensated by their mean).
        ``max_gram_features``: layers with wider inputs are compensated by their mean only (a fit solves a matrix
        of that side). ``loss``: ``loss(output, batch)``, a scalar tensor (e.g. ``lambda out, batch: out.loss`` for
        a Hugging Face model given ``labels`` in its batches; ``batch`` is on the model's device; a sum over the
        batch's positions weighs every position alike where batches differ in size, a mean weighs small batches
        more). Each batch is then also backpropagated, to the outputs of the layers that read the channels ``flap``
        prunes (no parameter gradient is computed; memory as for a training step), and those layers keep the
        second moment of the loss gradient at their output (``E[g g^T]``, its diagonal for outputs wider than
        ``max_gram_features``): ``flap`` then measures the output error it scores in loss (the Kronecker-factored
        Fisher, as in LLM Surgeon) instead of in squared outputs. Under ``torch.distributed`` the sums are
        all-reduced, so every rank
        prunes from the statistics of all ranks' batches. Call it before ``prune()``: it measures the
        model as it is now. Returns the pruning object; the statistics are ``pruning.calibration``.
        """
        solve_limit = 0 if gram is False else max_gram_features  # what a least-squares fit may solve for later
        if gram is None:
            gram = any((p.config.compensation == "least_squares" and p.config.compensation_inputs == "dense")
                       or getattr(p, "scores_with_gram", False) for p in self.pruners)
        replay = any(p.config.compensation != "none" and p.config.compensation_inputs == "pruned"
                     for p in self.pruners)
        if replay and iter(batches) is batches:
            raise ValueError(f"calibrate() got a one-pass iterator ({type(batches).__name__}), but compensation with "
                             "compensation_inputs 'pruned' runs the calibration batches again at each pruning step: "
                             "pass a list or a DataLoader, or set compensation_inputs: 'dense'")
        if loss is not None and not callable(loss):
            raise TypeError(f"calibrate(loss=...) takes a callable loss(output, batch) -> scalar tensor, not "
                            f"{type(loss).__name__}")
        if loss is not None and not any(getattr(p, "scores_in_loss", False) for p in self.pruners):
            raise ValueError("calibrate(loss=...) weighs the flap pruner's scores by the loss; none of this pruning's "
                             f"pruners ({', '.join(sorted({p.name for p in self.pruners}))}) uses it: leave loss out")
        watched: list[torch.Tensor] | None = [] if loss is not None else None
        layers, handles = self._hook_layers(gram, max_gram_features, watched)
        seen = 0
        try:
            with inference(self.model, grad=loss is not None) as run:
                total = len(batches) if hasattr(batches, "__len__") else None
                for batch in tqdm(batches, total=total, desc="calibration", leave=False,
                                  disable=True if progress is False else None):
                    if loss is None:
                        run(batch)
                    else:
                        batch = run.to_device(batch)
                        _backward_to(loss(run(batch), batch), watched)
                    seen += 1
        finally:
            for h in handles:
                h.remove()
        if not seen:
            raise ValueError("calibrate() got no batches: pass an iterable of model inputs (a list of tensors, "
                             "a DataLoader of inputs, ...)")
        unique = list({id(s): s for _, s in sorted(layers.items())}.values())  # a shared module's sums once
        if dist.is_available() and dist.is_initialized():
            for stats in unique:
                for name in stats._sums():
                    dist.all_reduce(getattr(stats, name))
        for stats in unique:
            for name in stats._sums():
                setattr(stats, name, getattr(stats, name).cpu())
        missed = sorted(n for n, s in layers.items() if s.count == 0 and not _cross_attention(n, s, layers))
        if missed:
            warnings.warn(f"calibration reached no input of {len(missed)} layers (e.g. {missed[0]}): their forward "
                          "never ran as a module (a fused path, or a weight read directly by a parent module); "
                          "channels only they hold are scored by |W|", UserWarning,
                          stacklevel=2)
        self.calibration = CalibrationStats(layers, seen, missed, solve_limit, self._shifted(layers), loss is not None)
        self._calibration_batches = batches if replay else None  # compensation runs them again
        for pruner in self.pruners:
            pruner.calibration = self.calibration
        return self

    def _shifted(self, layers: dict[str, LayerStats]) -> frozenset[str]:
        """The layers whose output a re-fit can shift (the fit then has an intercept), read from the graph."""
        from fxprune.compensation import bias_target
        return frozenset(name for name, s in layers.items() if bias_target(self, s) is not None)

    def _hook_layers(self, gram: bool, max_gram_features: int, watched: list[torch.Tensor] | None = None):
        """Accumulators and hooks for every prunable layer whose weight is a group member; with ``watched`` (a
        list the outputs to backpropagate to are put in), the consumers of pruned channels that are modules called
        as such also get the loss gradient's moments at their output."""
        members: set[str] = set()
        claimed: set[tuple[str, int]] = set()  # (layer, weight dim) of the members of the groups pruners own
        in_loss: set[tuple[str, int]] = set()  # those of the groups whose pruner scores in loss
        loss_groups = {g.index for p in self.pruners if getattr(p, "scores_in_loss", False) for g in p.groups}
        for g in self.groups:
            for m in g.parameters:
                module, _, attr = m.name.rpartition(".")
                # a layer is its module, but an attention's separate q/k/v projections are named by their weights
                layer = m.name if attr in SEPARATE_PROJECTIONS else module if attr in ("weight", "in_proj_weight") \
                    else None
                if layer is not None:
                    members.add(layer)
                    if g.index in self._claimed:
                        claimed.add((layer, m.dim))
                    if g.index in loss_groups:
                        in_loss.add((layer, m.dim))
        layers: dict[str, LayerStats] = {}
        handles = []
        by_object: dict[int, LayerStats] = {}
        for name in sorted(members):
            found = _prunable_layer(self.model, name)
            kind = None if found is None else _layer_kind(*found[:2])
            if kind is None:
                continue
            module, attr, weight_name = found
            weight = getattr(module, attr)
            if id(weight) in by_object:  # one layer under two names: one set of sums
                layers[name] = by_object[id(weight)]
                continue
            in_dim, out_dim, groups, batched, n_in, n_out = kind
            dev = weight.device
            zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=dev)  # noqa: E731
            wants_gram = gram and groups == 1 and (name, in_dim) in claimed and n_in <= max_gram_features
            conv = module if batched and groups == 1 and (name, in_dim) in claimed else None
            stats = LayerStats(name, weight_name, in_dim, out_dim, groups, batched, zeros(()), zeros(n_in),
                               zeros(n_in), zeros(()), zeros(n_out), zeros(n_out),
                               zeros((n_in, n_in)) if wants_gram else None, conv,
                               zeros(()) if conv is not None else None,
                               zeros((n_in, weight[0, 0].numel())) if conv is not None else None)
            layers[name] = by_object[id(weight)] = stats
            handles += register_layer_hooks(self.model, name, functools.partial(stats._add, out=False),
                                            functools.partial(stats._add, out=True))
            if watched is not None and groups == 1 and (name, in_dim) in in_loss and called_as_module(self.model, name):
                stats.grad_rows, stats.grad_calls, stats.grad_sum_sq = zeros(()), zeros(()), zeros(n_out)
                stats.grad_gram_sum = zeros((n_out, n_out)) if n_out <= max_gram_features else None
                handles.append(module.register_forward_hook(
                    lambda _, args, out, stats=stats: stats._watch_gradient(watched, out)))
        return layers, handles

    def _calibration_state(self) -> dict | None:
        """The statistics as tensors and plain values, for ``state_dict()`` (the batches themselves are not kept)."""
        stats = self.calibration
        if stats is None:
            return None
        layers = {name: {f.name: (getattr(s, f.name) is not None) if f.name == "conv" else getattr(s, f.name)
                         for f in fields(LayerStats)} for name, s in stats.layers.items()}
        return {"layers": layers, "batches": stats.batches, "missed": list(stats.missed),
                "max_gram_features": stats.max_gram_features, "loss": stats.loss}

    def _load_calibration_state(self, state: dict | None) -> None:
        """Statistics from ``_calibration_state``; a layer shared under two names gets one object again."""
        if state is None:
            self.calibration = None
        else:
            by_module: dict[str, LayerStats] = {}
            layers = {}
            for name, values in state["layers"].items():
                values = dict(values)
                values["conv"] = self.model.get_submodule(values["module"]) if values["conv"] else None
                if values["module"] not in by_module:
                    by_module[values["module"]] = LayerStats(**values)
                layers[name] = by_module[values["module"]]
            self.calibration = CalibrationStats(layers, state["batches"], list(state["missed"]),
                                                state.get("max_gram_features", 4096), self._shifted(layers),
                                                state.get("loss", False))
        self._calibration_batches = None  # not saved: compensation on pruned inputs needs calibrate() again
        for pruner in self.pruners:
            pruner.calibration = self.calibration

    def reestimate_batch_norms(self, batches: Iterable, progress: bool | None = None) -> "Pruning":
        """Measure the running mean and variance of every BatchNorm of ``pruning.model`` again on ``batches``
        (inputs as for :meth:`calibrate`), after ``prune()``: the layers before them lost or re-fitted
        channels, so the statistics of the dense model no longer describe their inputs. One pass, BatchNorms
        in train mode with a cumulative average, the rest in eval mode, no grad; weights and masks are not
        touched, so ``compact()`` still equals the masked model. Under ``torch.distributed`` the statistics
        are combined over ranks. Returns the pruning object."""
        with inference(self.model) as run:
            reestimate_batch_norms(self.model, batches, run, progress)
        return self

    def compensate(self, pruner: "Pruner | list[Pruner]", kept: dict[int, np.ndarray]) -> None:
        """Re-fit the consumers of the channels ``kept`` is about to remove (see :mod:`fxprune.compensation`);
        ``pruner``: the pruner of the step, or the pruners stepping together (they compensate alike)."""
        from fxprune.compensation import compensate  # it reads this module's statistics: imported late

        compensate(self, pruner, kept)


@contextlib.contextmanager
def inference(model: nn.Module, grad: bool = False):
    """``run(batch)`` runs ``model`` in eval mode without grad on one calibration batch (a tensor, a tuple of
    positional args or a dict of kwargs, moved to the model's device by ``run.to_device``); training flags are
    restored after. ``grad``: with grad instead, every floating parameter requiring it meanwhile (so a frozen
    model's outputs can be backpropagated; :func:`_backward_to` writes no parameter gradient)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = [(m, m.training) for m in model.modules()]
    frozen = [p for p in model.parameters() if grad and p.is_floating_point() and not p.requires_grad]
    fastpath = torch.backends.mha.get_fastpath_enabled()

    def to_device(batch):
        return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)

    def run(batch):
        batch = to_device(batch)
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)

    run.to_device = to_device
    # the fused encoder-layer path skips the Linear modules, so their hooks would see nothing
    torch.backends.mha.set_fastpath_enabled(False)
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad() if grad else torch.no_grad():
            yield run
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes:
            m.training = mode
        for p in frozen:
            p.requires_grad_(False)


def _backward_to(value, watched: list[torch.Tensor]) -> None:
    """Backpropagate a calibration loss to the watched layer outputs only (their hooks take the gradient; no
    ``.grad`` is written), then forget them."""
    try:
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()):
            got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                   else type(value).__name__)
            hint = " (a Hugging Face model returns loss None without labels in its batches)" if value is None else ""
            raise TypeError(f"calibrate(loss=...) must return a scalar floating tensor, got {got}{hint}")
        if watched and not value.requires_grad:
            raise ValueError("calibrate(loss=...) returned a loss that does not depend on the model's outputs with "
                             "grad (computed from detached tensors or under torch.no_grad()): no gradient to measure")
        if watched:
            torch.autograd.grad(value.reshape(()), watched, allow_unused=True)
    finally:
        watched.clear()


def member_channel_sum(values: torch.Tensor | np.ndarray, atoms: np.ndarray, size: int) -> np.ndarray:
    """Per group channel, the sum of ``values`` (one per index of a member's dim) over the indices it owns."""
    v = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    valid = atoms >= 0
    return np.bincount(atoms[valid], weights=v.astype(np.float64)[valid], minlength=size)


def weight_out_in(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """A (out, in, taps) view of a layer's weight, whatever its layout; writing to it writes the weight."""
    w = weight.t() if stats.in_dim == 0 else weight  # Hugging Face Conv1D stores (in, out)
    return w.unsqueeze(-1) if w.dim() == 2 else w.flatten(2)

