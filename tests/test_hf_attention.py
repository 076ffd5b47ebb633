"""fxprune.adapters.hf_attention: compact_eager gives Hugging Face attention the new head counts.

One test per family the adapter names: after heads are pruned, the attention modules'
head attributes match the kept heads, and the eager compact model computes what the
masked model computes on a fresh input (another batch and sequence length than the
capture example), within 1e-4 max abs error in float32, the tolerance compact() checks.
That the rebuilt config reloads is tests/test_hf_checkpoints.py's concern, and the
config each family gets is tests/test_transformers.py::test_eager_compact_model_of_the_users_class's.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fxprune

LOCAL = {"target_sparsity": 0.5, "prune_domain": "local"}
ATOL = 1e-4


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(1))


def _first(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _kept(pruning, weight: str, dim: int = 0) -> int:
    """How many channels the group holding ``weight``'s ``dim`` keeps (heads, key/value heads, FFN channels)."""
    group = next(g for g in pruning.groups if any(m.name == weight and m.dim == dim for m in g.parameters))
    return len(pruning.kept_channels[group.index])


def _attention(model, attribute: str) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, attribute, None), int)}


def _projection(module, names) -> str:
    return next(n for n in names if isinstance(getattr(module, n, None), torch.nn.Linear))


def _same_outputs(pruning, small, *fresh) -> None:
    with torch.no_grad():
        assert (_first(small(*fresh)) - _first(pruning.model(*fresh))).abs().max() <= ATOL


def test_bert_heads():
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)).eval()
    pruning = fxprune.compile(model, (_ids(1, 16),), LOCAL).prune()
    with pytest.warns(UserWarning, match="config cannot describe"):  # BERT's config cannot say 2 heads of 16
        small = pruning.compact_eager()
    layers = _attention(small, "all_head_size")
    assert len(layers) == 2
    for name, attn in layers.items():
        heads = _kept(pruning, f"{name}.query.weight")
        assert heads < 4
        assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (heads, 16, heads * 16)
        assert attn.query.weight.shape[0] == attn.key.weight.shape[0] == heads * 16
    _same_outputs(pruning, small, _ids(3, 10))


def test_gpt2_conv1d_widths():
    """GPT2Attention splits its fused c_attn by a stored split_size, so compact_eager refuses pruned GPT-2 heads
    (tests/test_transformers.py::test_eager_compact_says_why_when_forward_hard_codes_a_width); with the heads
    kept, the adapter gives each Conv1D of the FFN its new width and leaves the head attributes as they were."""
    torch.manual_seed(0)
    model = T.GPT2Model(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)).eval()
    pruning = fxprune.compile(model, (_ids(1, 16),), {**LOCAL, "excluded_names": ["attn"]}).prune()
    small = pruning.compact_eager()
    for i, block in enumerate(small.h):
        width = _kept(pruning, f"h.{i}.mlp.c_fc.weight", dim=1)  # Conv1D stores its weight (in, out)
        assert width < 128
        assert block.mlp.c_fc.weight.shape == (64, width) and block.mlp.c_fc.nf == width
        assert block.mlp.c_proj.weight.shape == (width, 64) and block.mlp.c_proj.nf == 64
        assert (block.attn.num_heads, block.attn.head_dim, block.attn.split_size) == (4, 16, 64)
    _same_outputs(pruning, small, _ids(3, 10))


def test_llama_grouped_query_heads():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                             num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                             use_cache=False)).eval()
    pruning = fxprune.compile(model, (_ids(1, 16),), LOCAL).prune()
    small = pruning.compact_eager()
    layers = _attention(small, "num_key_value_groups")
    assert len(layers) == 2
    for name, attn in layers.items():
        kv = _kept(pruning, f"{name}.k_proj.weight")  # a key/value head is pruned with the 4 query heads it serves
        assert kv == 1
        assert (attn.head_dim, attn.num_key_value_groups) == (8, 4)
        assert (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]) == (kv * 4 * 8, kv * 8)
        for count, value in (("num_heads", kv * 4), ("num_key_value_heads", kv)):  # where a version stores them
            assert getattr(attn, count, value) == value
    _same_outputs(pruning, small, _ids(3, 10))


def test_vit_heads():
    torch.manual_seed(0)
    model = T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   image_size=32, patch_size=8)).eval()
    pruning = fxprune.compile(model, (torch.randn(1, 3, 32, 32),), LOCAL).prune()
    small = pruning.compact_eager()
    layers = _attention(small, "num_attention_heads")
    assert len(layers) == 2
    for name, attn in layers.items():
        query = _projection(attn, ("q_proj", "query"))  # transformers 5 / 4 spellings
        heads = _kept(pruning, f"{name}.{query}.weight")
        size = getattr(attn, "head_dim", getattr(attn, "attention_head_size", None))
        assert heads < 4 and size == 16
        assert attn.num_attention_heads == heads and getattr(attn, query).weight.shape[0] == heads * 16
    _same_outputs(pruning, small, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
