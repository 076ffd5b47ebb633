"""Hugging Face checkpoints of compact models: save_pretrained -> from_pretrained gives the same outputs.

``uniform_layers`` keeps the widths of repeated blocks equal, so that one config value can
describe them; where no config can (layers that differ, or a class that derives a width from
other fields), compact_eager warns and save_pretrained refuses, with the same words.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import fxprune
from fxprune.selection import repeated_blocks

IDS = (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)),)
PIXELS = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
UNIFORM = {"target_sparsity": 0.5, "uniform_layers": True}  # global scope, the default


def _llama(**kw):
    return T.LlamaForCausalLM(T.LlamaConfig(**{**dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                                      use_cache=False), **kw}))


def _vit():
    return T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                   intermediate_size=128, image_size=32, patch_size=8, num_labels=5))


def _bert():
    return T.BertForSequenceClassification(T.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                        intermediate_size=128, vocab_size=100))


def _resnet():
    return T.ResNetForImageClassification(T.ResNetConfig(layer_type="bottleneck", depths=[2, 2], hidden_sizes=[32, 64],
                                                         embedding_size=16, num_labels=5))


def _mixtral():
    return T.MixtralForCausalLM(T.MixtralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                                use_cache=False, num_local_experts=4, num_experts_per_tok=2))


def _gpt_oss():
    return T.GptOssForCausalLM(T.GptOssConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                              vocab_size=100, use_cache=False, num_local_experts=4,
                                              num_experts_per_tok=2))


def _mamba():
    return T.MambaForCausalLM(T.MambaConfig(vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=2,
                                            expand=2, conv_kernel=4, use_cache=False))


def _first(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _round_trip(model, x, config, tmp_path):
    torch.manual_seed(0)
    pruning = fxprune.compile(model.eval(), x, config).prune()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "cannot describe" warning
        small = pruning.compact_eager()
    small.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = _first(pruning.model(*x))
        assert (_first(back(*x)) - ref).abs().max() <= 1e-5
    return pruning, small, back


@pytest.mark.parametrize("build, x", [(_llama, IDS), (_vit, PIXELS)], ids=["llama-gqa", "vit"])
def test_uniform_layers_give_a_checkpoint_that_reloads(build, x, tmp_path):
    model = build()
    pruning, small, back = _round_trip(model, x, UNIFORM, tmp_path)
    assert back.config.num_attention_heads < model.config.num_attention_heads
    assert back.config.intermediate_size < model.config.intermediate_size
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in model.parameters())
    for cls in repeated_blocks(pruning.groups):  # every repeated block kept the same width
        assert len({int(pruning.kept_channels[g].size) for g in cls}) == 1


@pytest.mark.parametrize("build", [_mixtral, _gpt_oss, _mamba], ids=["mixtral", "gpt-oss", "mamba"])
def test_experts_and_mamba_reload_with_the_hidden_size_pruned(build, tmp_path):
    """Mixtral's config leaves head_dim None (fewer heads must not shrink it), its router reshapes to
    ``(-1, self.hidden_dim)`` and Mamba's mixer splits by ``time_step_rank``: each follows the compact weights."""
    model = build()
    config = {**UNIFORM, "prune_hidden_size": True}
    _, small, back = _round_trip(model, IDS, config, tmp_path)
    assert back.config.hidden_size == small.config.hidden_size < model.config.hidden_size
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in model.parameters())


def test_bert_reloads_when_only_its_ffn_is_pruned(tmp_path):
    """BERT derives head size from hidden_size // heads, so its heads are left out here (see the next test)."""
    config = {**UNIFORM, "excluded_names": ["attention", "pooler"]}  # the pooler's width is hidden_size too
    _, small, back = _round_trip(_bert(), IDS, config, tmp_path)
    assert back.config.intermediate_size == small.config.intermediate_size < 128


def test_a_llama_whose_vocabulary_equals_its_ffn_width_reloads(tmp_path):
    """Widths are never matched against config values: vocab_size == intermediate_size must not confuse it."""
    model = _llama(vocab_size=128)
    _, small, back = _round_trip(model, IDS, UNIFORM, tmp_path)
    assert back.config.vocab_size == 128 and back.config.intermediate_size < 128


@pytest.mark.parametrize("build, x, config, layer", [
    (_llama, IDS, {"target_sparsity": 0.5, "round_to": 1}, "mlp"),  # global scope: layers end up with different widths
    (_bert, IDS, UNIFORM, "attention"),  # heads: no BERT config says 2 heads of 16
    (_resnet, PIXELS, UNIFORM, "stages"),  # ResNetConfig ties inner widths to hidden_sizes // 4
], ids=["llama-global", "bert-heads", "resnet"])
def test_no_checkpoint_is_written_when_no_config_describes_the_model(build, x, config, layer, tmp_path):
    model = build()
    pruning = fxprune.compile(model.eval(), x, config).prune()
    with pytest.warns(UserWarning, match=rf"(?s)config cannot describe the compact widths.*{layer}.*uniform_layers") as w:
        small = pruning.compact_eager()
    message = str(next(m.message for m in w if "cannot describe" in str(m.message)))
    with pytest.raises(fxprune.CompactionError) as err:
        small.save_pretrained(tmp_path / "ckpt")
    assert str(err.value) == message
    assert not (tmp_path / "ckpt").exists()
    with torch.no_grad():  # the model itself is fine: only the checkpoint would not reload
        assert (_first(small(*x)) - _first(pruning.model(*x))).abs().max() <= 1e-4


def test_uniform_layers_meets_the_global_budget_with_equal_widths():
    model = _llama()
    plain = fxprune.compile(model.eval(), IDS, {"target_sparsity": 0.5, "round_to": 1}).prune()
    uniform = fxprune.compile(model.eval(), IDS, UNIFORM).prune()
    ffn = [g for g in uniform.groups if g.size == 128]
    assert len(ffn) == 3
    assert len({int(uniform.kept_channels[g.index].size) for g in ffn}) == 1
    assert len({int(plain.kept_channels[g.index].size) for g in ffn}) > 1  # without it, widths differ
    assert abs(uniform.sparsity - 0.5) <= 0.05
    with pytest.raises(fxprune.ConfigError, match="uniform_layers must be True or False"):
        fxprune.compile(model, IDS, {"uniform_layers": "yes"})


def test_repeated_blocks_are_found_by_structure():
    pruning = fxprune.compile(_llama().eval(), IDS, UNIFORM)
    classes = repeated_blocks(pruning.groups)
    sizes = sorted((pruning.groups[c[0]].size, len(c)) for c in classes)
    # kv-head groups and FFN channels, one of each per layer; the hidden size is one group through all layers
    assert sizes == [(2, 3), (64, 1), (128, 3)]
