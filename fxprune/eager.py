"""Compaction on the user's own eager model: slice parameters in place, update attributes.

``compact()`` rewrites the captured graph and works for any captured model. Many
users want their own class back (to keep training it, or to ``save_pretrained``).
That works when ``forward`` reads sizes from module attributes or infers them
(``view(..., -1, head_dim)``); it cannot work when forward hard-codes a size. The
result is checked against the masked model, and a mismatch says so instead of
returning a wrong model.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import CompactionError
from fxprune.norms import STATE, narrowed_shape, unpatch_norms
from fxprune.passes.compact import space_keep
from fxprune.passes.couplings import PARAM_PREFIX

__all__ = ["compact_eager"]

_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head")
_HIDDEN = ("hidden_size", "n_embd", "dim", "d_model")
_HEAD_SIZES = ("head_dim", "attention_head_size")
_QUERY = ("q_proj", "query", "q")
_KEY = ("k_proj", "key", "k")


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
    """Make standard layers' size attributes match their new weights."""
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
    elif type(module).__name__ == "Conv1D" and w is not None:  # Hugging Face's transposed linear
        module.nf = w.shape[1]
    _update_heads(module)


def _update_heads(module: nn.Module) -> None:
    """Attention modules that keep a head count next to q/k projections (HF style)."""
    size = next((getattr(module, a) for a in _HEAD_SIZES if isinstance(getattr(module, a, None), int)), None)
    q = next((getattr(module, a) for a in _QUERY if isinstance(getattr(module, a, None), nn.Linear)), None)
    if size is None or q is None:
        return
    heads = q.weight.shape[0] // size  # parents are visited before their Linear children: read weights
    for attr in _HEAD_COUNTS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    if isinstance(getattr(module, "all_head_size", None), int):
        module.all_head_size = q.weight.shape[0]
    k = next((getattr(module, a) for a in _KEY if isinstance(getattr(module, a, None), nn.Linear)), None)
    if k is not None and isinstance(getattr(module, "num_key_value_heads", None), int):
        module.num_key_value_heads = k.weight.shape[0] // size
    if isinstance(getattr(module, "num_key_value_groups", None), int) and k is not None:
        module.num_key_value_groups = heads // max(1, k.weight.shape[0] // size)


def _attention_widths(model: nn.Module) -> dict[str, set]:
    """Head counts read off the q/k projection weights of every attention module."""
    widths: dict[str, set] = {}
    for m in model.modules():
        size = next((getattr(m, a) for a in _HEAD_SIZES if isinstance(getattr(m, a, None), int)), None)
        q = next((getattr(m, a) for a in _QUERY if isinstance(getattr(m, a, None), nn.Linear)), None)
        k = next((getattr(m, a) for a in _KEY if isinstance(getattr(m, a, None), nn.Linear)), None)
        if size and q is not None:
            widths.setdefault("num_attention_heads", set()).add(q.weight.shape[0] // size)
            if k is not None:
                widths.setdefault("num_key_value_heads", set()).add(k.weight.shape[0] // size)
    return widths


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


def _update_config(model: nn.Module, ffn_layers: list[str], hidden: dict[int, int]) -> list[str]:
    """Hugging Face configs hold one width for all layers: update each only when pruning kept it uniform."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    widths = _attention_widths(model)
    if ffn_layers:
        widths["intermediate_size"] = {model.get_submodule(n).weight.shape[0] for n in ffn_layers}
    for key in _HIDDEN:
        if isinstance(getattr(config, key, None), int) and getattr(config, key) in hidden:
            widths[key] = {hidden[getattr(config, key)]}
    notes = []
    for key, values in widths.items():
        if not hasattr(config, key):
            continue
        if len(values) == 1:
            setattr(config, key, values.pop())
        else:
            notes.append(f"config.{key} left unchanged: layers now differ ({sorted(values)}), so the class "
                         "cannot be rebuilt from its config; save the compact graph (save_compact) instead")
    if not notes:
        notes += _rebuild_check(model)
    return notes


def _rebuild_check(model: nn.Module) -> list[str]:
    """Does ``type(model)(model.config)`` give these shapes? (What from_pretrained relies on.)"""
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except Exception as err:  # a class that does not build from its config alone
        return [f"could not rebuild {type(model).__name__} from its config to check it: {err}"]
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    wrong = [k for k, v in model.state_dict().items() if theirs.get(k, tuple(v.shape)) != tuple(v.shape)]
    if wrong:
        return [f"{type(model).__name__}'s config cannot express the pruned widths (e.g. {wrong[0]}): the class "
                "derives them from other fields; reload with torch.load of the module or save_compact, "
                "not from_pretrained"]
    return []


def compact_eager(pruning, atol: float = 1e-4) -> nn.Module:
    """A copy of ``pruning.model`` (the user's class) with pruned channels removed.

    Raises
    ------
    CompactionError
        The model's forward does not accept the new sizes (it hard-codes one); the
        message names the error and points to ``compact()``, which always works.
    """
    keep = space_keep(pruning.grouping, pruning._atom_kept())
    model = copy.deepcopy(pruning.model)
    inter = getattr(getattr(model, "config", None), "intermediate_size", None)
    ffn_layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == inter]
    before = {name: {a: getattr(m, a) for a in ("out_channels", "groups", "num_channels", "num_groups")
                     if hasattr(m, a)} for name, m in model.named_modules()}
    _slice_tensors(model, keep)
    _resize_norms(model)
    for name, module in model.named_modules():
        _update_attributes(module, before[name])
    # a pruned hidden size: the width of the group the norm layers span, when it is the only one
    normalized = [g for g in pruning.groups if g.normalized and not pruning._kept[g.index].all()]
    hidden = {g.size: int(pruning._kept[g.index].sum()) for g in normalized} if len(normalized) == 1 else {}
    model.fxprune_notes = _update_config(model, ffn_layers, hidden)
    try:
        pruning._compare(model, atol)
    except CompactionError:
        raise
    except Exception as err:
        raise CompactionError(
            f"{type(model).__name__}'s own forward does not run with the pruned sizes ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); it probably hard-codes a width. Use pruning.compact(), which rewrites "
            "the captured graph instead") from err
    return model
