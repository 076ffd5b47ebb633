"""The hidden size across the residual stream, pruned on request (``prune_hidden_size``).

LayerNorm/RMSNorm statistics span it, so the masked model's norm layers compute them
over kept channels only (:mod:`fxprune.norms`); the compact model then equals it.
Models are built from configs in code; nothing is downloaded.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
import transformers

import fxprune
from fxprune.norms import STATE, sync_norms, unpatch_norms
from fxprune.passes.compact import space_keep
from tests.checks import assert_compact_matches_masked, assert_onnx_matches, fresh_like, n_params
from tests.models import ResNetBasic, _image


IDS = (torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0)),)
PIXELS = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def _bert(hidden=64, heads=4, ffn=128):
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                  intermediate_size=ffn, vocab_size=100, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), IDS


def _distilbert(hidden=64, heads=4, ffn=128):
    cfg = transformers.DistilBertConfig(dim=hidden, n_layers=2, n_heads=heads, hidden_dim=ffn, vocab_size=100)
    return transformers.DistilBertForSequenceClassification(cfg), IDS


def _gpt2(hidden=64, heads=4, ffn=128):
    cfg = transformers.GPT2Config(n_embd=hidden, n_layer=2, n_head=heads, n_inner=ffn, vocab_size=100,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), IDS  # LM head tied to the input embedding


def _vit(hidden=64, heads=4, ffn=128):
    cfg = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                 intermediate_size=ffn, image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(cfg), PIXELS


def _llama(hidden=64, heads=4, ffn=128):
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=ffn, vocab_size=100,
                                   use_cache=False, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg), IDS  # RMSNorm written out in the module's own forward


def _convnext(hidden=(16, 32)):  # the MLP is 4x each stage's width
    cfg = transformers.ConvNextConfig(num_stages=2, depths=[1, 1], hidden_sizes=list(hidden),
                                      layer_scale_init_value=0.5, num_labels=5)
    return transformers.ConvNextForImageClassification(cfg), PIXELS  # channels-first LayerNorm permutes inside


# compact vs masked on a fresh input: float32 rounding of the shorter sums is ~1e-8 here, while outputs are
# O(0.01-1) (classifier logits are small), so 1e-4 would let a wrong weight through
EXACT = {"atol": 1e-6, "rtol": 1e-5}
ONNX = {"atol": 1e-5, "rtol": 1e-4}  # onnxruntime fuses and reorders float32 ops
HIDDEN = {"target_sparsity": 0.25, "prune_domain": "local", "prune_hidden_size": True}
# 50% of heads and FFN channels per layer, and 25% of the hidden size
HEADS_FFN_AND_HIDDEN = {"prune_domain": "local", "pruners": [
    {"target_sparsity": 0.5}, {"target_sparsity": 0.25, "prune_hidden_size": True}]}


def _first(out) -> torch.Tensor:
    return pytree.tree_leaves(out)[0]


# name -> (builder, number of norm layers the hidden group spans, its width, the builder's widths after HIDDEN:
# 25% of the hidden size, of the heads and of the FFN channels; Llama's 2 kv-head groups lose floor(0.5) = 0)
SLIM = {"hidden": 48, "heads": 3, "ffn": 96}
CASES = {
    "bert": (_bert, 5, 64, SLIM), "distilbert": (_distilbert, 5, 64, SLIM), "gpt2-tied": (_gpt2, 5, 64, SLIM),
    "vit": (_vit, 5, 64, SLIM), "llama-tied-rmsnorm": (_llama, 5, 64, {**SLIM, "heads": 4}),
    "convnext-channels-first": (_convnext, 3, 16, {"hidden": (12, 24)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hidden_size_is_one_group_and_compacts_exactly(name):
    build, n_norms, width, slim = CASES[name]
    torch.manual_seed(0)
    model, x = build()
    model.eval()
    with torch.no_grad():
        dense = _first(model(*x)).clone()
    pruning = fxprune.compile(model, x, HIDDEN)
    hidden = [g for g in pruning.groups if g.normalized]
    assert hidden[0].size == width and len({s.module for s in hidden[0].norms}) == n_norms
    assert {g.index for g in hidden} <= {g.index for g in pruning.pruners[0].groups}
    pruning.prune()
    for g in hidden:
        assert len(pruning.kept_channels[g.index]) == g.size - g.size // 4
    small = pruning.compact()
    assert_compact_matches_masked(pruning, small, fresh_like(x), **EXACT)
    # as many parameters as the same class built at the pruned widths (tied weights counted once)
    assert n_params(small) == n_params(build(**slim)[0])
    with torch.no_grad():
        masked = _first(pruning.model(*x))
        assert (masked - dense).abs().max() > 1e-3  # pruning changed the model
        # the norm switch is what makes it exact: without it the masked model is a different function
        unpatch_norms(pruning.model)
        plain = _first(pruning.model(*x))
        assert (plain - masked).abs().max() > 1e-4
    sync_norms(pruning.model, pruning.grouping, space_keep(pruning.grouping, pruning._atom_kept()))
    with torch.no_grad():
        assert torch.equal(_first(pruning.model(*x)), masked)
    assert pruning.report().params_ratio > 1.1
    assert not any(STATE in m.__dict__ for m in model.modules())  # the user's model is untouched


def test_without_the_flag_the_hidden_size_is_left_alone():
    model, x = _bert()
    pruning = fxprune.compile(model.eval(), x, {"target_sparsity": 0.5, "prune_domain": "local"}).prune()
    hidden = next(g for g in pruning.groups if g.normalized)
    assert pruning._kept[hidden.index].all()
    assert "prune_hidden_size=True" in hidden.describe()
    assert not any(STATE in m.__dict__ for m in pruning.model.modules())
    assert pruning.sparsity == pytest.approx(0.5, abs=0.05)  # measured over the groups being pruned


def test_the_report_says_the_hidden_size_was_left_out_and_which_key_adds_it():
    model, x = _bert()
    left = fxprune.compile(model.eval(), x, {"target_sparsity": 0.5}).prune().report()
    note = [n for n in left.notes if "prune_hidden_size=True adds it" in n]
    assert len(note) == 1 and note[0].startswith("1 group of 64 channels spanned by norm statistics"), left.notes
    assert "LayerNorm" in note[0] and f"note: {note[0]}" in str(left)
    asked = fxprune.compile(model.eval(), x, {"target_sparsity": 0.5, "prune_hidden_size": True}).prune().report()
    assert not any("prune_hidden_size" in n for n in asked.notes), asked.notes
    cnn = fxprune.compile(ResNetBasic().eval(), (_image(1, 3, 32, 32),), {"target_sparsity": 0.5}).prune().report()
    assert not any("prune_hidden_size" in n for n in cnn.notes), cnn.notes  # no norm spans a conv net's channels


def test_hidden_size_heads_and_ffn_together_export_to_onnx(tmp_path):
    model, x = _llama()
    pruning = fxprune.compile(model.eval(), x, HEADS_FFN_AND_HIDDEN).prune()
    small = pruning.compact()
    emb = small.get_parameter("model.embed_tokens.weight")
    assert tuple(emb.shape) == (100, 48)
    assert small.get_parameter("lm_head.weight") is emb  # still one tied tensor
    assert tuple(small.get_parameter("model.layers.0.mlp.gate_proj.weight").shape) == (64, 48)
    result = fxprune.export_onnx(small, tmp_path / "small.onnx", x)
    assert_onnx_matches(result.path, small, fresh_like(x), **ONNX)


def _assert_rebuilds(model, small, pruning, x):
    """What from_pretrained does with a saved slim model: build from config, load the weights."""
    rebuilt = type(model)(small.config).eval()
    rebuilt.load_state_dict(small.state_dict())
    assert_compact_matches_masked(pruning, rebuilt, fresh_like(x), **EXACT)


def test_eager_model_of_the_users_class_rebuilds_from_its_config():
    """Llama stores head_dim in its config, so a narrower hidden size is a plain LlamaForCausalLM."""
    model, x = _llama()
    pruning = fxprune.compile(model.eval(), x, HEADS_FFN_AND_HIDDEN).prune()
    small = pruning.compact_eager()
    assert small.config.hidden_size == 48 and small.fxprune_notes == []
    assert not any(STATE in m.__dict__ for m in small.modules())  # plain modules again
    _assert_rebuilds(model, small, pruning, x)


def test_eager_bert_rebuilds_when_heads_times_head_size_still_equals_hidden_size():
    """BERT derives head size as hidden_size // heads: 25% of hidden, heads and FFN keeps that true."""
    model, x = _bert()
    pruning = fxprune.compile(model.eval(), x, HIDDEN).prune()
    small = pruning.compact_eager()
    assert small.bert.embeddings.LayerNorm.normalized_shape == (48,)
    assert (small.config.hidden_size, small.config.num_attention_heads, small.fxprune_notes) == (48, 3, [])
    _assert_rebuilds(model, small, pruning, x)


