"""Convolutions: output channels are weight rows and bias, input channels weight columns.

Depthwise convolutions tie each input channel to its block of outputs; grouped ones make
a whole convolution group one unit. The window dims are frozen. Capture fixes the
``groups`` argument, which compaction recomputes from the new widths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.fx import Node

from fxprune.passes.couplings import value_key
from fxprune.passes.ops.arguments import arg
from fxprune.passes.ops.registry import register

__all__ = ["CONV_ND"]

aten = torch.ops.aten

CONV_ND = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
           aten.conv2d.padding, aten.conv3d.padding)


def _conv(node, c, x, w, b, groups, transposed) -> None:
    xs, ws, os_ = c.shape(x), c.shape(w), c.shape(node)
    if len(xs) != len(ws) or (transposed and not c.is_param(w)):
        c.freeze_all(node, "convolution with an unbatched input, or transposed with a weight that is not a parameter")
        return
    c.identity(x, 0, node, 0)
    for d in range(2, len(xs)):
        c.freeze(x, d, "convolution window")
        c.freeze(node, d, "convolution window")
        c.freeze(w, d, "convolution kernel")
    if isinstance(b, Node):
        c.identity(b, 0, node, 1)
    cin, cout = xs[1], os_[1]
    if transposed:
        if groups != 1:
            c.freeze_all(node, "grouped transposed convolution")
            return
        c.identity(x, 1, w, 0)
        c.identity(node, 1, w, 1)
        return
    c.identity(node, 1, w, 0)
    cin_g, cout_g = ws[1], cout // groups
    if groups == 1 and not c.is_param(w):
        # output channels stay exact (each reads its own weight row). Input channels are exact only if the
        # computed weight ignores removed ones, which standardisation (w - mean) / std over them does not:
        # a site, so that the module runs on kept input channels alone (or frozen where it cannot)
        c.identity(x, 1, w, 1)
        c.normalise(x, 1, "input channels of a weight computed in the graph (weight standardisation)")
    elif groups == 1:
        c.identity(x, 1, w, 1)
    elif cin_g == 1:  # depthwise (channel multiplier cout_g)
        c.freeze(w, 1, "depthwise kernel has one input channel per group")
        c.block(x, 1, node, 1, cout_g)
    else:  # grouped: a whole group of in and out channels is one unit
        c.freeze(w, 1, "channels inside a convolution group")
        ci, co = np.arange(cin), np.arange(cout)
        c.pairs(x, 1, node, 1, ci, (ci // cin_g) * cout_g)
        c.pairs(node, 1, node, 1, co, (co // cout_g) * cout_g)


def _new_groups(node: Node, size) -> int:
    """Groups after compaction: a group's input width (the weight's dim 1) is unchanged."""
    return size(node.args[0], 1) // size.shapes[value_key(node.args[1])][1]


def _conv_nd_groups(node: Node, size) -> None:
    if arg(node, 6, "groups", 1) != 1:
        args = list(node.args) + [None] * (7 - len(node.args))
        args[2:6] = [arg(node, i, n, d) for i, n, d in
                     ((2, "bias", None), (3, "stride", [1]), (4, "padding", [0]), (5, "dilation", [1]))]
        args[6] = _new_groups(node, size)
        node.args, node.kwargs = tuple(args), {}


def _forward_macs(args, out) -> int:
    """Every output element reads one input group's channels over the kernel."""
    return out.numel() * math.prod(args[1].shape[1:])


def _transposed_macs(args, out) -> int:
    """Every input element touches Cout/groups * kernel outputs."""
    return args[0].numel() * math.prod(args[1].shape[1:])


@register(*CONV_ND, rewrite=_conv_nd_groups, macs=_forward_macs)
def _conv_nd(node: Node, c) -> None:
    """out channels = weight rows = bias; in channels = weight cols (per group); window dims frozen."""
    _conv(node, c, node.args[0], node.args[1], arg(node, 2, "bias"), arg(node, 6, "groups", 1), False)


def _convolution_groups(node: Node, size) -> None:
    if node.args[8] != 1 and not node.args[6]:
        args = list(node.args)
        args[8] = _new_groups(node, size)
        node.args = tuple(args)


def _convolution_macs(args, out) -> int:
    return _transposed_macs(args, out) if args[6] else _forward_macs(args, out)


@register(aten.convolution.default, rewrite=_convolution_groups, macs=_convolution_macs)
def _convolution(node: Node, c) -> None:
    """The general form (``transposed`` and ``groups`` are arguments 6 and 8)."""
    _conv(node, c, node.args[0], node.args[1], node.args[2], node.args[8], bool(node.args[6]))


@register(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
          macs=_transposed_macs)
def _conv_transpose(node: Node, c) -> None:
    """Transposed: the weight is [in, out/groups, kernel]; grouped ones are frozen."""
    _conv(node, c, node.args[0], node.args[1], arg(node, 2, "bias"), arg(node, 6, "groups", 1), True)
