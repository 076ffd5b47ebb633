"""Reductions, softmax, pooling, resampling, padding: the channel dim passes, reduced and window dims freeze."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.ops.harness import Block, Case, Family

aten = torch.ops.aten


def pooled(fn):
    """Conv(3->16) -> fn over the spatial dims -> [B, 16] -> Linear(16->4)."""
    return lambda: Block(lambda m, x: m.b(fn(m.a(x))), a=nn.Conv2d(3, 16, 1), b=nn.Linear(16, 4))


def spatial(fn, dims=2, width=16):
    """Conv(3->16) on a 1-, 2- or 3-d image -> fn -> 1x1 conv (width->4)."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    view = {1: lambda x: x.flatten(2), 2: lambda x: x, 3: lambda x: x[:, :, None]}[dims]
    return lambda: Block(lambda m, x: m.b(fn(F.relu(m.a(view(x))))), a=conv(3, 16, 1), b=conv(width, 4, 1))


CASES = [
    Case(aten.mean.dim, pooled(lambda h: h.mean((2, 3)))),
    Case(aten.sum.dim_IntList, pooled(lambda h: h.sum((2, 3)))),
    Case(aten.amax.default, pooled(lambda h: h.amax((2, 3)))),
    Case(aten.amin.default, pooled(lambda h: h.amin((2, 3)))),
    Case(aten.var.correction, pooled(lambda h: aten.var.correction(h, [2, 3], correction=1))),
    Case(aten.std.correction, pooled(lambda h: aten.std.correction(h, [2, 3], correction=1))),
    Case(aten.var.dim, pooled(lambda h: h.var((2, 3)))),
    Case(aten.std.dim, pooled(lambda h: h.std((2, 3)))),
    Case(aten.logsumexp.default, pooled(lambda h: torch.logsumexp(h, (2, 3)))),
    Case(aten.norm.ScalarOpt_dim, pooled(lambda h: aten.norm.ScalarOpt_dim(h, 2, [2, 3]))),
    Case(aten.linalg_vector_norm.default, pooled(lambda h: torch.linalg.vector_norm(h, 2, (2, 3)))),
    Case(aten.max.dim, pooled(lambda h: h.flatten(2).max(2).values), dim=(0, 1)),
    Case(aten.min.dim, pooled(lambda h: h.flatten(2).min(2, keepdim=True).values[..., 0]), dim=(0, 1)),
    Case(aten.max.dim, pooled(lambda h: h.amax((2, 3)) * h.max(1).values.mean((1, 2))[:, None]), dim=1,
         frozen="max/min over this dim", on_input=True),  # a max over channels freezes them
    Case(aten.max.dim, pooled(lambda h: h.amax((2, 3)) * h.sum().max(0).values), dim=None),  # 0-d: compiles
    Case(aten.mean.dim, pooled(lambda h: h.mean((1, 2, 3))[:, None] * h.amax((2, 3))), dim=1,
         frozen="reduction over this dim", on_input=True),  # a mean over channels freezes them
    Case(aten.mean.default, pooled(lambda h: h.amax((2, 3)) + h.mean()), dim=1, frozen="reduction over all dims",
         on_input=True),
    Case(aten.sum.default, pooled(lambda h: h.amax((2, 3)) + h.sum()), dim=1, frozen="reduction over all dims",
         on_input=True),
    Case(aten.softmax.int, spatial(lambda h: h.flatten(2).softmax(-1).view_as(h)), dim=1),
    Case(aten._softmax.default, spatial(lambda h: aten._softmax(h, -1, False)), dim=1),
    Case(aten.log_softmax.int, spatial(lambda h: h.log_softmax(-1)), dim=1),
    Case(aten._log_softmax.default, spatial(lambda h: aten._log_softmax(h, -1, False)), dim=1),
    Case(aten.cumsum.default, spatial(lambda h: h.cumsum(-1)), dim=1),
    Case(aten.softmax.int, spatial(lambda h: h.softmax(1)), dim=1, frozen="softmax/cumsum normalises"),
    Case(aten.max_pool1d.default, spatial(lambda h: F.max_pool1d(h, 2), 1), dim=1),
    Case(aten.avg_pool1d.default, spatial(lambda h: F.avg_pool1d(h, 2), 1), dim=1),
    Case(aten.adaptive_avg_pool1d.default, spatial(lambda h: F.adaptive_avg_pool1d(h, 4), 1), dim=1),
    Case(aten.adaptive_max_pool1d.default, spatial(lambda h: F.adaptive_max_pool1d(h, 4), 1), dim=(0, 1)),
    Case(aten.max_pool2d.default, spatial(lambda h: F.max_pool2d(h, 2)), dim=1),
    Case(aten.avg_pool2d.default, spatial(lambda h: F.avg_pool2d(h, 2)), dim=1),
    Case(aten.adaptive_avg_pool2d.default, spatial(lambda h: F.adaptive_avg_pool2d(h, 2)), dim=1),
    Case(aten.adaptive_max_pool2d.default, spatial(lambda h: F.adaptive_max_pool2d(h, 2)), dim=(0, 1)),
    Case(aten.max_pool2d_with_indices.default, spatial(lambda h: F.max_pool2d(h, 2, return_indices=True)[0]),
         dim=(0, 1)),
    Case(aten.upsample_nearest2d.vec, spatial(lambda h: F.interpolate(h, scale_factor=2.0, mode="nearest")), dim=1),
    Case(aten.upsample_bilinear2d.vec, spatial(lambda h: F.interpolate(h, scale_factor=2.0, mode="bilinear")), dim=1),
    Case(aten.upsample_bicubic2d.vec, spatial(lambda h: F.interpolate(h, scale_factor=2.0, mode="bicubic")), dim=1),
    Case(aten._adaptive_avg_pool2d.default, spatial(lambda h: aten._adaptive_avg_pool2d(h, [2, 2])), dim=1),
    Case(aten.max_pool3d.default, spatial(lambda h: F.max_pool3d(h, (1, 2, 2)), 3), dim=1),
    Case(aten.avg_pool3d.default, spatial(lambda h: F.avg_pool3d(h, (1, 2, 2)), 3), dim=1),
    Case(aten.adaptive_avg_pool3d.default, spatial(lambda h: F.adaptive_avg_pool3d(h, (1, 2, 2)), 3), dim=1),
    Case(aten.adaptive_max_pool3d.default, spatial(lambda h: F.adaptive_max_pool3d(h, (1, 2, 2)), 3), dim=(0, 1)),
    Case(aten.pad.default, spatial(lambda h: F.pad(h, (1, 1, 1, 1), mode="reflect")), dim=1),
    Case(aten.constant_pad_nd.default, spatial(lambda h: aten.constant_pad_nd(h, [1, 1, 1, 1])), dim=1),
    Case(aten.pad.default, spatial(lambda h: F.pad(h, (0, 0, 0, 0, 0, 2)), width=18), dim=1,
         frozen="padded dim"),  # padding the channels freezes them
]

FAMILY = Family(CASES, lambda batch: torch.randn(batch, 3, 8, 8))

test_op, test_compact_equals_masked = FAMILY.tests()
