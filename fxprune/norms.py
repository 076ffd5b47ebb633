"""Norm layers that compute their statistics over kept channels only.

Zeroing a channel of a transformer's hidden size does not remove it from
LayerNorm/RMSNorm statistics: the mean and variance still count it. A model with
the channel *removed* normalises over fewer channels. So that pruning the hidden
size stays exact (compact model == masked model), the masked model's norm layers
whose statistics span pruned channels are switched to run on the kept channels
(and their slice of weight and bias) and write zeros elsewhere. This is what the
compact model computes, and what fine-tuning then adapts to.

The switch is an instance-level ``forward`` on those modules only; it reads its
state from the module (so ``.to(device)``, ``deepcopy`` and DDP carry it) and is
removed again when the layer's channels are all kept. A switched norm also carries a
no-op forward pre-hook: fused paths that read a norm's weights without calling it
(``nn.TransformerEncoderLayer``'s inference fast path, taken under ``no_grad`` in eval
mode) are turned off by torch when a submodule has hooks, so the switch is never skipped.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import PruningError
from fxprune.passes.couplings import PARAM_PREFIX

__all__ = ["sync_norms", "unpatch_norms", "narrowed_shape", "switches", "set_switches", "STATE"]

STATE = "_fxprune_norm"


def _masked_norm_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs):
    dim, stat_dim, size, index, params, through = getattr(self, STATE)
    if not isinstance(x, torch.Tensor) or x.dim() < -dim or x.shape[dim] != size:
        raise PruningError(f"{type(self).__name__} was pruned for inputs with {size} channels at dim {dim}, got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if index.device != x.device:
        index = index.to(x.device)
        setattr(self, STATE, (dim, stat_dim, size, index, params, through))
    saved = {}
    shape = getattr(self, "normalized_shape", None)
    try:
        for name, (pdim, pindex) in params.items():
            saved[name] = p = self._parameters[name]
            self._parameters[name] = p.index_select(pdim, pindex.to(p.device))
        narrowed = narrowed_shape(shape, stat_dim, len(index))
        if narrowed is not None:
            self.normalized_shape = narrowed
        y = type(self).forward(self, x.index_select(dim, index), *args, **kwargs)
    finally:
        self._parameters.update(saved)
        if shape is not None:
            self.normalized_shape = shape
    if not through:  # its output holds other channels (a weight-standardised conv's outputs)
        return y
    if not isinstance(y, torch.Tensor) or y.dim() != x.dim() or y.shape[dim] != len(index):
        raise PruningError(f"{type(self).__name__} does not keep its input's channels at dim {dim}; "
                           "its statistics cannot be restricted to kept channels")
    out_shape = list(y.shape)
    out_shape[dim] = size
    return y.new_zeros(out_shape).index_copy(dim % y.dim(), index, y)


def narrowed_shape(shape, stat_dim: int, kept: int):
    """A norm's ``normalized_shape`` with ``kept`` channels at ``stat_dim``; None if it has no such entry."""
    if not isinstance(shape, (tuple, list)) or -len(shape) > stat_dim:
        return None
    new = list(shape)
    new[stat_dim] = kept
    return type(shape)(new)


class _KeptChannelsForward:
    """The instance-level ``forward``: an object rather than a bound method, so that ``deepcopy`` and
    ``torch.save`` of the model carry it, pointing at the copy."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x, *args, **kwargs):
        return _masked_norm_forward(self.module, x, *args, **kwargs)


def _called_as_a_module(module: nn.Module, args) -> None:
    """The pre-hook of a switched norm: it does nothing, and its presence keeps torch's fused paths off."""


def _install(module: nn.Module, state: tuple) -> None:
    setattr(module, STATE, state)
    if "forward" not in module.__dict__:
        module.forward = _KeptChannelsForward(module)
    if _called_as_a_module not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_called_as_a_module)


def _uninstall(module: nn.Module) -> None:
    if STATE in module.__dict__:
        del module.__dict__[STATE]
        module.__dict__.pop("forward", None)
    for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _called_as_a_module]:
        del module._forward_pre_hooks[key]


def switches(model: nn.Module) -> dict[str, dict]:
    """Every module's switch as it is now (the instance attributes :func:`sync_norms` sets; empty where none), to
    put back later with :func:`set_switches`."""
    return {name: {k: m.__dict__[k] for k in ("forward", STATE) if k in m.__dict__} for name, m in model.named_modules()}


def set_switches(model: nn.Module, wanted: dict[str, dict], current: dict[str, dict]) -> None:
    """Give every module whose switch in ``current`` (what it has now) differs from ``wanted`` that switch."""
    for name, attrs in wanted.items():
        now = current[name]
        if now.keys() != attrs.keys() or any(now[k] is not attrs[k] for k in attrs):
            module = model.get_submodule(name)
            for k in ("forward", STATE):
                module.__dict__.pop(k, None)
            module.__dict__.update(attrs)


def unpatch_norms(model: nn.Module) -> None:
    """Give every switched norm layer its own forward back."""
    for module in model.modules():
        _uninstall(module)


def sync_norms(model: nn.Module, grouping, keep: dict) -> None:
    """Switch the norm layers whose statistics span pruned channels, and only those.

    ``keep`` maps a space ``(value, dim)`` to its boolean keep mask (spaces that lose
    nothing are absent), as :func:`fxprune.passes.compact.space_keep` gives it.
    """
    plans: dict[str, tuple] = {}
    for group in grouping.groups:
        for site in group.norms:
            mask = keep.get(site.space)
            if mask is None:
                continue
            index = np.flatnonzero(mask)
            if site.input_dim is None:
                raise PruningError(f"{site.module} computes statistics over pruned channels that no dim of its "
                                   "input holds; it cannot be restricted to kept channels")
            if site.module in plans:
                if plans[site.module][0] != site.input_dim:
                    raise PruningError(f"norm layer {site.module} normalises over more than one pruned dim; "
                                       "only one can be restricted to kept channels")
                if not np.array_equal(plans[site.module][3], index):
                    raise PruningError(f"norm layer {site.module} is applied to differently pruned channels at "
                                       "two call sites; it cannot be restricted to both")
                continue
            plans[site.module] = (site.input_dim, site.dim, len(mask), index, site.passes_through,
                                  _channels(grouping, site.space))
    modules = dict(model.named_modules())
    for path, (dim, stat_dim, size, index, through, channels) in plans.items():
        module = modules.get(path)
        if module is None:
            raise PruningError(f"norm layer {path} of the captured graph is not a submodule of the model")
        params = {}
        for name, p in module.named_parameters(recurse=False):
            for d in range(p.dim()):  # only the dims holding the restricted channels (not a conv's outputs)
                m = keep.get((PARAM_PREFIX + f"{path}.{name}", d))
                if m is not None and _channels(grouping, (PARAM_PREFIX + f"{path}.{name}", d)) == channels:
                    params[name] = (d, torch.from_numpy(np.flatnonzero(m)))
        _install(module, (dim, stat_dim, size, torch.from_numpy(index).to(_device(module)), params, through))
    for path, module in modules.items():
        if path not in plans:
            _uninstall(module)


def _channels(grouping, space) -> frozenset:
    """The group channels (global atoms) a space holds."""
    atoms = grouping.space_atoms.get(space)
    return frozenset() if atoms is None else frozenset(atoms[atoms >= 0].tolist())


def _device(module: nn.Module) -> torch.device:
    t = next(module.parameters(), None)
    return t.device if t is not None else torch.device("cpu")
