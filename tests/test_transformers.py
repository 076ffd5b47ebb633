"""Hugging Face transformers (random init from configs): heads and FFN channels.

Attention heads come out of the generic rules: q/k/v rows in head-sized blocks, the
output projection's columns, and (with grouped-query attention) a key/value head
together with the query heads that share it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import fxprune
from tests.checks import assert_compact_matches_masked, assert_onnx_matches, fresh_like, n_params

# compact vs masked, on inputs compact() did not check: float32 rounding of the shorter sums is ~1e-8 here
# and outputs are O(0.1-1), so a wrong weight shows; onnxruntime fuses and reorders ops, hence its looser bound
EXACT = {"atol": 1e-6, "rtol": 1e-5}
ONNX = {"atol": 1e-5, "rtol": 1e-4}


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100)
    return transformers.BertModel(cfg), (torch.randint(0, 100, (1, 16)),), 4


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg), (torch.randint(0, 100, (1, 16)),), 4  # FFN is 4 * n_embd


def _vit():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8)
    return transformers.ViTModel(cfg), (torch.randn(1, 3, 32, 32),), 4


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100, use_cache=False)
    return transformers.LlamaForCausalLM(cfg), (torch.randint(0, 100, (1, 16)),), 2  # 2 kv heads, 2 q heads each


@pytest.mark.parametrize("build", [_bert, _gpt2, _vit, _llama], ids=["bert", "gpt2", "vit", "llama-gqa"])
def test_heads_and_ffn_prune_and_compact(build, tmp_path):
    torch.manual_seed(0)
    model, x, head_units = build()
    model.eval()
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5, "prune_domain": "local"})
    sizes = sorted({g.size for g in pruning.groups})
    assert head_units in sizes and max(sizes) == 128  # per-layer heads and FFN channels
    head_groups = [g for g in pruning.groups if g.size == head_units]
    assert len(head_groups) == 2  # one per layer
    pruning.prune()
    small = pruning.compact()
    fresh = fresh_like(x)
    assert_compact_matches_masked(pruning, small, fresh, **EXACT)
    report = pruning.report()
    assert report.macs_ratio > 1.5
    assert_onnx_matches(fxprune.export_onnx(small, tmp_path / "small.onnx", x).path, small, fresh, **ONNX)


def test_cache_output_gets_actionable_advice():
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=50, use_cache=True)
    with pytest.raises(fxprune.CaptureError, match="use_cache=False"):
        fxprune.compile(transformers.LlamaForCausalLM(cfg).eval(), (torch.randint(0, 50, (1, 8)),), {})


def test_torch_multihead_attention_heads_are_units():
    """nn.MultiheadAttention packs q/k/v in one in_proj and merges batch with heads; heads still come out."""
    from tests.models import ARCHITECTURES

    factory, inputs = ARCHITECTURES["TwoLayerTransformer"]
    # captured at the example's shapes: with a dynamic batch, B*heads is one dynamic dim (see below)
    pruning = fxprune.compile(factory(), inputs(), {"target_sparsity": 0.5, "prune_domain": "local"},
                              dynamic_shapes={})
    heads = [g for g in pruning.groups if any("in_proj_weight" in m.name for m in g.parameters)]
    assert [g.size for g in heads] == [4, 4]
    in_proj = next(m for m in heads[0].parameters if m.name.endswith("in_proj_weight"))
    # head 1 is rows 8..15 of each of q, k and v
    assert list(in_proj.indices(1)) == [*range(8, 16), *range(40, 48), *range(72, 80)]
    pruning.prune()
    small = pruning.compact()
    assert_compact_matches_masked(pruning, small, fresh_like(inputs()), **EXACT)


def test_heads_merged_with_a_dynamic_batch_still_prune():
    """nn.MultiheadAttention views q as (seq, batch * heads, head_dim): with a dynamic batch the heads are the
    static factor of that dim, so they prune as with a fixed batch, and the compact graph runs at any batch."""
    from tests.models import ARCHITECTURES

    factory, inputs = ARCHITECTURES["TwoLayerTransformer"]
    config = {"target_sparsity": 0.5, "prune_domain": "local"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pruning = fxprune.compile(factory(), inputs(), config)
    static = fxprune.compile(factory(), inputs(), config, dynamic_shapes={})
    assert [g.describe() for g in pruning.groups] == [g.describe() for g in static.groups]
    assert any("in_proj_weight" in m.name for g in pruning.groups for m in g.parameters)
    small = pruning.prune().compact()
    for batch in (1, 5):
        x = torch.randn(batch, 8, 32)
        with torch.no_grad():
            assert (small(x) - pruning.model(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("build", [_bert, _llama, _vit], ids=["bert", "llama-gqa", "vit"])
def test_eager_compact_model_of_the_users_class(build):
    torch.manual_seed(0)
    model, x, _ = build()
    pruning = fxprune.compile(model.eval(), x, {"target_sparsity": 0.5, "prune_domain": "local"}).prune()
    if build is _bert:  # BERT derives the head size from hidden_size // heads: no config says 2 heads of 16
        with pytest.warns(UserWarning, match="config cannot describe the compact widths.*uniform_layers"):
            small = pruning.compact_eager()
        assert small.config.num_attention_heads == model.config.num_attention_heads  # left as it was
        with pytest.raises(fxprune.CompactionError, match="config cannot describe"):
            small.save_pretrained("unused")
    else:
        small = pruning.compact_eager()
        assert small.fxprune_notes == []
        assert small.config.num_attention_heads == model.config.num_attention_heads // 2
        assert small.config.intermediate_size == model.config.intermediate_size // 2
    assert type(small) is type(model)
    assert_compact_matches_masked(pruning, small, fresh_like(x), **EXACT)
    if build is _bert:
        return
    rebuilt = type(model)(small.config).eval()  # what from_pretrained does with a saved slim model
    rebuilt.load_state_dict(small.state_dict())
    assert_compact_matches_masked(pruning, rebuilt, fresh_like(x), **EXACT)


def test_eager_compact_says_why_when_forward_hard_codes_a_width():
    model, x, _ = _gpt2()  # GPT-2 splits its fused qkv by a stored split_size
    pruning = fxprune.compile(model.eval(), x, {"target_sparsity": 0.5, "prune_domain": "local"}).prune()
    with pytest.raises(fxprune.CompactionError, match="own forward does not run with the pruned sizes.*compact\\(\\)"):
        pruning.compact_eager()
    small = pruning.compact()  # the graph-level compaction still works: 2 of 4 heads, 64 of 128 FFN channels
    assert tuple(small.get_parameter("h.0.attn.c_attn.weight").shape) == (64, 3 * 2 * 16)  # Conv1D: (in, out)
    assert tuple(small.get_parameter("h.1.mlp.c_fc.weight").shape) == (64, 64)
    # per layer: c_attn 64x96 weight + 96 bias, attn c_proj 32x64, mlp c_fc 64x64 + 64, mlp c_proj 64x64
    assert n_params(model) - n_params(small) == 2 * (64 * 96 + 96 + 32 * 64 + 64 * 64 + 64 + 64 * 64)
    assert_compact_matches_masked(pruning, small, fresh_like(x), **EXACT)


def _distilbert():
    cfg = transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100)
    return transformers.DistilBertModel(cfg), (torch.randint(0, 100, (1, 16)),), 4


def _roberta():
    cfg = transformers.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    return transformers.RobertaModel(cfg), (torch.randint(3, 100, (1, 16)),), 4


def _bert_classifier():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), (torch.randint(0, 100, (1, 16)),), 4


@pytest.mark.parametrize("build", [_distilbert, _roberta, _bert_classifier],
                         ids=["distilbert", "roberta", "bert-classifier"])
def test_more_encoders(build, tmp_path):
    test_heads_and_ffn_prune_and_compact(build, tmp_path)


def test_separate_budgets_for_ffn_channels_and_heads():
    """50% of FFN channels and 25% of heads in every layer, through two pruners selected by layer name."""
    cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, intermediate_size=256,
                                  vocab_size=100)
    model, x = transformers.BertModel(cfg).eval(), (torch.randint(0, 100, (1, 16)),)
    pruning = fxprune.compile(model, x, {"prune_domain": "local", "pruners": [
        {"names": [r"intermediate\.dense$"], "target_sparsity": 0.5},
        {"names": [r"attention\.self\.query$"], "target_sparsity": 0.25}]}).prune()
    for g in pruning.groups:
        kept = len(pruning.kept_channels[g.index])
        assert (g.size, kept) in ((256, 128), (8, 6)), (g.describe(), kept)
    small = pruning.compact()
    query = [n for n, prm in small.named_parameters() if n.endswith("query.weight")]
    assert all(small.get_parameter(n).shape == (6 * 16, 128) for n in query)
