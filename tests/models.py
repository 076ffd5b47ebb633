"""Small reference architectures shared by the test-suite.

Every model here is a plain ``torch.nn.Module`` written the way users write
them (module attributes + a ``forward`` that mixes modules with functional
ops, ``torch.cat``/``chunk``/``view``/``flatten``, hard-coded shapes where real
models have them).  They are tiny (8-64 channels, 32x32 inputs) so that a
forward pass takes milliseconds, and all prunable widths are even (mostly
multiples of 4) so that 50% channel pruning is meaningful.

Public API
----------
``ARCHITECTURES``
    ``name -> (model_factory, example_inputs_factory)``.  The model factory
    seeds ``torch.manual_seed(0)``, builds the model, randomises its
    normalisation layers (see :func:`randomize_norms`) and returns it in eval
    mode; the inputs factory returns a tuple of example positional inputs
    (deterministic, independent of the global RNG).
``hf_models()``
    Same shape of dict for tiny randomly-initialised Hugging Face vision
    models built from configs in code (nothing is downloaded).
``randomize_norms(model, seed=0)``
    Gives every BatchNorm random positive running statistics and affine
    parameters (and LayerNorm/GroupNorm random positive affine parameters) so
    that normalisation layers are not identities.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ARCHITECTURES",
    "hf_models",
    "randomize_norms",
    "PlainCNN",
    "ResNetBasic",
    "ResNetBottleneck",
    "DenseNetLike",
    "MobileNetV2Like",
    "ResNeXtLike",
    "InceptionLike",
    "ShuffleNetLike",
    "SENet",
    "MLP",
    "ConvNeXtLike",
    "TwoLayerTransformer",
]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make normalisation layers non-trivial, deterministically.

    * BatchNorm (1d/2d/3d, SyncBN, HF wrappers deriving from ``_BatchNorm``):
      ``running_mean`` ~ U(0.0, 0.5), ``running_var`` ~ U(0.5, 1.5),
      ``weight`` ~ U(0.5, 1.5), ``bias`` ~ U(0.0, 0.5).
    * LayerNorm / GroupNorm with affine parameters: ``weight`` ~ U(0.5, 1.5),
      ``bias`` ~ U(0.0, 0.5).

    All values are positive.  Uses a private generator so the global RNG is
    untouched.  Returns ``model`` for chaining.
    """
    g = torch.Generator().manual_seed(seed)

    def _u(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * (hi - lo) + lo)

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                _u(m.running_mean, 0.0, 0.5)
            if m.running_var is not None:
                _u(m.running_var, 0.5, 1.5)
            if m.weight is not None:
                _u(m.weight, 0.5, 1.5)
            if m.bias is not None:
                _u(m.bias, 0.0, 0.5)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            if getattr(m, "weight", None) is not None:
                _u(m.weight, 0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                _u(m.bias, 0.0, 0.5)
    return model


def _image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- #
# PlainCNN
# --------------------------------------------------------------------------- #
class PlainCNN(nn.Module):
    """conv-bn-relu x3 with a (shared) maxpool, flatten -> Linear -> ReLU -> Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        # 32x32 input -> three 2x poolings -> 4x4 spatial: each conv3 channel
        # maps to a contiguous block of 16 features of fc1's input.
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = self.pool(F.relu(self.bn3(self.conv3(x))))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


# --------------------------------------------------------------------------- #
# ResNet (basic blocks)
# --------------------------------------------------------------------------- #
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetBasic(nn.Module):
    """Stem + identity basic block + strided basic block with 1x1 downsample + GAP + fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(
            16,
            32,
            stride=2,
            downsample=nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32)),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# ResNet (bottleneck blocks)
