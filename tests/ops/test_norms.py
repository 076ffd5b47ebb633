"""Norm layers: per-channel statistics follow the channels; LayerNorm/RMSNorm groups prune with prune_hidden_size."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

from tests.ops.harness import Block, Case, Family

aten = torch.ops.aten


def conv_norm(norm):
    """Conv(3->16) -> norm -> Conv(16->4) on [B, 3, 8, 8]."""
    return lambda: Block(lambda m, x: m.b(F.relu(m.n(m.a(x)))), a=nn.Conv2d(3, 16, 1), n=norm(), b=nn.Conv2d(16, 4, 1))


def linear_norm(norm):
    """Linear(3*8*8 -> 16) -> norm -> Linear(16 -> 4): the norm's statistics span the 16 channels."""
    return lambda: Block(lambda m, x: m.b(m.n(m.a(x.flatten(1)))), a=nn.Linear(192, 16), n=norm(), b=nn.Linear(16, 4))


class NativeLayerNorm(nn.Module):
    """A layer norm written with the aten op that returns (out, mean, rstd)."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.native_layer_norm(x, [x.shape[-1]], self.weight, self.bias, 1e-5)[0]


class LegitBatchNorm(nn.Module):
    """Inference batch norm through the aten op that reads running statistics."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.randn(n))
        self.register_buffer("mean", torch.randn(n))
        self.register_buffer("var", torch.rand(n) + 0.5)

    def forward(self, x):
        return aten._native_batch_norm_legit_no_training(x, self.weight, self.bias, self.mean, self.var, 0.1, 1e-5)[0]


def _bn():
    bn = nn.BatchNorm2d(16)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 1.5)
    return bn


CASES = [
    Case(aten.batch_norm.default, conv_norm(_bn), dim=1),
    Case(aten.instance_norm.default, conv_norm(lambda: nn.InstanceNorm2d(16, affine=True)), dim=1),
    Case(aten._native_batch_norm_legit_no_training.default, conv_norm(lambda: LegitBatchNorm(16)), dim=(0, 1)),
    Case(aten.group_norm.default, conv_norm(lambda: nn.GroupNorm(4, 16)), dim=1),
    Case(aten.layer_norm.default, linear_norm(lambda: nn.LayerNorm(16))),
    Case(aten.native_layer_norm.default, linear_norm(lambda: NativeLayerNorm(16)), dim=(0, -1)),
    Case(aten.rms_norm.default, linear_norm(lambda: nn.RMSNorm(16))),
]

FAMILY = Family(CASES, lambda batch: torch.randn(batch, 3, 8, 8), {"prune_hidden_size": True})

test_op, test_compact_equals_masked = FAMILY.tests()


def test_layer_norm_frozen_without_prune_hidden_size():
    """By default a group spanned by norm statistics is not pruned (the hidden size is opt-in)."""
    model = CASES[4].block().eval()
    pruning = fxprune.compile(model, (FAMILY.example(2),), {"target_sparsity": 0.5})
    assert [g.normalized for g in pruning.groups] == [True]
    pruning.prune()
    kept = pruning.kept_channels
    assert [len(kept[g.index]) for g in pruning.groups] == [16]
