"""Hugging Face layers whose size attributes ``compact_eager`` rewrites, found by name.

Grouping and compaction never look at names (:mod:`fxprune.passes`); only the eager
model needs them, because Hugging Face attention keeps its head count in plain int
attributes that its forward reads (``view(..., self.num_attention_heads, ...)``), and those
must match the sliced weights. Every name this takes on trust is here:

- head counts ``num_heads``, ``num_attention_heads``, ``n_head``; head sizes ``head_dim``,
  ``attention_head_size``; the query/key projections ``q_proj``/``query``/``q`` and
  ``k_proj``/``key``/``k``. A module with a head size and a query ``nn.Linear`` gets its head
  count from the query rows (the head size itself never changes: heads are pruned whole).
- BERT, RoBERTa (``BertSelfAttention``): ``query``/``key``/``value`` with
  ``num_attention_heads``, ``attention_head_size`` and ``all_head_size``.
- ViT (``ViTAttention``): ``q_proj``/``k_proj``/``v_proj`` with ``num_attention_heads`` and
  ``head_dim`` (older versions spell it as BERT does).
- Llama, Mistral and their kin, with grouped-query heads: ``q_proj``/``k_proj`` with
  ``head_dim`` and ``num_key_value_groups`` (query heads per key/value head), and
  ``num_heads``/``num_key_value_heads`` where a version stores them.
- GPT-2: ``Conv1D``, a linear whose weight is stored (in, out), gets ``nf`` from its weight.
  ``GPT2Attention`` has ``num_heads`` but no separate query projection to read it from,
  and its forward splits the fused ``c_attn`` by a stored ``split_size``: pruned GPT-2
  heads make ``compact_eager`` refuse, and ``compact()`` is the way for them.
- Widths kept in int attributes ``hidden_dim``, ``hidden_size``, ``intermediate_dim``,
  ``intermediate_size`` and Mamba's ``time_step_rank`` by modules that own their tensors or
  wrap plain layers (a mixture-of-experts router reshapes to ``(-1, self.hidden_dim)``; Mamba's
  mixer splits ``x_proj``'s output by ``time_step_rank`` and the state size): such an attribute
  that held the old size of a changed dim of the module's or its children's tensors takes the
  new size, where that size had one new value and no unchanged dim has it (sizes are matched by
  value, so an ambiguous one is left, and the check against the masked model says so).
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["update_layer", "update_heads", "update_widths", "head_attributes", "head_attribute_values",
           "is_transposed_linear", "tensor_shapes"]

HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head")
HEAD_SIZES = ("head_dim", "attention_head_size")
QUERY = ("q_proj", "query", "q")
KEY = ("k_proj", "key", "k")
HEAD_ATTRIBUTES = (*HEAD_COUNTS, *HEAD_SIZES, "all_head_size", "num_key_value_heads", "num_key_value_groups")
WIDTHS = ("hidden_dim", "hidden_size", "intermediate_dim", "intermediate_size", "time_step_rank")


def is_transposed_linear(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out), with its output width in ``nf``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def update_layer(module: nn.Module) -> None:
    """A Hugging Face layer that no ``torch.nn`` class covers: its size attributes follow its weight."""
    if is_transposed_linear(module):
        module.nf = module.weight.shape[1]


def tensor_shapes(module: nn.Module) -> dict[str, tuple]:
    """Shapes of the module's own parameters and those of its direct children, by their name in the module."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False)]
    for child_name, child in module.named_children():
        own += [(f"{child_name}.{n}", p) for n, p in child.named_parameters(recurse=False)]
    return {n: tuple(p.shape) for n, p in own}


def update_widths(module: nn.Module, before: dict[str, tuple]) -> None:
    """Width attributes (``WIDTHS``) that held the old size of a changed dim take its new size."""
    new_sizes: dict[int, set] = {}
    kept = set()  # sizes some dim still has: an attribute holding one of them may be that dim's (left alone)
    for name, shape in tensor_shapes(module).items():
        for old, new in zip(before.get(name, shape), shape):
            if old != new:
                new_sizes.setdefault(old, set()).add(new)
            else:
                kept.add(old)
    for attr in WIDTHS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and len(new_sizes.get(value, ())) == 1 \
                and value not in kept:
            setattr(module, attr, next(iter(new_sizes[value])))


def update_heads(module: nn.Module) -> None:
    """Attention modules that keep a head count next to q/k projections."""
    size = next((getattr(module, a) for a in HEAD_SIZES if isinstance(getattr(module, a, None), int)), None)
    q = next((getattr(module, a) for a in QUERY if isinstance(getattr(module, a, None), nn.Linear)), None)
    if size is None or q is None:
        return
    heads = q.weight.shape[0] // size  # parents are visited before their Linear children: read weights
    for attr in HEAD_COUNTS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    if isinstance(getattr(module, "all_head_size", None), int):
        module.all_head_size = q.weight.shape[0]
    k = next((getattr(module, a) for a in KEY if isinstance(getattr(module, a, None), nn.Linear)), None)
    if k is not None and isinstance(getattr(module, "num_key_value_heads", None), int):
        module.num_key_value_heads = k.weight.shape[0] // size
    if isinstance(getattr(module, "num_key_value_groups", None), int) and k is not None:
        module.num_key_value_groups = heads // max(1, k.weight.shape[0] // size)


def head_attributes(model: nn.Module) -> dict:
    """How each attention module splits its projections into heads: (module, attribute) -> value."""
    return {(name, a): getattr(m, a) for name, m in model.named_modules() for a in HEAD_ATTRIBUTES
            if isinstance(getattr(m, a, None), int)}


def head_attribute_values(model: nn.Module) -> dict[str, set]:
    """Attribute -> the values it takes across the model's attention modules."""
    values: dict[str, set] = {}
    for (_, attr), value in head_attributes(model).items():
        values.setdefault(attr, set()).add(value)
    return values
