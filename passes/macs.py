"""Count multiply-accumulates and parameters by running the graph once.

MACs are counted for the ops that dominate inference cost (convolution, linear,
matmul, attention); element-wise ops are not counted. Counting from a real run of
the graph keeps the dense and the compact model measured the same way.
"""

from __future__ import annotations

import math

import torch
import torch.utils._pytree as pytree

__all__ = ["count_macs", "count_params"]

aten = torch.ops.aten


def _macs(target, args, out) -> int:
    if not isinstance(out, torch.Tensor) and target is not aten.scaled_dot_product_attention.default:
        return 0
    if target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
                  aten.conv2d.padding, aten.conv3d.padding):
        w = args[1]
        return out.numel() * math.prod(w.shape[1:])
    if target is aten.convolution.default:
        w = args[1]
        if args[6]:  # transposed: every input element touches Cout/g * kernel outputs
            return args[0].numel() * math.prod(w.shape[1:])
        return out.numel() * math.prod(w.shape[1:])
    if target in (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
        return args[0].numel() * math.prod(args[1].shape[1:])
    if target is aten.linear.default:
        return out.numel() * args[1].shape[1]
    if target in (aten.matmul.default, aten.mm.default, aten.bmm.default):
        return out.numel() * args[0].shape[-1]
    if target is aten.addmm.default:
        return out.numel() * args[1].shape[-1]
    if target is aten.scaled_dot_product_attention.default:
        q, k, v = args[:3]
        b_h_sq = q.numel() // q.shape[-1]
        return b_h_sq * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


class _Counter(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.macs = 0

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        self.macs += _macs(target, args, out)
        return out


def count_macs(gm: torch.fx.GraphModule, example_inputs: tuple) -> int:
    """MACs of one forward of a captured or compacted graph module on ``example_inputs``."""
    counter = _Counter(gm)
    with torch.no_grad():
        counter.run(*pytree.tree_leaves(example_inputs))
    return counter.macs


def count_params(module: torch.nn.Module) -> int:
    """Number of parameter elements (tied parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
