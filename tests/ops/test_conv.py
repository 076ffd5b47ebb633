"""Convolutions: output channels pruned through weight rows; grouped and depthwise kernels keep whole groups."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.ops.harness import Block, Case, Family

aten = torch.ops.aten
# input [2, 3, 8, 8]; a 16-channel output at 8x8 is 2048 elements
OUT = 2 * 16 * 8 * 8


def image(batch):
    return torch.randn(batch, 3, 8, 8)


def block(fn, **layers):
    return lambda: Block(fn, **layers)


def head(c=16):
    return nn.Conv2d(c, 4, 1)


def grouped(conv, kernel, **kw):
    """A 1x1 conv (3->16), then the case: a grouped conv 16->16 in 4 groups, on a 1-, 2- or 3-d image."""
    view = {nn.Conv1d: lambda x: x.flatten(2), nn.Conv2d: lambda x: x, nn.Conv3d: lambda x: x[:, :, None]}[conv]
    return lambda: Block(lambda m, x: m.c(torch.relu(m.b(m.a(view(x))))), a=conv(3, 16, 1),
                         b=conv(16, 16, kernel, groups=4, **kw), c=conv(16, 4, 1))


CASES = [
    Case(aten.conv1d.default, grouped(nn.Conv1d, 3, padding=1), dim=1, macs=OUT * 4 * 3, nth=1),
    Case(aten.conv2d.default, block(lambda m, x: m.b(F.relu(m.a(x))), a=nn.Conv2d(3, 16, 3, padding=1), b=head()),
         dim=1, macs=OUT * 3 * 9, rewrites=False),
    Case(aten.conv2d.default, block(lambda m, x: m.c(F.relu(m.b(m.a(x)))), a=nn.Conv2d(3, 16, 1),
                                    b=nn.Conv2d(16, 16, 3, padding=1, groups=16), c=head()),
         dim=1, macs=OUT * 9, nth=1),  # depthwise
    Case(aten.conv2d.default, block(lambda m, x: m.c(F.relu(m.b(m.a(x)))), a=nn.Conv2d(3, 16, 1),
                                    b=nn.Conv2d(16, 16, 3, padding=1, groups=4), c=head()),
         dim=1, macs=OUT * 4 * 9, nth=1),  # grouped: whole groups of 4
    Case(aten.conv3d.default, grouped(nn.Conv3d, (1, 3, 3), padding=(0, 1, 1)), dim=1, macs=OUT * 4 * 9, nth=1),
    Case(aten.conv1d.padding, grouped(nn.Conv1d, 3, padding="same"), dim=1, macs=OUT * 4 * 3),
    Case(aten.conv2d.padding, grouped(nn.Conv2d, 3, padding="same"), dim=1, macs=OUT * 4 * 9),
    Case(aten.conv3d.padding, grouped(nn.Conv3d, (1, 3, 3), padding="same"), dim=1, macs=OUT * 4 * 9),
    Case(aten.convolution.default, block(
        lambda m, x: m.c(F.relu(torch.convolution(m.a(x), m.w, m.bias, [1, 1], [1, 1], [1, 1], False, [0, 0], 4))),
        a=nn.Conv2d(3, 16, 1), w=nn.Parameter(torch.randn(16, 4, 3, 3) * 0.1), bias=nn.Parameter(torch.randn(16)),
        c=head()), dim=1, macs=OUT * 4 * 9),
    Case(aten.convolution.default, block(
        lambda m, x: m.c(F.relu(torch.convolution(x, m.w, None, [2, 2], [0, 0], [1, 1], True, [0, 0], 1))),
        w=nn.Parameter(torch.randn(3, 16, 2, 2) * 0.1), c=head()),
        dim=1, macs=2 * 3 * 64 * 16 * 4, rewrites=False),  # transposed: every input element touches 16 * 2 * 2
    Case(aten.conv_transpose1d.default, block(lambda m, x: m.b(F.relu(m.a(x.flatten(2)))),
                                              a=nn.ConvTranspose1d(3, 16, 2, stride=2), b=nn.Conv1d(16, 4, 1)),
         dim=1, macs=2 * 3 * 64 * 16 * 2),
    Case(aten.conv_transpose2d.input, block(lambda m, x: m.b(F.relu(m.a(x))), a=nn.ConvTranspose2d(3, 16, 2, stride=2),
                                            b=head()), dim=1, macs=2 * 3 * 64 * 16 * 4),
    Case(aten.conv_transpose3d.input, block(lambda m, x: m.b(F.relu(m.a(x[:, :, None]))),
                                            a=nn.ConvTranspose3d(3, 16, (1, 2, 2), stride=(1, 2, 2)), b=nn.Conv3d(16, 4, 1)),
         dim=1, macs=2 * 3 * 64 * 16 * 4),
]

FAMILY = Family(CASES, image)

test_op, test_compact_equals_masked = FAMILY.tests()
