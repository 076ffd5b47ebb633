"""``nn.MultiheadAttention``'s projections, observed through the attention module.

Its forward reads ``out_proj.weight`` and ``out_proj.bias`` directly and never calls ``out_proj``,
so hooks on that ``nn.Linear`` see nothing, and calibration and compensation would have no input
statistics for the layer that reads the heads. The projection is linear, so its input (the
heads' concatenated outputs) is the attention module's output with ``out_proj`` as the identity:
:func:`register_layer_hooks` recomputes that in a forward hook of the attention module (one more
attention pass per call, with the same arguments), and hands the layer's output to the output
hook as the attention module's first output.

The packed input projection (``in_proj_weight``, the layer that reads the hidden size) is the
attention module itself as a layer: in self-attention (query, key and value the same tensor) its
input is the query and its output ``linear(query, in_proj_weight, in_proj_bias)``, reported by a
pre-hook of the attention module. In cross-attention the three chunks read different tensors, so
nothing is reported (its input columns are not prunable there: the captured graph slices the
packed weight). An attention whose keys or values are narrower or wider than its queries (``kdim``
or ``vdim`` set) keeps three separate weights instead, ``q_proj_weight``, ``k_proj_weight`` and
``v_proj_weight``: each is a layer of its own, named by its parameter, that reads the query, key
or value and adds its third of ``in_proj_bias``. Every other layer is hooked as itself.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

__all__ = ["owning_attention", "packed_in_projection", "projection_bias", "register_layer_hooks",
           "reads_inputs_unobserved", "separate_projection"]

Observer = Callable[[torch.Tensor], None]
SEPARATE_PROJECTIONS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")  # they read query, key and value
_RECOMPUTING: set[int] = set()  # attention modules being run again by a hook: their hooks do not report that run


def _attention_owning(model: nn.Module, name: str) -> tuple[nn.MultiheadAttention | None, str]:
    """(the ``nn.MultiheadAttention`` that ``name`` is an attribute of, else None; that attribute's name)."""
    parent, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:
        return None, attr
    return (owner if isinstance(owner, nn.MultiheadAttention) else None), attr


def owning_attention(model: nn.Module, name: str) -> nn.MultiheadAttention | None:
    """The ``nn.MultiheadAttention`` whose ``out_proj`` is the submodule ``name``, else None."""
    owner, attr = _attention_owning(model, name)
    return owner if attr == "out_proj" else None


def packed_in_projection(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.MultiheadAttention`` with one packed ``in_proj_weight`` (query, key and
    value of the same width): calibration observes it as the layer that weight belongs to."""
    return isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim


def separate_projection(model: nn.Module, name: str) -> tuple[nn.MultiheadAttention, int] | None:
    """(the attention, 0 / 1 / 2 for query / key / value) where parameter ``name`` is one of an
    ``nn.MultiheadAttention``'s separate projection weights, else None."""
    owner, attr = _attention_owning(model, name)
    if owner is None or packed_in_projection(owner) or attr not in SEPARATE_PROJECTIONS:
        return None
    return owner, SEPARATE_PROJECTIONS.index(attr)


def projection_bias(attention: nn.MultiheadAttention, index: int) -> torch.Tensor | None:
    """The separate projection ``index``'s part of ``in_proj_bias`` (a view: writing it writes the bias)."""
    bias, width = attention.in_proj_bias, attention.embed_dim
    return None if bias is None else bias[index * width:(index + 1) * width]


def reads_inputs_unobserved(model: nn.Module, parameter: str, dim: int) -> bool:
    """Whether ``parameter`` is ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (or a separate q/k/v
    weight) and ``dim`` its input features: it reads the hidden size, and where calibration has no statistics
    of it (the packed one in cross-attention; statistics loaded from before separate weights were observed)
    compensation cannot re-fit it."""
    owner, attr = _attention_owning(model, parameter)
    return owner is not None and dim == 1 and attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                       "v_proj_weight")


def register_layer_hooks(model: nn.Module, name: str, on_input: Observer | None = None,
                         on_output: Observer | None = None) -> list:
    """Hooks that call ``on_input(x)`` with the tensor the layer ``name`` reads and ``on_output(y)`` with what
    it writes, on every call; returns the handles. Non-tensor and integer inputs are not reported."""
    separate = separate_projection(model, name)
    if separate is not None:
        return [separate[0].register_forward_pre_hook(_separate_projection_hook(*separate, on_input, on_output),
                                                      with_kwargs=True)]
    layer = model.get_submodule(name)
    attention = owning_attention(model, name)
    if attention is not None:
        return [attention.register_forward_hook(_projection_hook(attention, on_input, on_output), with_kwargs=True)]
    if packed_in_projection(layer):
        return [layer.register_forward_pre_hook(_in_projection_hook(layer, on_input, on_output), with_kwargs=True)]
    handles = []
    if on_input is not None:
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs: _report(on_input, _first_tensor(args, kwargs)), with_kwargs=True))
    if on_output is not None:
        handles.append(layer.register_forward_hook(lambda module, args, out: _report(on_output, out)))
    return handles


def _in_projection_hook(attention: nn.MultiheadAttention, on_input: Observer | None, on_output: Observer | None):
    def hook(module, args, kwargs):
        if id(attention) in _RECOMPUTING:
            return
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names))
        if not isinstance(q, torch.Tensor) or k is not q or v is not q:  # cross-attention: three inputs
            return
        if on_input is not None:
            _report(on_input, q)
        if on_output is not None:
            _report(on_output, torch.nn.functional.linear(q, attention.in_proj_weight, attention.in_proj_bias))

    return hook


def _separate_projection_hook(attention: nn.MultiheadAttention, index: int, on_input: Observer | None,
                              on_output: Observer | None):
    def hook(module, args, kwargs):
        if id(attention) in _RECOMPUTING:
            return
        name = ("query", "key", "value")[index]
        x = args[index] if index < len(args) else kwargs.get(name)
        if not isinstance(x, torch.Tensor):
            return
        if on_input is not None:
            _report(on_input, x)
        if on_output is not None:
            weight = getattr(attention, SEPARATE_PROJECTIONS[index])
            _report(on_output, torch.nn.functional.linear(x, weight, projection_bias(attention, index)))

    return hook


def _projection_hook(attention: nn.MultiheadAttention, on_input: Observer | None, on_output: Observer | None):
    def hook(module, args, kwargs, out):
        if id(attention) in _RECOMPUTING:  # a hook's own run of the module (this one's or another's)
            return
        if on_output is not None:
            _report(on_output, out[0] if isinstance(out, tuple) else out)
        if on_input is None:
            return
        weight, bias = attention.out_proj.weight, attention.out_proj.bias
        identity = {"out_proj.weight": torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)}
        if bias is not None:
            identity["out_proj.bias"] = torch.zeros(weight.shape[1], dtype=bias.dtype, device=bias.device)
        _RECOMPUTING.add(id(attention))
        try:
            heads = functional_call(attention, identity, args, kwargs)
        finally:
            _RECOMPUTING.discard(id(attention))
        _report(on_input, heads[0] if isinstance(heads, tuple) else heads)

    return hook


def _first_tensor(args: tuple, kwargs: dict):
    """What a layer's forward reads: its first positional argument, else its first tensor keyword."""
    return args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _report(observer: Observer, x) -> None:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        observer(x.detach())
