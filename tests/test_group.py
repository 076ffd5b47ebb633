"""The group pass, rule by rule: which channels couple, which are frozen and why.

Each case builds a tiny module, runs trace → group, asserts the groups' structure,
then prunes and compacts to check the rule's rewrite (compact == masked).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from tests.checks import assert_compact_matches_masked, fresh_like
from tests.models import ARCHITECTURES

# compact == masked on a fresh draw of the inputs, which compact() never saw (it checks the example);
# float32 rounding of the shorter sums is far below this, a wrong or shifted channel far above
EXACT = {"atol": 1e-5, "rtol": 1e-5}


def _compile(model, *inputs, **cfg):
    torch.manual_seed(0)
    return fxprune.compile(model.eval(), inputs, {"target_sparsity": 0.5, "prune_domain": "local", **cfg})


def _group_of(pruning, name, dim):
    for g in pruning.groups:
        for m in g.members:
            if m.name == name and m.dim == dim:
                return g, m
    return None, None


def _exact(pruning):
    pruning.prune()
    small = pruning.compact()
    assert_compact_matches_masked(pruning, small, fresh_like(pruning.example_inputs), **EXACT)
    return small


def test_flatten_to_linear_maps_a_channel_to_a_block_of_features():
    factory, inputs = ARCHITECTURES["PlainCNN"]
    p = _compile(factory(), *inputs())
    g, conv = _group_of(p, "conv3.weight", 0)
    _, fc = _group_of(p, "fc1.weight", 1)
    assert fc is not None and g is _group_of(p, "fc1.weight", 1)[0]
    assert g.size == 32 and len(fc.atoms) == 32 * 16
    assert g.channel_range(fc, 5) == (5 * 16, 6 * 16)  # channel 5 = features 80..95
    _exact(p)


def test_cat_offsets_and_branch_parts():
    factory, inputs = ARCHITECTURES["DenseNetLike"]
    p = _compile(factory(), *inputs())
    big = max(p.groups, key=lambda g: g.size)
    assert big.size == 40  # 16 stem + 3 x 8 growth channels, all one concat stream
    assert any(len(part) == 8 for part in big.parts)
    _exact(p)


class Conv1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 4, 1)
        self.c = nn.Conv3d(2, 6, 3, padding=1)
        self.d = nn.Conv3d(6, 2, 1)

    def forward(self, x, v):
        return self.b(F.relu(self.a(x))), self.d(F.gelu(self.c(v)))


def test_conv1d_and_conv3d():
    p = _compile(Conv1d3d(), torch.randn(1, 4, 10), torch.randn(1, 2, 4, 4, 4))
    assert sorted(g.size for g in p.groups) == [6, 8]
    _exact(p)


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.out = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        return self.out(F.relu(self.inorm(self.gn(self.conv(x)))))


def test_group_norm_prunes_whole_norm_groups():
    p = _compile(GroupNormNet(), torch.randn(1, 3, 8, 8))
    (g,) = p.groups
    assert g.size == 4  # one unit per GroupNorm group of 4 channels
    _, conv = _group_of(p, "conv.weight", 0)
    assert list(conv.indices(1)) == [4, 5, 6, 7]
    _exact(p)
    small = p.compact()
    gn = next(n for n in small.graph.nodes if n.target == torch.ops.aten.group_norm.default)
    assert gn.args[1] == 2  # 4 groups -> 2 groups


class SliceSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 1)
        self.x1 = nn.Conv2d(10, 4, 1)
        self.x2 = nn.Conv2d(14, 4, 1)
        self.x3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        a, b = torch.split(y, [10, 14], dim=1)
        return self.x1(a) + self.x2(b) + self.x3(y[:, 4:10])


def test_split_sizes_and_slice_bounds_are_rewritten():
    p = _compile(SliceSplit(), torch.randn(1, 3, 6, 6))
    g, _ = _group_of(p, "conv.weight", 0)
    assert g.size == 24
    keep = np.ones(24, dtype=bool)
    keep[[0, 5, 6, 12, 20]] = False  # 1 before the slice, 2 inside it, 2 in the second split
    p.set_kept({g.index: keep})
    small = p.compact()
    split = next(n for n in small.graph.nodes if n.target == torch.ops.aten.split_with_sizes.default)
    assert split.args[1] == [7, 12]
    sl = next(n for n in small.graph.nodes if n.target == torch.ops.aten.slice.Tensor and n.args[1] == 1)
    assert sl.args[2:4] == (3, 7)
    assert_compact_matches_masked(p, small, fresh_like(p.example_inputs), **EXACT)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.cumprod(self.a(x), dim=0))


def test_op_without_rule_freezes_with_its_name_and_line():
    p = _compile(Unknown(), torch.randn(3, 8))
    assert p.groups == []
    reason = p.grouping.blocked[("a.weight", 0)]
    assert "no rule for aten.cumprod.default" in reason and "test_group.py" in reason


class Reduce(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        return self.c(h - h.mean(-1, keepdim=True)) + self.b(x).softmax(-1).sum(-1, keepdim=True)


def test_non_parametric_reductions_freeze_their_dim():
    p = _compile(Reduce(), torch.randn(2, 8))
    assert "reduction over this dim" in p.grouping.blocked[("a.weight", 0)]
    assert "softmax" in p.grouping.blocked[("b.weight", 0)]


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, ids):
        return self.out(F.relu(self.fc(self.emb(ids)))).mean(1)


def test_embedding_columns_couple_vocabulary_frozen():
    p = _compile(Embed(), torch.randint(0, 50, (2, 5)))
    g, _ = _group_of(p, "emb.weight", 1)
    assert g is not None and g.size == 16 and _group_of(p, "fc.weight", 1)[0] is g
    assert "vocabulary" in p.grouping.blocked[("emb.weight", 0)]
    _exact(p)


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.fc = nn.Linear(12, 12)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        y = self.fc(self.conv(x).permute(0, 2, 3, 1))
        return self.out(y.transpose(1, 3).transpose(2, 3))


def test_permute_and_transpose_carry_channels():
    p = _compile(ChannelsLast(), torch.randn(1, 3, 5, 5))
    g, _ = _group_of(p, "conv.weight", 0)
    assert _group_of(p, "fc.weight", 1)[0] is g
    _exact(p)


def test_grouped_conv_prunes_whole_conv_groups_and_rewrites_groups_arg():
    factory, inputs = ARCHITECTURES["ResNeXtLike"]
    p = _compile(factory(), *inputs())
    g, m = _group_of(p, "block1.conv2.weight", 0)
    assert g.size == 4 and len(m.indices(0)) == 8  # 32 channels in 4 conv groups
    small = _exact(p)
    groups = [n.args[6] for n in small.graph.nodes if n.target == torch.ops.aten.conv2d.default and len(n.args) > 6]
    assert 2 in groups


def test_depthwise_conv_couples_in_and_out():
    factory, inputs = ARCHITECTURES["MobileNetV2Like"]
    p = _compile(factory(), *inputs())
    dw = next(name for name, prm in p.model.named_parameters()
              if prm.dim() == 4 and prm.shape[1] == 1 and prm.shape[0] > 1)
    g, _ = _group_of(p, dw, 0)
    producer = [m for m in g.parameters if m.dim == 0 and m.name != dw and m.name.endswith("weight")
                and p.model.get_parameter(m.name).dim() == 4]
    assert producer  # the 1x1 expand conv feeding the depthwise conv is in the same group
    _exact(p)


def test_model_outputs_keep_their_size():
    factory, inputs = ARCHITECTURES["MLP"]
    p = _compile(factory(), *inputs())
    last = [n for n, prm in p.model.named_parameters() if prm.dim() == 2][-1]
    assert "model output" in p.grouping.blocked[(last, 0)]


class TiedHead(nn.Module):
    """Input embedding and output head share one weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.down(F.relu(self.up(self.emb(ids)))))