def test_eager_bert_says_why_its_config_cannot_express_other_widths():
    model, x = _bert()
    pruning = fxprune.compile(model.eval(), x, HEADS_FFN_AND_HIDDEN).prune()
    with pytest.warns(UserWarning, match="config cannot describe the compact widths"):
        small = pruning.compact_eager()
    assert any("config cannot describe" in n for n in small.fxprune_notes)
    assert_compact_matches_masked(pruning, small, fresh_like(x), **EXACT)


def test_pruning_the_hidden_size_while_fine_tuning():
    """Iterative snip_momentum through the hooks: gradients flow through the switched norms,
    pruned weights stay zero, and the result still compacts exactly."""
    torch.manual_seed(0)
    model, x = _bert()
    labels = torch.tensor([0, 2])
    pruning = fxprune.compile(model, x, {"pruning_type": "snip_momentum", "start_step": 1, "end_step": 6,
                                         "update_frequency_on_step": 1, **HIDDEN})
    model = pruning.model.train()
    opt = pruning.attach(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    norm = model.bert.encoder.layer[0].output.LayerNorm
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(*x).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pruning.on_train_end()
    hidden = next(g for g in pruning.groups if g.normalized)
    kept = pruning._kept[hidden.index]
    assert kept.sum() == 48
    assert norm.weight.grad is not None and norm.weight.grad[torch.from_numpy(kept)].abs().sum() > 0
    assert (norm.weight[torch.from_numpy(~kept)] == 0).all()
    model.eval()
    assert_compact_matches_masked(pruning, pruning.compact(), fresh_like(x), **EXACT)


def test_state_resumes_with_the_norms_switched():
    model, x = _bert()
    pruning = fxprune.compile(model.eval(), x, HIDDEN).prune()
    state = pruning.state_dict()
    fresh = fxprune.compile(copy.deepcopy(model), x, HIDDEN)
    fresh.model.load_state_dict(pruning.model.state_dict())
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(_first(fresh.model(*x)), _first(pruning.model(*x)))


def test_a_hand_plan_that_keeps_every_hidden_channel_switches_the_norms_back():
    model, x = _bert()
    pruning = fxprune.compile(model.eval(), x, HIDDEN).prune()
    assert any(STATE in m.__dict__ for m in pruning.model.modules())
    hidden = next(g for g in pruning.groups if g.normalized)
    pruning.set_kept({hidden.index: np.ones(hidden.size, dtype=bool)})
    assert not any(STATE in m.__dict__ for m in pruning.model.modules())


def test_prune_hidden_size_must_be_a_bool():
    model, x = _bert()
    with pytest.raises(fxprune.ConfigError, match="prune_hidden_size must be True or False"):
        fxprune.compile(model.eval(), x, {"prune_hidden_size": "yes"})


class _InlineNorm(torch.nn.Module):
    """A block that normalises inline (F.layer_norm in its own forward): no norm module to switch."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)
        self.scale = torch.nn.Parameter(torch.rand(32) + 0.5)
        self.fc = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc(torch.nn.functional.layer_norm(h, (32,), self.scale))
        return self.head(h.mean(1))


def test_a_norm_computed_inline_stays_frozen_and_says_where():
    with pytest.raises(fxprune.ConfigError, match="no LayerNorm/RMSNorm modules"):
        fxprune.compile(_InlineNorm().eval(), IDS, HIDDEN)
    pruning = fxprune.compile(_InlineNorm().eval(), IDS, {"target_sparsity": 0.25})
    assert not any(g.normalized for g in pruning.groups)
    reason = pruning.grouping.blocked[("embed.weight", 1)]
    assert "normalisation statistics span this dim" in reason
    assert "test_hidden_size.py" in reason  # the source line of the inline norm


def test_switched_model_survives_deepcopy_and_torch_save(tmp_path):
    model, x = _bert()
    pruning = fxprune.compile(model.eval(), x, HIDDEN).prune()
    with torch.no_grad():
        ref = _first(pruning.model(*x))
    torch.save(pruning.model, tmp_path / "masked.pt")
    for other in (copy.deepcopy(pruning.model), torch.load(tmp_path / "masked.pt", weights_only=False)):
        norm = other.bert.embeddings.LayerNorm
        assert norm.forward.module is norm  # the switch points at the copy, not at the original
        with torch.no_grad():
            assert torch.equal(_first(other(*x)), ref)


def test_asking_for_a_hidden_size_that_cannot_be_pruned_says_why():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100)
    headless = transformers.BertModel(cfg).eval()  # returns the hidden states: their width is kept
    with pytest.raises(fxprune.ConfigError, match="prune_hidden_size=True.*LayerNorm.weight is frozen.*model output"):
        fxprune.compile(headless, IDS, HIDDEN)
    from tests.models import ARCHITECTURES

    factory, inputs = ARCHITECTURES["PlainCNN"]
    with pytest.raises(fxprune.ConfigError, match="no LayerNorm/RMSNorm modules"):
        fxprune.compile(factory(), inputs(), HIDDEN)
