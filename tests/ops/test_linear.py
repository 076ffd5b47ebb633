"""Linear layers, products against a parameter, attention heads and mixture-of-experts grouped matmuls."""

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

from tests.ops.harness import Block, Case, Family

aten = torch.ops.aten


def block(fn, **layers):
    return lambda: Block(fn, **layers)


def weight(*shape):
    return nn.Parameter(torch.randn(*shape) * 0.3)


def _bmm(m, x):
    """Two [B, 8] halves of the channels, each times its own [8, 12] matrix: [2, B, 8] @ [2, 8, 12]."""
    h = m.a(x).view(-1, 2, 8).transpose(0, 1)
    return torch.bmm(F.relu(torch.bmm(h, m.w)), m.w2).sum(0)


def _attention(m, x):
    """Four heads of size 4 over a sequence of 2 tokens."""
    b = x.shape[0]
    t = x.view(b, 2, 4)
    q, k, v = (p(t).view(b, 2, 4, 4).transpose(1, 2) for p in (m.q, m.k, m.v))
    return m.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 2, 16))


def _experts(m, x):
    """Rows split in order among 3 experts, each row times its expert's [16, 12] matrix (Hugging Face MoE)."""
    h = m.a(x)
    expert = torch.arange(h.shape[0]) * 3 // h.shape[0]  # sorted: the rows of expert 0 first
    offsets = torch.histc(expert.double(), bins=3, min=0, max=2).cumsum(0).int()
    return m.b(F.relu(torch.ops.transformers.grouped_mm_fallback(h, m.w, offsets)))


CASES = [
    Case(aten.linear.default, block(lambda m, x: m.b(F.relu(m.a(x))), a=nn.Linear(8, 16), b=nn.Linear(16, 4)),
         macs=2 * 16 * 8),
    Case(aten.matmul.default, block(lambda m, x: m.b(F.relu(torch.matmul(m.a(x)[:, None], m.w)[:, 0])),
                                    a=nn.Linear(8, 16), w=weight(16, 12), b=nn.Linear(12, 4)), macs=2 * 12 * 16),
    Case(aten.mm.default, block(lambda m, x: m.b(F.relu(torch.mm(m.a(x), m.w))), a=nn.Linear(8, 16), w=weight(16, 12),
                                b=nn.Linear(12, 4)), macs=2 * 12 * 16),
    Case(aten.bmm.default, block(_bmm, a=nn.Linear(8, 16), w=weight(2, 8, 12), w2=weight(2, 12, 4)), macs=2 * 2 * 12 * 8),
    Case(aten.addmm.default, block(lambda m, x: m.b(F.relu(torch.addmm(m.bias, m.a(x), m.w))), a=nn.Linear(8, 16),
                                   bias=weight(12), w=weight(16, 12), b=nn.Linear(12, 4)), macs=2 * 12 * 16),
    Case(aten.scaled_dot_product_attention.default,
         block(_attention, q=nn.Linear(4, 16), k=nn.Linear(4, 16), v=nn.Linear(4, 16), o=nn.Linear(16, 4)),
         dim=1, macs=(2 * 4 * 2) * 2 * (4 + 4)),  # heads pruned whole
    Case(aten.einsum.default, block(lambda m, x: m.b(F.relu(torch.einsum("bi,ij->bj", m.a(x), m.w))), a=nn.Linear(8, 16),
                                   w=weight(16, 12), b=nn.Linear(12, 4)), macs=2 * 16 * 12),
    # an ellipsis for the leading dims, the weight stored (out, in)
    Case(aten.einsum.default, block(lambda m, x: m.b(F.relu(torch.einsum("...i,ji->...j", m.a(x), m.w))),
                                   a=nn.Linear(8, 16), w=weight(12, 16), b=nn.Linear(12, 4)), macs=2 * 16 * 12),
    Case("transformers.grouped_mm_fallback.default",
         block(_experts, a=nn.Linear(8, 16), w=weight(3, 16, 12), b=nn.Linear(12, 4)), macs=2 * 12 * 16),
]

FAMILY = Family(CASES, lambda batch: torch.randn(batch, 8))

test_op, test_compact_equals_masked = FAMILY.tests()