def test_tied_weights_are_one_member():
    p = _compile(TiedHead(), torch.randint(0, 50, (2, 5)))
    g, m = _group_of(p, "emb.weight", 1)
    assert g is not None and g.size == 16
    assert _group_of(p, "up.weight", 1)[0] is g and _group_of(p, "down.weight", 0)[0] is g
    assert _group_of(p, "head.weight", 1)[0] is g  # the same tensor under its second name
    small = _exact(p)
    assert small.get_parameter("emb.weight").shape == (50, 8)
    assert small.get_parameter("head.weight") is small.get_parameter("emb.weight")  # still tied


class NarrowStackFlip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.a = nn.Conv2d(6, 4, 1)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        s = torch.stack([y, y.flip(1)], 0).sum(0)  # channel c meets channel 15 - c
        return self.a(y.narrow(1, 2, 6)) + self.b(s)


def test_narrow_stack_and_flip():
    p = _compile(NarrowStackFlip(), torch.randn(1, 3, 5, 5))
    g, conv = _group_of(p, "conv.weight", 0)
    assert g.size == 8 and list(conv.indices(conv.atoms[0])) == [0, 15]  # flip pairs channel 0 with 15
    keep = np.ones(8, dtype=bool)
    keep[conv.atoms[[3, 5]]] = False  # removes channels 3, 12 and 5, 10
    p.set_kept({g.index: keep})
    small = p.compact()
    sl = next(n for n in small.graph.nodes if n.target == torch.ops.aten.slice.Tensor and n.args[1] == 1)
    assert sl.args[2:4] == (2, 6)  # narrow(2, 6) over channels 2..7 lost 3 and 5: 4 left
    assert_compact_matches_masked(p, small, fresh_like(p.example_inputs), **EXACT)


