"""Structures from architectures outside the test zoo (tests/models_outside.py), each at 50% channels.

Every model: compact == masked on a fresh batch in float32 (max abs error <= 1e-4 relative)
and float64 (<= 1e-9), ONNX == torch, and the groups that must prune (heads, MLP channels,
standardised-conv channels) asserted pruned by the compact parameter shapes.
"""

import warnings

import onnxruntime
import pytest
import torch

import fxprune
from fxprune.errors import PruningError
from fxprune.exporters import export_onnx
from tests.models_outside import STRUCTURES

CONFIG = {"target_sparsity": 0.5, "pruning_scope": "local", "excluded_names": ["head"]}
# structure -> (needs prune_hidden_size, {compact parameter: expected shape})
EXPECT = {
    "cached-bias-attention": (False, {"blocks.0.qkv.weight": (48, 16), "blocks.0.proj.weight": (16, 16),
                                      "mlps.0.0.weight": (32, 16)}),
    # the residual stream is LayerNorm-spanned here and pruned only with prune_hidden_size
    "packed-qkv-vit": (False, {"attns.0.qkv.weight": (48, 32), "attns.1.proj.weight": (32, 16),
                               "mlps.1.0.weight": (32, 32)}),
    "std-conv": (True, {"conv1.weight": (16, 8, 3, 3), "conv2.weight": (8, 16, 3, 3), "conv1.gain": (16, 1, 1, 1)}),
    "grn": (True, {"blocks.0.pw1.weight": (32, 8), "blocks.0.grn.gamma": (1, 1, 1, 32), "blocks.1.pw2.weight": (8, 32)}),
    "gated-mlp": (True, {"blocks.0.1.weight": (64, 16), "blocks.0.3.norm.weight": (32,), "blocks.0.4.weight": (16, 32)}),
    "autocast-off": (False, {"embed.weight": (16, 3, 4, 4), "qkv.weight": (96, 16), "proj.weight": (16, 32)}),
    # the masked model runs nn.TransformerEncoderLayer's fused fast path under no_grad unless its norms have hooks
    "torch-encoder": (True, {"embed.weight": (16, 3, 4, 4), "encoder.layers.0.self_attn.in_proj_weight": (48, 16),
                             "encoder.layers.0.linear1.weight": (32, 16), "encoder.layers.0.norm1.weight": (16,)}),
}


def _pruned(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = STRUCTURES[name]().to(dtype).eval()
    hidden, _ = EXPECT[name]
    pruning = fxprune.compile(model, (torch.randn(2, 3, 16, 16, dtype=dtype),), {**CONFIG, "prune_hidden_size": hidden})
    pruning.prune()
    return pruning, pruning.compact(atol=1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_prunes_what_it_must_and_compact_equals_masked(name, tmp_path):
    pruning, small = _pruned(name)
    _, shapes = EXPECT[name]
    assert {k: tuple(small.get_parameter(k).shape) for k in shapes} == shapes
    x = torch.randn(3, 3, 16, 16)
    pruning.model.train().eval()  # refreshes eval-mode caches (the attention-bias table) from the masked weights
    with torch.no_grad():
        want, got = pruning.model(x), small(x)
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
    export_onnx(small, tmp_path / "small.onnx", (x,))
    session = onnxruntime.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    (ort,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(ort), got, atol=1e-4 * got.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", [n for n in STRUCTURES if n != "autocast-off"])  # that one computes in float32
def test_exact_in_float64(name):
    pruning, small = _pruned(name, torch.float64)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    pruning.model.train().eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), pruning.model(x), atol=1e-9, rtol=0)


def test_a_parameter_the_graph_never_reads_is_frozen_and_explained():
    """The bias table is read through a cache captured as a constant: pruning it would desynchronise them."""
    model = STRUCTURES["cached-bias-attention"]().eval()
    e = fxprune.explain(model, (torch.randn(2, 3, 16, 16),))
    assert e.blocked[("blocks.0.attention_biases", 0)].startswith("blocks.0.attention_biases[0]: not read by the "
                                                                  "captured graph")
    assert not any("attention_biases" in m.name for g in e.groups for m in g.members)
    assert e.constants == ["blocks.0.ab", "blocks.1.ab"]
    assert e.likely_caches() == {f"blocks.{i}.ab": [f"blocks.{i}.attention_bias_idxs", f"blocks.{i}.attention_biases"]
                                 for i in (0, 1)}
    assert "blocks.0.ab is probably a cache of blocks.0.attention_bias_idxs, blocks.0.attention_biases" in str(e)


def test_heads_of_packed_qkv_attention_are_one_group_each():
    pruning = fxprune.compile(STRUCTURES["packed-qkv-vit"]().eval(), (torch.randn(2, 3, 16, 16),), CONFIG)
    heads = [g for g in pruning.groups if any(m.name == "attns.0.qkv.weight" and m.dim == 0 for m in g.members)]
    assert [g.size for g in heads] == [4]  # 4 heads, each 3 x 8 rows of the packed projection


@pytest.mark.parametrize("name", ["std-conv", "grn", "gated-mlp"])
def test_groups_spanned_by_statistics_need_prune_hidden_size_and_say_so(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruning = fxprune.compile(STRUCTURES[name]().eval(), (torch.randn(2, 3, 16, 16),), CONFIG)
    assert any("no group was prunable with this config" in str(w.message) for w in caught)
    pruning.prune()
    with pytest.raises(PruningError, match="no group was prunable with this config: .* pruned only with "
                                           "prune_hidden_size=True"):
        pruning.compact()


def test_macs_inside_an_autocast_disabled_region_are_counted():
    pruning, _ = _pruned("autocast-off")
    # embed, qkv, k^T v, q (k^T v), proj, head on [2, 16 tokens, 32]
    dense = 2 * 32 * 16 * 48 + 2 * 16 * 96 * 32 + 2 * 32 * 32 * 16 + 2 * 16 * 32 * 32 + 2 * 16 * 32 * 32 + 2 * 10 * 32
    assert pruning.report().macs_before == dense
