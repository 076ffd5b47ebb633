"""Compaction on the user's own eager model: slice parameters in place, update attributes.

``compact()`` rewrites the captured graph and works for any captured model. Many
users want their own class back (to keep training it, or to ``save_pretrained``).
That works when ``forward`` reads sizes from module attributes or infers them
(``view(..., -1, head_dim)``); it cannot work when forward hard-codes a size. The
result is checked against the masked model, and a mismatch says so instead of
returning a wrong model. What this module knows is ``torch.nn``'s own layers; what
only names tell (Hugging Face attention, its config) is in :mod:`fxprune.adapters`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from fxprune.adapters import hf_attention
from fxprune.adapters.hf_config import attach_config
from fxprune.errors import CompactionError
from fxprune.norms import STATE, narrowed_shape, unpatch_norms
from fxprune.passes.couplings import PARAM_PREFIX

__all__ = ["compact_eager"]


def _slice_tensors(model: nn.Module, keep: dict) -> None:
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        t = tensor.detach()
        for dim in range(t.dim()):
            mask = keep.get((PARAM_PREFIX + name, dim))
            if mask is not None:
                t = t.index_select(dim, torch.from_numpy(np.flatnonzero(mask)).to(t.device))
        if t.shape == tensor.shape:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(tensor, nn.Parameter):
            owner._parameters[attr] = nn.Parameter(t.clone(), requires_grad=tensor.requires_grad)
        else:
            owner._buffers[attr] = t.clone()


def _update_attributes(module: nn.Module, old: dict) -> None:
    """Make layers' size attributes match their new weights: ``torch.nn``'s here, Hugging Face's by name in
    :mod:`fxprune.adapters.hf_attention`."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd):
        old_out, old_groups = old["out_channels"], old["groups"]
        if old_groups > 1:
            per_group_out = old_out // old_groups
            module.groups = w.shape[0] // per_group_out if w.shape[1] > 1 or per_group_out > 1 else w.shape[0]
        transposed = module.transposed
        module.out_channels = w.shape[1] * module.groups if transposed else w.shape[0]
        module.in_channels = w.shape[0] if transposed else w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, (nn.modules.batchnorm._NormBase,)):
        ref = w if w is not None else module.running_mean
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm):
        per = old["num_channels"] // old["num_groups"]
        module.num_channels = w.shape[0]
        module.num_groups = w.shape[0] // per
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = w.shape
    else:
        hf_attention.update_layer(module)
    hf_attention.update_heads(module)


def _resize_norms(model: nn.Module) -> None:
    """Norm layers switched to kept channels (:mod:`fxprune.norms`) become plain layers of the new width."""
    for module in model.modules():
        state = module.__dict__.get(STATE)
        if state is None:
            continue
        narrowed = narrowed_shape(getattr(module, "normalized_shape", None), state[1], len(state[3]))
        if narrowed is not None:
            module.normalized_shape = narrowed
    unpatch_norms(model)


def compact_eager(masked: nn.Module, keep: dict[tuple[str, int], np.ndarray], compare) -> nn.Module:
    """A copy of ``masked`` (the masked model, of the user's class) with pruned channels removed.

    ``keep`` is the boolean keep mask per (parameter, dim) that loses elements (from
    :func:`fxprune.passes.compact.space_keep`); ``compare(module)`` raises
    :class:`CompactionError` where ``module`` does not compute what the masked model does.

    Raises
    ------
    CompactionError
        The model's forward does not accept the new sizes (it hard-codes one); the
        message names the error and points to ``compact()``, which always works.
    """
    model = copy.deepcopy(masked)
    original_config = copy.deepcopy(getattr(model, "config", None))
    before = {name: {a: getattr(m, a) for a in ("out_channels", "groups", "num_channels", "num_groups")
                     if hasattr(m, a)} for name, m in model.named_modules()}
    shapes = {name: hf_attention.tensor_shapes(m) for name, m in model.named_modules()}
    _slice_tensors(model, keep)
    _resize_norms(model)
    for name, module in model.named_modules():
        _update_attributes(module, before[name])
        hf_attention.update_widths(module, shapes[name])
    try:
        compare(model)
    except CompactionError:
        raise
    except Exception as err:
        raise CompactionError(
            f"{type(model).__name__}'s own forward does not run with the pruned sizes ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); it probably hard-codes a width. Use pruning.compact(), which rewrites "
            "the captured graph instead") from err
    model.fxprune_notes = attach_config(model, original_config, compare)
    return model
