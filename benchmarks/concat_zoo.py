"""Concat-heavy CNNs written out in plain torch (torchvision is not installed here): DenseNet-121,
SqueezeNet 1.1 and GoogLeNet at their published layer sizes, random init, for profiling what their
compact graphs cost."""

from __future__ import annotations

import torch
import torch.nn as nn


class _DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int, bottleneck: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(torch.relu(self.norm2(y)))], 1)


class DenseNet121(nn.Module):
    """Stem 7x7/2 (64) + max-pool, dense blocks of 6, 12, 24, 16 layers (growth 32, bottleneck 4), transitions
    halving the channels with a 2x2 average pool, final norm, global pool, classifier."""

    def __init__(self, blocks=(6, 12, 24, 16), growth: int = 32, classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.MaxPool2d(3, 2, 1)]
        channels = 64
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(_DenseLayer(channels, growth, 4))
                channels += growth
            if i < len(blocks) - 1:
                layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels // 2, 1, bias=False),
                           nn.AvgPool2d(2)]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class _Fire(nn.Module):
    def __init__(self, channels: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(channels, squeeze, 1)
        self.expand1x1, self.expand3x3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1: 3x3/2 stem (64), eight fire modules (squeeze 16-64, two expand branches concatenated),
    max-pools after the stem and fires 2 and 4, a 1x1 conv classifier and a global pool."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(), _Fire(64, 16, 64), _Fire(128, 16, 64), pool(),
            _Fire(128, 32, 128), _Fire(256, 32, 128), pool(), _Fire(256, 48, 192), _Fire(384, 48, 192),
            _Fire(384, 64, 256), _Fire(512, 64, 256))
        self.classifier = nn.Conv2d(512, classes, 1)

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.classifier(self.features(x))), 1), 1)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout, eps=1e-3),
                         nn.ReLU())


class _Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's "5x5" branch); 3x3 max-pool -> 1x1."""

    def __init__(self, cin: int, c1: int, r3: int, c3: int, r5: int, c5: int, pool: int):
        super().__init__()
        self.branch1 = _conv_bn(cin, c1, 1)
        self.branch2 = nn.Sequential(_conv_bn(cin, r3, 1), _conv_bn(r3, c3, 3, padding=1))
        self.branch3 = nn.Sequential(_conv_bn(cin, r5, 1), _conv_bn(r5, c5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _conv_bn(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    """Inception v1 as torchvision lays it out (no auxiliary heads): 7x7/2 stem (64), 1x1 (64), 3x3 (192),
    nine inception blocks 3a-5b with max-pools after the stem, 3x3, 3b and 4e, global pool, classifier."""

    BLOCKS = ((192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64), "pool",
              (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64), (512, 128, 128, 256, 24, 64, 64),
              (512, 112, 144, 288, 32, 64, 64), (528, 256, 160, 320, 32, 128, 128), "pool2",
              (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128))

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 64, 7, 2, 3), nn.MaxPool2d(3, 2, ceil_mode=True), _conv_bn(64, 64, 1),
                                   _conv_bn(64, 192, 3, padding=1), nn.MaxPool2d(3, 2, ceil_mode=True)]
        for block in self.BLOCKS:
            if block == "pool":
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            elif block == "pool2":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers.append(_Inception(*block))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1024, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {"densenet121": DenseNet121, "squeezenet1_1": SqueezeNet11, "googlenet": GoogLeNet}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    for m in model.modules():  # non-trivial norm statistics, so magnitude ranks something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
