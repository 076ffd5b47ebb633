"""Views, permutations, broadcasting, concatenation and splits: channels keep their identity across them."""

import torch
import torch.nn as nn

from tests.ops.harness import Block, Case, Family

aten = torch.ops.aten


def lin(fn, width=16, out=16):
    """Linear(8->width) -> fn -> Linear(out->4) on the last dim."""
    return lambda: Block(lambda m, x: m.b(fn(m, m.a(x))), a=nn.Linear(8, width), b=nn.Linear(out, 4))


def two(fn):
    """Two producers of 16 channels each, combined by fn, read by a Linear(32->4)."""
    return lambda: Block(lambda m, x: m.b(fn(m.a(x), m.c(x))), a=nn.Linear(8, 16), c=nn.Linear(8, 16),
                         b=nn.Linear(32, 4))


def pieces(fn):
    """fn splits 16 channels in two pieces; each piece has its own reader."""
    return lambda: Block(lambda m, x: sum(r(p) for r, p in zip((m.b, m.c), fn(m.a(x)))), a=nn.Linear(8, 16),
                         b=nn.LazyLinear(4), c=nn.LazyLinear(4))


def heads(h):
    return h.view(-1, 4, 4)


CASES = [
    Case(aten.view.default, lin(lambda m, h: heads(h).relu().view(-1, 16)), dim=1),  # 16 -> 4 groups of 4
    Case(aten.reshape.default, lin(lambda m, h: aten.reshape(h, [-1, 4, 4]).relu().flatten(1)), dim=1),
    Case(aten._unsafe_view.default, lin(lambda m, h: aten._unsafe_view(h, [-1, 4, 4]).relu().flatten(1)), dim=1),
    Case(aten.unflatten.int, lin(lambda m, h: aten.unflatten(h, 1, [4, 4]).relu().flatten(1)), dim=1),
    Case(aten.flatten.using_ints, lin(lambda m, h: heads(h).relu().flatten(1)), dim=1, rewrites=False),
    Case(aten.squeeze.dim, lin(lambda m, h: h[:, None].squeeze(1))),
    Case(aten.squeeze.dims, lin(lambda m, h: aten.squeeze.dims(h[:, None], [1]))),
    Case(aten.squeeze.default, lin(lambda m, h: h[:, None].squeeze())),
    Case(aten.unsqueeze.default, lin(lambda m, h: h.unsqueeze(1)[:, 0])),
    Case(aten.view_as.default, lin(lambda m, h: h.relu().view_as(h))),
    Case(aten.reshape_as.default, lin(lambda m, h: aten.reshape_as(h.relu(), h))),
    Case(aten.expand.default, lin(lambda m, h: h[:, :, None].expand(h.shape[0], 16, 3).sum(-1)), dim=1),
    Case(aten.permute.default, lin(lambda m, h: h[:, :, None].permute(0, 2, 1)[:, 0]), dim=2),
    Case(aten.transpose.int, lin(lambda m, h: h[:, :, None].transpose(1, 2)[:, 0]), dim=2),
    Case(aten.swapaxes.default, lin(lambda m, h: aten.swapaxes(h[:, :, None], 1, 2)[:, 0]), dim=2),
    Case(aten.t.default, lin(lambda m, h: h.t().relu().t()), dim=0),
    Case(aten.numpy_T.default, lin(lambda m, h: aten.numpy_T(h).relu().t()), dim=0),
    Case(aten.cat.default, two(lambda a, c: torch.cat([a, c], 1))),
    Case(aten.concat.default, two(lambda a, c: aten.concat([a, c], 1))),
    Case(aten.stack.default, two(lambda a, c: torch.stack([a, c], 1).flatten(1)), dim=2, rewrites=False),
    Case(aten.split.Tensor, pieces(lambda h: h.split(8, 1)), dim=(0, 1)),
    Case(aten.split_with_sizes.default, pieces(lambda h: h.split([4, 12], 1)), dim=(1, 1)),
    Case(aten.chunk.default, pieces(lambda h: aten.chunk(h, 2, 1)), dim=(0, 1)),
    Case(aten.split.sizes, pieces(lambda h: aten.split.sizes(h, [8, 8], 1)), dim=(1, 1)),
    Case(aten.unsafe_split.Tensor, pieces(lambda h: aten.unsafe_split(h, 8, 1)), dim=(0, 1)),
    Case(aten.tensor_split.sections, pieces(lambda h: torch.tensor_split(h, 2, 1)), dim=(0, 1)),
    Case(aten.zeros.default, lin(lambda m, h: h + torch.zeros(h.shape[0], 16))),
    Case(aten.ones.default, lin(lambda m, h: h * torch.ones(h.shape[0], 16))),
    Case(aten.full.default, lin(lambda m, h: h + torch.full((h.shape[0], 16), 0.5))),
    Case(aten.new_zeros.default, lin(lambda m, h: h + h.new_zeros(h.shape[0], 16))),
    Case(aten.new_ones.default, lin(lambda m, h: h * h.new_ones(h.shape[0], 16))),
    Case(aten.new_full.default, lin(lambda m, h: h + h.new_full((h.shape[0], 16), 0.5))),
    Case(aten.tensor_split.indices, pieces(lambda h: torch.tensor_split(h, [4], 1)), dim=(1, 1)),
    Case(aten.flip.default, lin(lambda m, h: h.flip(1))),
    Case(aten._assert_tensor_metadata.default, lin(lambda m, h: h.to(torch.float32).double()), dim=None),
    Case(aten.repeat.default, lin(lambda m, h: h.repeat(1, 2), out=32)),  # two copies of the channels, side by side
    Case(aten.repeat.default, lin(lambda m, h: h.repeat(3, 1, 1).sum(0))),  # a leading dim added
    Case(aten.repeat_interleave.self_int, lin(lambda m, h: h.unsqueeze(1).repeat_interleave(2, dim=1).sum(1)),
         rewrites=False),
    Case(aten.repeat_interleave.self_int, lin(lambda m, h: h.repeat_interleave(2, dim=1), out=32), dim=1,
         rewrites=False),  # each channel next to its copy: they go together
    # rows (the dynamic batch) repeated, as tokens are per expert: the channels still pass
    Case(aten.repeat_interleave.self_int, lin(lambda m, h: h.repeat_interleave(2, dim=0)[::2]), rewrites=False),
    Case(aten.repeat_interleave.self_int, lin(lambda m, h: torch.repeat_interleave(h, 2, dim=1, output_size=32),
                                               out=32), dim=1),
    Case(aten.tensor_split.indices, pieces(lambda h: torch.tensor_split(h, [12, 4], 1)[::2]), dim=(0, 1),
         frozen="unsorted", rewrites=False),  # pieces h[:, :12], h[:, 12:4] (empty) and h[:, 4:] overlap
]

FAMILY = Family(CASES, lambda batch: torch.randn(batch, 8))

test_op, test_compact_equals_masked = FAMILY.tests()
