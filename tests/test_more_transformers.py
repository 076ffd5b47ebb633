"""More Hugging Face architectures, tiny and random-init: heads, FFN and the hidden size together.

Each one: 50% of heads and FFN channels where the rules find them, 25% of the hidden size
(``prune_hidden_size``), compact == masked within 1e-4, and ONNX == onnxruntime. These
exercise what the fixed models do not: RMSNorm written out (Qwen2, Mistral, Phi-3), Gemma's
``(1 + weight)`` RMSNorm, learned positions (OPT), parallel attention/MLP blocks (GPT-NeoX,
Falcon), Falcon's ``x @ weight.T`` linear, ALiBi (BLOOM), factorised embeddings (ALBERT,
ELECTRA), relative-position attention (DeBERTa-v2), windowed attention with patch merging
(Swin), distillation tokens (DeiT), and mixture-of-experts layers (Mixtral, Qwen3-MoE, Qwen2-MoE
with its shared expert, OLMoE with q/k norms over all heads, GPT-OSS with attention sinks, biased
experts and gate/up projections stored interleaved; the grouped matmul transformers picks when
capturing, and Mixtral also under its batched-matmul implementation), and Mamba's selective scan
(its inner channels: depthwise conv, per-channel state from a zero initial state).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fxprune
from tests.checks import assert_compact_matches_masked, assert_onnx_matches, fresh_like, tensors

IDS = (torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0)),)
PIXELS = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
# on inputs compact() and export_onnx() did not check; float32 rounding is ~1e-8 relative, a wrong weight is not
EXACT = {"atol": 1e-6, "rtol": 1e-5}
ONNX = {"atol": 1e-5, "rtol": 1e-4}  # onnxruntime fuses and reorders float32 ops
CONFIG = {"prune_domain": "local", "pruners": [{"target_sparsity": 0.5},
                                               {"target_sparsity": 0.25, "prune_hidden_size": True}]}


def _causal(model_cls, config_cls, experts: str | None = None, **kw):
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                use_cache=False)

    def build():
        config = config_cls(**{**base, **kw})
        if experts is not None:
            config._experts_implementation = experts
        return model_cls(config)

    return build


MOE = dict(num_key_value_heads=2, num_experts_per_tok=2)


MODELS = {
    "qwen2": (_causal(T.Qwen2ForCausalLM, T.Qwen2Config, num_key_value_heads=2), IDS),
    "mistral": (_causal(T.MistralForCausalLM, T.MistralConfig, num_key_value_heads=2), IDS),
    "gemma": (_causal(T.GemmaForCausalLM, T.GemmaConfig, num_key_value_heads=2, head_dim=16), IDS),
    "phi3": (_causal(T.Phi3ForCausalLM, T.Phi3Config, num_key_value_heads=2, pad_token_id=0), IDS),
    "gpt-neox": (_causal(T.GPTNeoXForCausalLM, T.GPTNeoXConfig), IDS),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                                                 use_cache=False, max_position_embeddings=64)), IDS),
    "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, use_cache=False)), IDS),
    "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4,
                                                       use_cache=False)), IDS),
    "albert": (lambda: T.AlbertForSequenceClassification(T.AlbertConfig(
        vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128)), IDS),
    "electra": (lambda: T.ElectraForSequenceClassification(T.ElectraConfig(
        vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128)), IDS),
    "deberta-v2": (lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)), IDS),
    "mixtral": (_causal(T.MixtralForCausalLM, T.MixtralConfig, num_local_experts=4, **MOE), IDS),
    "mixtral-batched-mm": (_causal(T.MixtralForCausalLM, T.MixtralConfig, "batched_mm", num_local_experts=4, **MOE),
                           IDS),
    "qwen3-moe": (_causal(T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig, head_dim=16, num_experts=4, moe_intermediate_size=32,
                          **MOE), IDS),
    "qwen2-moe": (_causal(T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig, num_experts=4, moe_intermediate_size=32,
                          shared_expert_intermediate_size=64, **MOE), IDS),
    "olmoe": (_causal(T.OlmoeForCausalLM, T.OlmoeConfig, num_experts=4, **MOE), IDS),
    "gpt-oss": (_causal(T.GptOssForCausalLM, T.GptOssConfig, num_local_experts=4, head_dim=16, **MOE), IDS),
    "mamba": (lambda: T.MambaForCausalLM(T.MambaConfig(vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=2,
                                                       expand=2, conv_kernel=4, use_cache=False)), IDS),
    "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)), PIXELS),
    "deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128)), PIXELS),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_heads_ffn_and_hidden_size_compact_exactly(name, tmp_path):
    build, x = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    pruning = fxprune.compile(model, x, CONFIG)
    hidden = [g for g in pruning.groups if g.normalized]
    assert hidden and all(len({s.module for s in g.norms}) >= 1 for g in hidden)
    pruning.prune()
    for g in hidden:
        assert len(pruning.kept_channels[g.index]) == g.size - g.size // 4
    small = pruning.compact()
    fresh = fresh_like(x)
    assert_compact_matches_masked(pruning, small, fresh, **EXACT)
    assert pruning.report().macs_ratio > 1.5
    assert_onnx_matches(fxprune.export_onnx(small, tmp_path / "small.onnx", x).path, small, fresh, **ONNX)


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_expert_channels_go_from_every_expert_and_the_onnx_file_takes_other_batches(experts, tmp_path):
    """Mixtral's stacked expert weights lose the same intermediate channels in every expert (the weights stay one
    tensor); compact == masked and onnxruntime == compact at a batch the capture did not see."""
    torch.manual_seed(0)
    model = _causal(T.MixtralForCausalLM, T.MixtralConfig, experts, num_local_experts=4, **MOE)().eval()
    pruning = fxprune.compile(model, IDS, {"target_sparsity": 0.5})
    pruning.prune()
    small = pruning.compact()
    experts_of = dict(small.named_parameters())
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        assert tuple(experts_of[prefix + "gate_up_proj"].shape) == (4, 128, 64)  # [experts, 2 x 64 kept, hidden]
        assert tuple(experts_of[prefix + "down_proj"].shape) == (4, 64, 64)  # [experts, hidden, 64 kept]
    row = next(r for r in pruning.report().layers if r.name == "model.layers.0.mlp.experts.gate_up_proj")
    assert (row.out_before, row.out_after, row.in_before, row.in_after) == (256, 128, 64, 64)  # each expert's matrix
    batch = (torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(1)),)
    assert_compact_matches_masked(pruning, small, batch, **EXACT)
    assert_onnx_matches(fxprune.export_onnx(small, tmp_path / "small.onnx", IDS).path, small, batch, **ONNX)


def test_a_saved_mixture_of_experts_loads_in_a_process_that_never_imported_transformers(tmp_path):
    """The .pt2 holds transformers' grouped-matmul op; load_compact imports the module that defines it."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = _causal(T.MixtralForCausalLM, T.MixtralConfig, num_local_experts=4, **MOE)().eval()
    small = fxprune.compile(model, IDS, {"target_sparsity": 0.5}).prune().compact()
    fxprune.save_compact(small, tmp_path / "small.pt2", IDS)
    batch = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save((batch, tensors(small(batch))[0]), tmp_path / "reference.pt")
    code = ("import sys, torch, fxprune; batch, want = torch.load(sys.argv[1] + '/reference.pt'); "
            "assert 'transformers' not in sys.modules; loaded = fxprune.load_compact(sys.argv[1] + '/small.pt2'); "
            "got = loaded(batch); got = got[0] if isinstance(got, (tuple, list)) else got; "
            "got = got if isinstance(got, torch.Tensor) else got.logits; "
            "torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5); print('same')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-2000:]