class MatmulTransposedWeight(nn.Module):
    """``x @ self.w1.T`` (Falcon's linear) and ``h @ self.w2.t().to(dtype)``: weights seen through layout ops.
    With ``mix``, the hidden channels also meet an activation @ activation contraction."""

    def __init__(self, mix: bool):
        super().__init__()
        self.mix = mix
        self.w1 = nn.Parameter(torch.randn(24, 8))
        self.w2 = nn.Parameter(torch.randn(4, 24))

    def forward(self, x):
        h = torch.relu(x @ self.w1.T)
        y = h @ self.w2.t().to(x.dtype)
        return (y, (h @ h.transpose(-1, -2)).sum()) if self.mix else y


def test_matmul_against_transposed_weights_prunes_exactly():
    p = _compile(MatmulTransposedWeight(mix=False), torch.randn(2, 5, 8))
    g, _ = _group_of(p, "w1", 0)
    assert g is not None and g.size == 24 and _group_of(p, "w2", 1)[0] is g
    _exact(p)


def test_activation_matmul_still_freezes_next_to_a_transposed_weight():
    p = _compile(MatmulTransposedWeight(mix=True), torch.randn(2, 5, 8))
    assert _group_of(p, "w1", 0)[0] is None
    assert "matmul of two activations" in p.grouping.blocked[("w1", 0)]


class EinsumAttention(nn.Module):
    """Heads written as einsums: q.k and attention.v contract activations, the projections a parameter."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Parameter(torch.randn(4, 8, 16) * 0.3) for _ in range(3))  # [heads, head_dim, in]
        self.o = nn.Parameter(torch.randn(16, 4, 8) * 0.3)  # [out, heads, head_dim]

    def forward(self, x):  # x: [batch, tokens, 16]
        q, k, v = (torch.einsum("...ti,hdi->...htd", x, w) for w in (self.q, self.k, self.v))
        attention = torch.einsum("bhtd,bhsd->bhts", q, k).softmax(-1)
        return torch.einsum("bhtd,ohd->bto", torch.einsum("bhts,bhsd->bhtd", attention, v), self.o)


def test_einsum_heads_prune_and_its_activation_contractions_freeze():
    p = _compile(EinsumAttention(), torch.randn(2, 5, 16))
    heads, _ = _group_of(p, "q", 0)
    assert heads is not None and _group_of(p, "k", 0)[0] is heads and _group_of(p, "v", 0)[0] is heads
    assert _group_of(p, "o", 1)[0] is heads  # the output projection reads every head
    assert "einsum sums over this dim without a parameter" in p.grouping.blocked[("q", 1)]  # q.k contracts head_dim
    _exact(p)


class IndexFromChannels(nn.Module):
    """A lookup whose index is computed from the channels: pruning them would shrink the index, not the output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.table = nn.Linear(8, 16), nn.Linear(16, 4), nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + self.table[(h > 0).long()].sum((1, 2))[:, None]


def test_channels_used_as_an_index_are_frozen():
    p = _compile(IndexFromChannels(), torch.randn(3, 8))
    assert "used as an index" in p.grouping.blocked[("a.weight", 0)]
    assert _group_of(p, "b.weight", 1)[0] is None
