"""Slices, selections, items of multi-output ops and embedding lookups."""

import operator

import torch
import torch.nn as nn

from tests.ops.harness import Block, Case, Family

aten = torch.ops.aten


def lin(fn, out=16):
    """Linear(8->16) -> fn -> Linear(out->4)."""
    return lambda: Block(lambda m, x: m.b(fn(m, m.a(x))), a=nn.Linear(8, 16), b=nn.Linear(out, 4))


def _embed(m, x):
    tokens = (x.abs() * 10).long() % 20  # [B, 8] token ids
    return m.b(m.e(tokens))


def _rows(m, x):
    """Rows picked by values (tokens routed to experts): the channels pass through."""
    return m.b(m.a(x)[x[:, 0].argsort()])


def _pairs(m, x):
    """One row of each sample, chosen by values (CLIP's end-of-text token): two index tensors together."""
    h = torch.stack([m.a(x), -m.a(x)], 1)  # [B, 2, 16]
    return m.b(h[torch.arange(h.shape[0]), (x[:, 0] > 0).long()])


def _gathered(m, x):
    """Rows gathered by an index that is expanded along the channels (ViTMAE's kept patches)."""
    h = m.a(x)[:, None].expand(-1, 3, -1)  # [B, 3, 16]
    index = (x[:, :2].abs() * 3).long().clamp(max=2)[:, :, None].expand(-1, -1, 16)
    return m.b(torch.gather(h, 1, index).sum(1))


def _looked_up(m, x):
    """An index computed from the channels themselves: the index is frozen, so the channels it reads are too."""
    h = m.a(x)
    return m.b(h) + m.t[(h > 0).long()].sum((1, 2))[:, None]


def _halves(m, x):
    h = m.a(x)
    return m.b(h[:, ::2]) + m.c(h[:, 1::2])


def _columns(m, x):
    """Channels picked by values: the picked dim is frozen."""
    return m.b(m.a(x)[:, (x[0].abs() * 4).long() % 16][:, :8])


CASES = [
    Case(aten.slice.Tensor, lin(lambda m, h: h[:, 2:12], out=10), nth=1),  # nth=0 is the full slice of the batch
    # interleaved halves multiplied (gate and up projections stored alternately): channels 2j and 2j+1 go together,
    # so the kept ones stay evenly spaced and the compact slice is strided again
    Case(aten.slice.Tensor, lin(lambda m, h: h[:, ::2] * h[:, 1::2], out=8), nth=1),
    # even and odd channels read by different layers: the kept even ones are not evenly spaced, an index_select
    Case(aten.slice.Tensor, lambda: Block(_halves, a=nn.Linear(8, 16), b=nn.Linear(8, 4), c=nn.Linear(8, 4)), nth=1),
    Case(aten.narrow.default, lin(lambda m, h: h.narrow(1, 2, 10), out=10)),
    Case(aten.select.int, lin(lambda m, h: torch.stack([h, -h, 2 * h], 1)[:, 1]), dim=1),
    Case(aten.select.int, lin(lambda m, h: h[:, 3:4].expand(-1, 16) + h[:, 3, None]), dim=1, on_input=True,
         frozen="select picks one index"),
    Case(aten.unbind.int, lin(lambda m, h: sum(torch.stack([h, -h, 2 * h]).unbind(0))), dim=(1, 1)),
    Case(aten.unbind.int, lin(lambda m, h: sum(h.view(-1, 2, 8).unbind(1)), out=8), dim=1, on_input=True,
         frozen="unbind splits this dim"),
    Case(operator.getitem, lin(lambda m, h: h.split(8, 1)[1], out=8), dim=1),
    Case(aten.index.Tensor, lambda: Block(_rows, a=nn.Linear(8, 16), b=nn.Linear(16, 4)), dim=-1),
    Case(aten.index.Tensor, lambda: Block(_columns, a=nn.Linear(8, 16), b=nn.Linear(8, 4)), dim=1, on_input=True,
         frozen="indexed by tensor values"),
    Case(aten.index.Tensor, lambda: Block(_pairs, a=nn.Linear(8, 16), b=nn.Linear(16, 4)), dim=-1),
    Case(aten.index.Tensor, lambda: Block(_looked_up, a=nn.Linear(8, 16), b=nn.Linear(16, 4),
                                          t=nn.Parameter(torch.randn(2, 4))), dim=1,
         frozen="dims of an index tensor"),  # tests/test_group.py checks the channels it reads are frozen
    # a strided slice from a negative start to past the end
    Case(aten.slice.Tensor, lin(lambda m, h: h[:, -15:100:3] * 2, out=5), nth=1),
    Case(aten.gather.default, lambda: Block(_gathered, a=nn.Linear(8, 16), b=nn.Linear(16, 4)), dim=-1),
    Case(aten.embedding.default, lambda: Block(_embed, e=nn.Embedding(20, 16), b=nn.Linear(16, 4)), dim=-1),
]

FAMILY = Family(CASES, lambda batch: torch.randn(batch, 8))

test_op, test_compact_equals_masked = FAMILY.tests()


def test_a_strided_slice_read_by_places_keeps_them_out_of_the_state_dict():
    _, compact = FAMILY.run()
    assert any(n.target == aten.index_select.default for n in compact.graph.nodes)
    assert not [k for k in compact.state_dict() if "_fxprune_places" in k]
