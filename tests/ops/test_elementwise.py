"""Element-wise ops: a channel of the input is the same channel of the output."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.ops.harness import Block, Case, Family

aten = torch.ops.aten


def lin(fn, **extra):
    """Linear(8->16) -> fn -> Linear(16->4): fn's 16 channels are pruned to 8."""
    return lambda: Block(lambda m, x: m.b(fn(m, m.a(x))), a=nn.Linear(8, 16), b=nn.Linear(16, 4), **extra)


def param(*shape):
    return nn.Parameter(torch.rand(*shape) + 0.5)


def gate(op):
    """A comparison's bool output gates the activation."""
    return lin(lambda m, h: h * op(h))


CASES = [
    Case(aten.relu.default, lin(lambda m, h: torch.relu(h))),
    Case(aten.relu_.default, lin(lambda m, h: torch.relu_(h * 1))),
    Case(aten.gelu.default, lin(lambda m, h: F.gelu(h))),
    Case(aten.gelu_.default, lin(lambda m, h: aten.gelu_(h * 1))),
    Case(aten.silu.default, lin(lambda m, h: F.silu(h))),
    Case(aten.silu_.default, lin(lambda m, h: F.silu(h * 1, inplace=True))),
    Case(aten.sigmoid.default, lin(lambda m, h: torch.sigmoid(h))),
    Case(aten.sigmoid_.default, lin(lambda m, h: (h * 1).sigmoid_())),
    Case(aten.tanh.default, lin(lambda m, h: torch.tanh(h))),
    Case(aten.tanh_.default, lin(lambda m, h: (h * 1).tanh_())),
    Case(aten.hardtanh.default, lin(lambda m, h: F.hardtanh(h))),
    Case(aten.hardtanh_.default, lin(lambda m, h: F.hardtanh(h * 1, inplace=True))),
    Case(aten.hardswish.default, lin(lambda m, h: F.hardswish(h))),
    Case(aten.hardswish_.default, lin(lambda m, h: F.hardswish(h * 1, inplace=True))),
    Case(aten.hardsigmoid.default, lin(lambda m, h: F.hardsigmoid(h))),
    Case(aten.hardsigmoid_.default, lin(lambda m, h: F.hardsigmoid(h * 1, inplace=True))),
    Case(aten.leaky_relu.default, lin(lambda m, h: F.leaky_relu(h, 0.1))),
    Case(aten.leaky_relu_.default, lin(lambda m, h: F.leaky_relu(h * 1, 0.1, inplace=True))),
    Case(aten.elu.default, lin(lambda m, h: F.elu(h))),
    Case(aten.elu_.default, lin(lambda m, h: F.elu(h * 1, inplace=True))),
    Case(aten.mish.default, lin(lambda m, h: F.mish(h))),
    Case(aten.softplus.default, lin(lambda m, h: F.softplus(h))),
    Case(aten.relu6.default, lin(lambda m, h: F.relu6(h))),
    Case(aten.prelu.default, lin(lambda m, h: m.act(h), act=nn.PReLU(16))),
    Case(aten.neg.default, lin(lambda m, h: -h)),
    Case(aten.abs.default, lin(lambda m, h: h.abs())),
    Case(aten.exp.default, lin(lambda m, h: h.exp())),
    Case(aten.log.default, lin(lambda m, h: (h * h + 1).log())),
    Case(aten.sqrt.default, lin(lambda m, h: (h * h + 1).sqrt())),
    Case(aten.rsqrt.default, lin(lambda m, h: (h * h + 1).rsqrt())),
    Case(aten.erf.default, lin(lambda m, h: torch.erf(h))),
    Case(aten.sin.default, lin(lambda m, h: h.sin())),
    Case(aten.cos.default, lin(lambda m, h: h.cos())),
    Case(aten.square.default, lin(lambda m, h: torch.square(h))),
    Case(aten.reciprocal.default, lin(lambda m, h: (h * h + 1).reciprocal())),
    Case(aten.clamp.default, lin(lambda m, h: h.clamp(-0.5, 0.5))),
    Case(aten.clamp_min.default, lin(lambda m, h: torch.clamp_min(h, 0.1))),
    Case(aten.clamp_max.default, lin(lambda m, h: torch.clamp_max(h, 0.1))),
    Case(aten.pow.Tensor_Scalar, lin(lambda m, h: h ** 3)),
    Case(aten.pow.Tensor_Tensor, lin(lambda m, h: (h * h + 1) ** m.p, p=param(16))),
    Case(aten.add.Tensor, lin(lambda m, h: h + m.p, p=param(16))),
    Case(aten.add_.Tensor, lin(lambda m, h: (h * 1).add_(m.p), p=param(16))),
    Case(aten.sub.Tensor, lin(lambda m, h: h - m.p, p=param(16))),
    Case(aten.sub_.Tensor, lin(lambda m, h: (h * 1).sub_(m.p), p=param(16))),
    Case(aten.mul.Tensor, lin(lambda m, h: h * m.p, p=param(16))),
    Case(aten.mul_.Tensor, lin(lambda m, h: (h + 0).mul_(m.p), p=param(16))),
    Case(aten.div.Tensor, lin(lambda m, h: h / (h * h + 1))),  # a masked divisor would be 0/0
    Case(aten.div_.Tensor, lin(lambda m, h: (h * 1).div_(h * h + 1))),
    Case(aten.add.Scalar, lin(lambda m, h: aten.add.Scalar(h, 1.0))),
    Case(aten.sub.Scalar, lin(lambda m, h: aten.sub.Scalar(h, 1.0))),
    Case(aten.mul.Scalar, lin(lambda m, h: aten.mul.Scalar(h, 2.0))),
    Case(aten.div.Scalar, lin(lambda m, h: aten.div.Scalar(h, 2.0))),
    Case(aten.rsub.Scalar, lin(lambda m, h: 1 - h)),
    Case(aten.rsub.Tensor, lin(lambda m, h: torch.rsub(h, m.p), p=param(16))),
    Case(aten.maximum.default, lin(lambda m, h: torch.maximum(h, m.p), p=param(16))),
    Case(aten.minimum.default, lin(lambda m, h: torch.minimum(h, m.p), p=param(16))),
    Case(aten.where.self, lin(lambda m, h: torch.where(h > 0, h, m.p), p=param(16))),
    Case(aten.masked_fill.Scalar, lin(lambda m, h: h.masked_fill(h > 0, 0.5))),
    Case(aten.masked_fill.Tensor, lin(lambda m, h: h.masked_fill(h > 0, m.v), v=param(()))),
    Case(aten.clone.default, lin(lambda m, h: h.clone())),
    Case(aten.contiguous.default, lin(lambda m, h: h.t().contiguous().t()), dim=0),
    Case(aten.alias.default, lin(lambda m, h: aten.alias(h))),
    Case(aten.detach.default, lin(lambda m, h: h.detach())),
    Case(aten._to_copy.default, lin(lambda m, h: aten._to_copy(h, dtype=torch.float32).double())),
    Case(aten.to.dtype, lin(lambda m, h: h.to(torch.float32).to(torch.float64))),
    Case(aten.to.dtype_layout, lin(lambda m, h: aten.to.dtype_layout(h, dtype=torch.float32).double())),
    Case(aten.to.device, lin(lambda m, h: aten.to.device(h, torch.device("cpu"), torch.float64, copy=True))),
    Case(aten.dropout.default, lin(lambda m, h: F.dropout(h, 0.1, training=False))),
    Case(aten.dropout_.default, lin(lambda m, h: F.dropout(h * 1, 0.1, training=False, inplace=True))),
    Case(aten.feature_dropout.default, lin(lambda m, h: F.dropout1d(h[:, :, None], 0.1, training=False)[:, :, 0]), dim=1),
    Case(aten.alpha_dropout.default, lin(lambda m, h: F.alpha_dropout(h, 0.1, training=False))),
    Case(aten.zeros_like.default, lin(lambda m, h: h + torch.zeros_like(h))),
    Case(aten.ones_like.default, lin(lambda m, h: h * torch.ones_like(h))),
    Case(aten.full_like.default, lin(lambda m, h: h * torch.full_like(h, 2.0))),
    Case(aten.empty_like.default, lin(lambda m, h: torch.where(torch.ones_like(h, dtype=torch.bool), h,
                                                               torch.empty_like(h)))),
    Case(aten.detach_.default, lin(lambda m, h: (h * 1).detach_())),
    Case(aten.lift_fresh_copy.default, lin(lambda m, h: h * torch.tensor([float(i % 3 + 1) for i in range(16)],
                                                                         dtype=torch.float64))),
    Case(aten.eq.Tensor, lin(lambda m, h: h * (h == m.p), p=param(16))),
    Case(aten.eq.Scalar, gate(lambda h: h == 0)),
    Case(aten.ne.Tensor, lin(lambda m, h: h * (h != m.p), p=param(16))),
    Case(aten.ne.Scalar, gate(lambda h: h != 0)),
    Case(aten.lt.Tensor, lin(lambda m, h: h * (h < m.p), p=param(16))),
    Case(aten.lt.Scalar, gate(lambda h: h < 0)),
    Case(aten.le.Tensor, lin(lambda m, h: h * (h <= m.p), p=param(16))),
    Case(aten.le.Scalar, gate(lambda h: h <= 0)),
    Case(aten.gt.Tensor, lin(lambda m, h: h * (h > m.p), p=param(16))),
    Case(aten.gt.Scalar, gate(lambda h: h > 0)),
    Case(aten.ge.Tensor, lin(lambda m, h: h * (h >= m.p), p=param(16))),
    Case(aten.ge.Scalar, gate(lambda h: h >= 0)),
    Case(aten.logical_and.default, gate(lambda h: torch.logical_and(h > 0, h < 1))),
    Case(aten.logical_or.default, gate(lambda h: torch.logical_or(h > 1, h < 0))),
    Case(aten.logical_not.default, gate(lambda h: torch.logical_not(h > 0))),
    Case(aten.bitwise_and.Tensor, gate(lambda h: torch.bitwise_and(h > 0, h < 1))),
    Case(aten.bitwise_or.Tensor, gate(lambda h: torch.bitwise_or(h > 1, h < 0))),
    Case(aten.bitwise_not.default, gate(lambda h: torch.bitwise_not(h > 0))),
    Case(aten.__and__.Tensor, gate(lambda h: (h > 0) & (h < 1))),
    Case(aten.__or__.Tensor, gate(lambda h: (h > 1) | (h < 0))),
    Case(aten.type_as.default, lin(lambda m, h: h.float().type_as(m.p), p=param(1))),
]

FAMILY = Family(CASES, lambda batch: torch.randn(batch, 8))

test_op, test_compact_equals_masked = FAMILY.tests()
