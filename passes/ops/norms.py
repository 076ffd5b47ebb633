"""Normalisation layers.

Batch and instance norm keep per-channel statistics, so their weight, bias and running
stats simply follow the channel dim. Layer and RMS norm statistics span the normalised
dims: a norm site, prunable on request with the statistics computed over kept channels
(:mod:`fxprune.norms`). Group norm spans a group of channels, so a whole group is one
unit. Capture fixes the normalised shape and the group count; compaction recomputes them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from fxprune.passes.couplings import value_key
from fxprune.passes.ops.arguments import arg
from fxprune.passes.ops.registry import register

aten = torch.ops.aten


@register(aten.batch_norm.default, aten.instance_norm.default, aten._native_batch_norm_legit_no_training.default)
def _batch_norm(node: Node, c) -> None:
    """Per-channel statistics: weight, bias and running stats follow dim 1.

    Statistics computed from the input (batch norm with ``training``, instance norm with
    ``use_input_stats``, as weight standardisation does) reduce over the other dims.
    """
    out = node if c.output_keys(node) == [node.name] else (node, 0)
    x = node.args[0]
    n = len(c.shape(x))
    if node.target is aten.batch_norm.default:
        reduced = {d for d in range(n) if d != 1} if arg(node, 5, "training") else set()
    elif node.target is aten.instance_norm.default:
        reduced = set(range(2, n)) if arg(node, 5, "use_input_stats") else set()
    else:
        reduced = set()
    for d in range(n):
        c.identity(x, d, out, d)
        if d in reduced:
            c.normalise(x, d, "statistics computed from the input span this dim")
    for p in node.args[1:5]:
        if isinstance(p, Node):
            c.identity(p, 0, out, 1)


def _normalised_shape(node: Node, size) -> None:
    """The normalised shape is the new size of the input's last dims."""
    x, shape = node.args[:2]
    n = len(size.shapes[value_key(x)])
    new = [size(x, d) for d in range(n - len(shape), n)]
    node.args = (x, new, *node.args[2:])


@register(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default, rewrite=_normalised_shape)
def _layer_norm(node: Node, c) -> None:
    """Statistics span the normalised dims (a norm site); leading dims pass through."""
    out = node if c.output_keys(node) == [node.name] else (node, 0)
    x, shape = node.args[0], node.args[1]
    n = len(c.shape(x))
    for d in range(n):
        c.identity(x, d, out, d)
    for p in node.args[2:4]:
        if isinstance(p, Node):
            for i in range(1, len(c.shape(p)) + 1):
                c.identity(p, -i, out, -i)
    for d in range(n - len(shape), n):
        c.normalise(x, d, "normalisation statistics span this dim")


def _group_count(node: Node, size) -> None:
    """Channels per group are unchanged, so the group count follows the new width."""
    x, groups = node.args[:2]
    per = size.shapes[value_key(x)][1] // groups
    node.args = (x, size(x, 1) // per, *node.args[2:])


@register(aten.group_norm.default, rewrite=_group_count)
def _group_norm(node: Node, c) -> None:
    """Statistics span a group of channels: a whole group is one unit, so removing it is exact."""
    x, groups = node.args[0], node.args[1]
    xs = c.shape(x)
    for d in range(len(xs)):
        c.identity(x, d, node, d)
    for p in node.args[2:4]:
        if isinstance(p, Node):
            c.identity(p, 0, node, 1)
    size = xs[1] // groups
    ch = np.arange(xs[1])
    c.pairs(node, 1, node, 1, ch, (ch // size) * size)