# --------------------------------------------------------------------------- #
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, width: int | None = None):
        super().__init__()
        width = planes if width is None else width
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetBottleneck(nn.Module):
    """Stem + bottleneck with projection shortcut + identity bottleneck (expansion 4) + GAP + fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(
            Bottleneck(16, 8, downsample=nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))),
            Bottleneck(32, 8),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * Bottleneck.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# DenseNet-like
# --------------------------------------------------------------------------- #
class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-Conv3x3 producing ``growth_rate`` channels, concatenated to its input."""

    def __init__(self, in_channels: int, growth_rate: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv(F.relu(self.norm(x)))
        return torch.cat([x, new], 1)


class DenseNetLike(nn.Module):
    """Stem -> dense block (3 layers, growth 8: 16->24->32->40) -> transition (40->20, avgpool) -> GAP -> fc."""

    def __init__(self, num_classes: int = 10, growth_rate: int = 8):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        c = 16
        layers = []
        for _ in range(3):
            layers.append(DenseLayer(c, growth_rate))
            c += growth_rate
        self.block = nn.Sequential(*layers)
        self.trans_norm = nn.BatchNorm2d(c)
        self.trans_conv = nn.Conv2d(c, c // 2, 1, bias=False)
        self.trans_pool = nn.AvgPool2d(2, stride=2)
        self.norm5 = nn.BatchNorm2d(c // 2)
        self.classifier = nn.Linear(c // 2, num_classes)

    def forward(self, x):
        x = self.conv0(x)
        x = self.block(x)
        x = self.trans_pool(self.trans_conv(F.relu(self.trans_norm(x))))
        x = F.relu(self.norm5(x))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- #
# MobileNetV2-like
# --------------------------------------------------------------------------- #
class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            # pw expand
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            # dw
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            # pw-linear project
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Like(nn.Module):
    """Stem (s2) -> IR(16->16, res) -> IR(16->24, s2) -> IR(24->24, res) -> 1x1 conv 64 -> GAP -> fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True)),
            InvertedResidual(16, 16, 1, 4),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(inplace=True)),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- #
# ResNeXt-like
# --------------------------------------------------------------------------- #
class ResNeXtLike(nn.Module):
    """Stem -> two ResNeXt bottlenecks (1x1 -> grouped 3x3 (groups=4, width 32) -> 1x1), residual adds."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.block1 = Bottleneck(
            32, 16, groups=4, width=32,
            downsample=nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64)),
        )
        self.block2 = Bottleneck(64, 16, groups=4, width=32)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.block2(self.block1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# Inception-like
# --------------------------------------------------------------------------- #
class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionLike(nn.Module):
    """Stem -> 4 branches (1x1 | 1x1->3x3 | 1x1->5x5 | maxpool->1x1) cat (8+16+8+8=40) -> 1x1 conv 32 -> GAP -> fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = BasicConv2d(3, 16, kernel_size=3, padding=1)
        self.branch1x1 = BasicConv2d(16, 8, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(16, 8, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(8, 16, kernel_size=3, padding=1)
        self.branch5x5_1 = BasicConv2d(16, 4, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(4, 8, kernel_size=5, padding=2)
        self.branch_pool = BasicConv2d(16, 8, kernel_size=1)
        self.mix = BasicConv2d(40, 32, kernel_size=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        x = torch.cat([branch1x1, branch3x3, branch5x5, branch_pool], 1)
        x = self.mix(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# ShuffleNet-v2-like
# --------------------------------------------------------------------------- #
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, num_channels, height, width)
    return x


class ShuffleUnit(nn.Module):
    """Stride-1 ShuffleNet-v2 unit: split, transform the second half, concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        branch_features = channels // 2
        self.branch2 = nn.Sequential(
            nn.Conv2d(branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, 1, 1, groups=branch_features, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch2(x2)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetLike(nn.Module):
    """Stem (3->32) -> two ShuffleNet-v2 units (32 ch) -> 1x1 conv 64 -> GAP -> fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleUnit(32), ShuffleUnit(32))
        self.conv5 = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.stage2(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # global pool
        return self.fc(x)


# --------------------------------------------------------------------------- #
# SENet
# --------------------------------------------------------------------------- #
class SELayer(nn.Module):
    """Squeeze-excitation with Linear layers (classic SENet implementation)."""

    def __init__(self, channel: int, reduction: int = 4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation with 1x1 convs (torchvision-style)."""

    def __init__(self, input_channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.avgpool(x)
        scale = self.activation(self.fc1(scale))
        scale = self.scale_activation(self.fc2(scale))
        return scale * x


class SEBasicBlock(nn.Module):
    def __init__(self, channels: int, se: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = se

    def forward(self, x):
        residual = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.se(out)
        out = out + residual
        return F.relu(out)


class SENet(nn.Module):
    """Stem (3->32) -> SE basic block (Linear SE) -> SE basic block (1x1-conv SE) -> GAP -> fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layer1 = SEBasicBlock(32, SELayer(32, reduction=4))
        self.layer2 = SEBasicBlock(32, SqueezeExcitation(32, 8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# MLP
# --------------------------------------------------------------------------- #
class MLP(nn.Module):
    """Linear(64,128) - ReLU - Linear(128,64) - GELU - Linear(64,10)."""

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 64)
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.act1(self.fc1(x))
        x = F.gelu(self.fc2(x))
        return self.fc3(x)


class PreNormMLP(nn.Module):
    """A pre-norm residual stream of width 32 (LayerNorm and RMSNorm) with two MLP blocks and a head."""

    def __init__(self, in_features: int = 64, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.proj = nn.Linear(in_features, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width), nn.RMSNorm(width)])
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                     for _ in range(2)])
        self.final = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.proj(x)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(self.final(h))


# --------------------------------------------------------------------------- #
# ConvNeXt-like
# --------------------------------------------------------------------------- #
class ConvNeXtBlock(nn.Module):
    """dwconv7x7 -> permute NHWC -> LayerNorm -> Linear(4x) -> GELU -> Linear -> gamma * x -> permute -> residual."""

    def __init__(self, dim: int, layer_scale_init_value: float = 0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Real ConvNeXt initialises this to 1e-6; a larger value keeps the
        # branch numerically relevant for pruning-equivalence tests.
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return input + x


class ConvNeXtLike(nn.Module):
    """Patchify stem (k4 s4, 3->32) -> 2 ConvNeXt blocks (dim 32, MLP 128) -> global mean -> LayerNorm -> head."""

    def __init__(self, num_classes: int = 10, dim: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.stages = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stages(x)
        x = self.norm(x.mean([-2, -1]))  # global average pooling, (N, C, H, W) -> (N, C)
        return self.head(x)


# --------------------------------------------------------------------------- #
# Transformer
# --------------------------------------------------------------------------- #
class TwoLayerTransformer(nn.Module):
    """nn.TransformerEncoder with 2 layers (d_model 32, 4 heads, FFN 64, batch_first) + per-token Linear head."""

    def __init__(self, d_model: int = 32, nhead: int = 4, dim_feedforward: int = 64, num_classes: int = 10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #
def _factory(cls: type[nn.Module], *, norms: bool = True) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = cls()
        if norms:
            randomize_norms(model)
        return model.eval()

    make.__name__ = f"make_{cls.__name__}"
    make.__qualname__ = make.__name__
    return make


def _image_inputs() -> tuple:
    return (_image(1, 3, 32, 32),)


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]] = {
    "PlainCNN": (_factory(PlainCNN), _image_inputs),
    "ResNetBasic": (_factory(ResNetBasic), _image_inputs),
    "ResNetBottleneck": (_factory(ResNetBottleneck), _image_inputs),
    "DenseNetLike": (_factory(DenseNetLike), _image_inputs),
    "MobileNetV2Like": (_factory(MobileNetV2Like), _image_inputs),
    "ResNeXtLike": (_factory(ResNeXtLike), _image_inputs),
    "InceptionLike": (_factory(InceptionLike), _image_inputs),
    "ShuffleNetLike": (_factory(ShuffleNetLike), _image_inputs),
    "SENet": (_factory(SENet), _image_inputs),
    "MLP": (_factory(MLP, norms=False), lambda: (_image(2, 64),)),
    "ConvNeXtLike": (_factory(ConvNeXtLike), _image_inputs),
    "TwoLayerTransformer": (_factory(TwoLayerTransformer), lambda: (_image(2, 8, 32),)),
}


def hf_models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]]:
    """Tiny randomly-initialised Hugging Face vision backbones, built from configs in code.

    Nothing is downloaded.  Each factory seeds ``torch.manual_seed(0)``,
    randomises the normalisation layers (HF initialises BatchNorm to an
    identity) and returns the model in eval mode.  Inputs are
    ``(pixel_values,)``.  Raises ImportError if transformers is missing.
    """
    import transformers  # noqa: F401  (fail early if unavailable)
    from transformers import (
        ConvNextConfig,
        ConvNextModel,
        EfficientNetConfig,
        EfficientNetModel,
        MobileNetV1Config,
        MobileNetV1Model,
        MobileNetV2Config,
        MobileNetV2Model,
        ResNetConfig,
        ResNetModel,
    )

    def build(model_cls, config_cls, **cfg) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            torch.manual_seed(0)
            model = model_cls(config_cls(**cfg))
            randomize_norms(model)
            return model.eval()

        make.__name__ = f"make_{model_cls.__name__}"
        return make

    def pixels(size: int) -> Callable[[], tuple]:
        return lambda: (_image(1, 3, size, size),)

    return {
        "hf_resnet_bottleneck": (
            build(ResNetModel, ResNetConfig, layer_type="bottleneck", depths=[1, 1],
                  hidden_sizes=[32, 64], embedding_size=16),
            pixels(32),
        ),
        "hf_resnet_basic": (
            build(ResNetModel, ResNetConfig, layer_type="basic", depths=[1, 1],
                  hidden_sizes=[16, 32], embedding_size=16),
            pixels(32),
        ),
        "hf_convnext": (
            build(ConvNextModel, ConvNextConfig, num_stages=2, depths=[1, 1], hidden_sizes=[16, 32],
                  layer_scale_init_value=0.5),
            pixels(32),
        ),
        "hf_mobilenet_v2": (
            build(MobileNetV2Model, MobileNetV2Config, depth_multiplier=0.35, image_size=64),
            pixels(64),
        ),
        "hf_mobilenet_v1": (
            build(MobileNetV1Model, MobileNetV1Config, depth_multiplier=0.25, image_size=64),
            pixels(64),
        ),
        # depthwise MBConv blocks with squeeze-and-excitation gates and SiLU; hidden_dim is the top conv's width
        "hf_efficientnet": (
            build(EfficientNetModel, EfficientNetConfig, width_coefficient=0.25, depth_coefficient=0.5,
                  image_size=64, hidden_dim=320),
            pixels(64),
        ),
    }
