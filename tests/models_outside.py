"""Structures found in architectures outside the test zoo, written from their description.

Each is a small model around one structure that the group pass once got wrong or gave
up on: an attention-bias table read through an eval-mode cache (LeViT, TinyViT,
EfficientFormer), packed-QKV attention split with ``unbind`` (timm ViT/DeiT/EVA), a
weight-standardised convolution (NF-ResNet), global response normalisation (ConvNeXt-V2),
gMLP's spatial gating unit, a region with autocast disabled (EfficientViT), and
``torch.nn.TransformerEncoder`` with its hidden size pruned (its inference fast path reads
the LayerNorm weights without calling the LayerNorms).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CachedBiasAttention", "PackedQKVViT", "StdConvNet", "GRNNet", "GatedMLP", "AutocastOffNet", "TorchEncoderNet",
           "STRUCTURES"]


class _BiasAttention(nn.Module):
    """Attention over a 4x4 grid with a learned bias per head and relative offset, cached in eval mode."""

    def __init__(self, dim: int = 32, heads: int = 4, key_dim: int = 8, grid: int = 4):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.qkv = nn.Linear(dim, heads * key_dim * 3)
        self.proj = nn.Linear(heads * key_dim, dim)
        points = list(itertools.product(range(grid), range(grid)))
        offsets, idxs = {}, []
        for p in points:
            for q in points:
                off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.randn(heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(len(points), len(points)),
                             persistent=False)
        self.ab = None

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        self.ab = None if mode else self.attention_biases[:, self.attention_bias_idxs]
        return self

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, 3, self.key_dim).permute(3, 0, 2, 1, 4)
        bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
        attn = (q @ k.transpose(-2, -1)) * self.key_dim ** -0.5 + bias
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class CachedBiasAttention(nn.Module):
    """LeViT-style: patch embedding, two cached-bias attention blocks with MLPs, mean-pooled head."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(_BiasAttention(dim) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.Hardswish(), nn.Linear(2 * dim, dim))
                                  for _ in range(2))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for attn, mlp in zip(self.blocks, self.mlps):
            x = x + attn(x)
            x = x + mlp(x)
        return self.head(x.mean(1))


class _PackedAttention(nn.Module):
    """timm's Attention: one qkv projection, reshaped to [3, B, heads, N, head_dim] and unbound."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class PackedQKVViT(nn.Module):
    """A two-block pre-norm ViT on 4x4 patches with timm-style packed-QKV attention."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.attns = nn.ModuleList(_PackedAttention(dim) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(2))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for i in range(2):
            x = x + self.attns[i](self.norms[2 * i](x))
            x = x + self.mlps[i](self.norms[2 * i + 1](x))
        return self.head(x.mean(1))


class ScaledStdConv2d(nn.Conv2d):
    """NF-ResNet's convolution: the weight standardised over its input channels and kernel, times a gain."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    """Two weight-standardised conv stages with a residual, pooled head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = ScaledStdConv2d(3, width, 3, padding=1)
        self.conv1 = ScaledStdConv2d(width, 2 * width, 3, padding=1)
        self.conv2 = ScaledStdConv2d(2 * width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.conv2(F.relu(self.conv1(x)))
        return self.head(x.mean((2, 3)))


class GRN(nn.Module):
    """ConvNeXt-V2's global response normalisation on channels-last input."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(1, 1, 1, dim) * 0.1)
        self.beta = nn.Parameter(torch.randn(1, 1, 1, dim) * 0.1)

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class _V2Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pw2(self.grn(F.gelu(self.pw1(y))))
        return x + y.permute(0, 3, 1, 2)


class GRNNet(nn.Module):
    """A ConvNeXt-V2 stem and two blocks with GRN inside the MLP."""

    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(_V2Block(dim), _V2Block(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SpatialGatingUnit(nn.Module):
    """gMLP: half the channels, normalised and mixed over tokens, gate the other half."""

    def __init__(self, dim: int, tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim // 2)
        self.proj = nn.Linear(tokens, tokens)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2)).transpose(-1, -2)
        return u * v


class GatedMLP(nn.Module):
    """Two gMLP blocks over 16 patch tokens."""

    def __init__(self, dim: int = 32, tokens: int = 16, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), SpatialGatingUnit(4 * dim, tokens),
                          nn.Linear(2 * dim, dim)) for _ in range(2))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(1))


class AutocastOffNet(nn.Module):
    """EfficientViT-style: an attention-like product computed in float32 with autocast disabled."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        with torch.autocast("cpu", enabled=False):
            kv = k.float().transpose(-1, -2) @ v.float()
            out = q.float() @ kv
        return self.head(self.proj(out).mean(1))


class TorchEncoderNet(nn.Module):
    """Patch embedding, one ``nn.TransformerEncoderLayer`` (4 heads of 8, FFN 64, batch first), a mean-pooled head."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


STRUCTURES = {
    "cached-bias-attention": CachedBiasAttention,
    "packed-qkv-vit": PackedQKVViT,
    "std-conv": StdConvNet,
    "grn": GRNNet,
    "gated-mlp": GatedMLP,
    "autocast-off": AutocastOffNet,
    "torch-encoder": TorchEncoderNet,
}
