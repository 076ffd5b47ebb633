"""Tests of the NxM, N:M and pattern-lock element masks (fxprune.patterns)."""

import math

import pytest
import torch

from fxprune.patterns import (block_scores, block_view, check_masks, n_of_m_masks, nxm_masks,
                              pattern_lock_masks, unblock_view)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {"fc": torch.randn(64, 32, generator=g), "conv": torch.randn(16, 8, 3, 3, generator=g)}


def _mags(ws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.abs() for k, v in ws.items()}


def _pruned_blocks(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool per block, True if pruned; asserts independently that blocks are whole."""
    m2d = block_view(mask)
    b = m2d.reshape(m2d.shape[0] // n, n, m2d.shape[1] // m, m).permute(0, 2, 1, 3).flatten(2)
    assert bool((b.all(-1) == b.any(-1)).all()), "a block is partly pruned"
    return ~b.all(-1)


# ---------------------------------------------------------------- block view

@pytest.mark.parametrize("shape", [(8, 6), (16, 8, 3, 3), (4, 2, 5), (6, 3, 2, 2, 2)])
def test_block_view_round_trip(shape):
    w = torch.randn(*shape, generator=_gen())
    v = block_view(w)
    assert v.shape == (shape[0], math.prod(shape[1:]))
    assert torch.equal(unblock_view(v, shape), w)
    assert torch.equal(unblock_view(v > 0, shape), w > 0)


def test_block_view_conv_puts_input_channels_fastest():
    w = torch.randn(16, 8, 3, 3, generator=_gen())
    v = block_view(w)
    for o, c, kh, kw in [(0, 0, 0, 0), (3, 5, 1, 2), (15, 7, 2, 2), (9, 1, 2, 0)]:
        assert v[o, (kh * 3 + kw) * 8 + c] == w[o, c, kh, kw]
    assert torch.equal(block_view(torch.ones(5, 7)), torch.ones(5, 7))


def test_block_view_rejects_bias_and_unblock_rejects_wrong_shape():
    with pytest.raises(ValueError, match="2 or more dims"):
        block_view(torch.zeros(8))
    with pytest.raises(ValueError, match="does not match"):
        unblock_view(torch.ones(16, 71, dtype=torch.bool), (16, 8, 3, 3))


def test_block_scores_mean_abs():
    s = torch.tensor([[1.0, -3.0], [-5.0, 7.0], [2.0, 2.0], [0.0, -4.0]])
    assert torch.equal(block_scores(s, 2, 1), torch.tensor([[3.0, 5.0], [1.0, 3.0]]))
    assert torch.equal(block_scores(s, 4, 2), torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="divisible"):
        block_scores(s, 3, 1)


# ---------------------------------------------------------------- NxM

@pytest.mark.parametrize("scope", ["global", "local"])
def test_4x1_whole_blocks_and_exact_count(scope):
    ws = _weights()
    masks = nxm_masks(_mags(ws), 0.5, 4, 1, scope=scope)
    check_masks(masks, "block", 4, 1)
    pruned = {k: _pruned_blocks(masks[k], 4, 1) for k in ws}
    assert {k: masks[k].shape for k in ws} == {k: ws[k].shape for k in ws}
    assert all(mk.dtype == torch.bool for mk in masks.values())
    if scope == "local":
        assert {k: int(p.sum()) for k, p in pruned.items()} == {"fc": 256, "conv": 144}
    total = sum(p.numel() for p in pruned.values())  # 16*32 + 4*72 = 800 blocks
    assert sum(int(p.sum()) for p in pruned.values()) == total // 2 == 400


def test_global_prunes_lowest_blocks_first():
    ws = _weights(1)
    masks = nxm_masks(_mags(ws), 0.5, 4, 1)
    lo, hi = [], []
    for k, w in ws.items():
        bs = block_scores(block_view(w), 4, 1).flatten()
        p = _pruned_blocks(masks[k], 4, 1).flatten()
        lo.append(bs[p]), hi.append(bs[~p])
    assert torch.cat(lo).max() <= torch.cat(hi).min()


def test_global_cap_moves_budget_to_other_layers():
    g = _gen(2)
    scores = {"tiny": torch.rand(32, 16, generator=g) * 1e-3, "big": torch.rand(64, 32, generator=g) + 1}
    masks = nxm_masks(scores, 0.5, 4, 1, max_ratio=0.6)
    tiny, big = _pruned_blocks(masks["tiny"], 4, 1), _pruned_blocks(masks["big"], 4, 1)
    assert int(tiny.sum()) == math.floor(0.6 * tiny.numel()) == 76
    assert int(tiny.sum()) + int(big.sum()) == (tiny.numel() + big.numel()) // 2 == 320


def test_min_ratio_floor_is_honoured_and_total_kept():
    g = _gen(3)
    scores = {"low": torch.rand(32, 16, generator=g), "high": torch.rand(32, 16, generator=g) + 10}
    masks = nxm_masks(scores, 0.5, 4, 1, min_ratio=0.25)
    low, high = _pruned_blocks(masks["low"], 4, 1), _pruned_blocks(masks["high"], 4, 1)
    assert int(high.sum()) == 32  # ceil(0.25 * 128); without the floor it would be 0
    assert int(low.sum()) + int(high.sum()) == 128


def test_ties_are_broken_in_block_order():
    masks = nxm_masks({"w": torch.ones(8, 4)}, 0.5, 4, 1)
    expected = torch.ones(8, 4, dtype=torch.bool)
    expected[:4] = False  # blocks in row-major order of the block grid: first block row goes
    assert torch.equal(masks["w"], expected)
    assert torch.equal(nxm_masks({"w": torch.ones(8, 4)}, 0.5, 4, 1)["w"], expected)


def test_1x1_is_unstructured_magnitude():
    w = torch.randn(10, 10, generator=_gen(4))
    mask = nxm_masks({"w": w.abs()}, 0.3, 1, 1)["w"]
    assert int((~mask).sum()) == 30
    assert w.abs()[~mask].max() < w.abs()[mask].min()


def test_non_divisible_layer_stays_dense_and_out_of_pool():
    g = _gen(5)
    scores = {"odd": torch.rand(10, 32, generator=g) * 1e-3, "fc": torch.rand(64, 32, generator=g)}
    masks = nxm_masks(scores, 0.5, 4, 1)
    assert bool(masks["odd"].all())
    assert int(_pruned_blocks(masks["fc"], 4, 1).sum()) == 256  # half of fc's 512, not of 592


def test_nxm_rejects_bad_arguments():
    s = {"w": torch.rand(8, 8)}
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            nxm_masks(s, bad, 4, 1)
    with pytest.raises(ValueError, match="n must be"):
        nxm_masks(s, 0.5, 0, 1)
    with pytest.raises(ValueError, match="m must be"):
        nxm_masks(s, 0.5, 4, 0)
    with pytest.raises(ValueError, match="scope"):
        nxm_masks(s, 0.5, 4, 1, scope="layer")
    with pytest.raises(ValueError, match="min_ratio"):
        nxm_masks(s, 0.5, 4, 1, min_ratio=0.9, max_ratio=0.5)
    with pytest.raises(ValueError, match="bias: pattern pruning"):
        nxm_masks({"bias": torch.rand(8)}, 0.5, 4, 1)
    with pytest.raises(ValueError, match="NaN"):
        nxm_masks({"w": torch.full((8, 8), float("nan"))}, 0.5, 4, 1)


# ---------------------------------------------------------------- N:M

def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    v = block_view(t)
    return v.reshape(v.shape[0], -1, m)


def test_2of4_at_half_keeps_the_two_largest_in_every_group():
    ws = _weights(6)
    masks = n_of_m_masks(_mags(ws), 0.5, 2, 4)
    check_masks(masks, "n:m", 2, 4, full=True)
    for k, w in ws.items():
        kept = _groups(masks[k], 4)
        assert bool(((~kept).sum(-1) == 2).all())
        top2 = _groups(w.abs(), 4).topk(2, dim=-1).indices
        assert bool(kept.gather(-1, top2).all())


def test_2of4_at_quarter_prunes_half_the_groups_lowest_first():
    ws = _weights(7)
    masks = n_of_m_masks(_mags(ws), 0.25, 2, 4)
    check_masks(masks, "n:m", 2, 4)
    zeros = torch.cat([(~_groups(masks[k], 4)).sum(-1).flatten() for k in ws])
    assert set(zeros.unique().tolist()) == {0, 2}
    assert int((zeros == 2).sum()) == zeros.numel() // 2
    sums = torch.cat([_groups(w.abs(), 4).sort(-1).values[..., :2].sum(-1).flatten() for w in ws.values()])
    assert sums[zeros == 2].max() <= sums[zeros == 0].min()
    with pytest.raises(ValueError, match="group"):
        check_masks(masks, "n:m", 2, 4, full=True)


def test_n_of_m_rejects_sparsity_above_n_over_m_and_bad_n():
    s = {"w": torch.rand(8, 8)}
    with pytest.raises(ValueError, match="above"):
        n_of_m_masks(s, 0.6, 2, 4)
    with pytest.raises(ValueError, match="n < m"):
        n_of_m_masks(s, 0.5, 4, 4)
    with pytest.raises(ValueError, match="n must be"):
        n_of_m_masks(s, 0.0, 0, 4)


def test_n_of_m_non_divisible_input_stays_dense():
    g = _gen(8)
    masks = n_of_m_masks({"odd": torch.rand(8, 6, generator=g), "fc": torch.rand(8, 8, generator=g)}, 0.5, 2, 4)
    assert bool(masks["odd"].all())
    assert int((~masks["fc"]).sum()) == 32


# ---------------------------------------------------------------- pattern lock

def test_pattern_lock_reproduces_block_pattern():
    ws = _weights(9)
    masks = nxm_masks(_mags(ws), 0.5, 4, 1)
    sparse = {k: w * masks[k] for k, w in ws.items()}
    sparse["fc"][tuple(masks["fc"].nonzero()[0])] = 0.0  # a stray zero in a kept block keeps it
    lock = pattern_lock_masks(sparse, "block", 4, 1)
    assert all(torch.equal(lock[k], masks[k]) for k in ws)
    check_masks(lock, "block", 4, 1)


def test_pattern_lock_1x1_and_n_of_m_are_elementwise():
    ws = _weights(10)
    masks = n_of_m_masks(_mags(ws), 0.5, 2, 4)
    sparse = {k: w * masks[k] for k, w in ws.items()}
    for kind, n, m in (("n:m", 2, 4), ("block", 1, 1)):
        lock = pattern_lock_masks(sparse, kind, n, m)
        assert all(torch.equal(lock[k], sparse[k] != 0) for k in ws)
    assert all(torch.equal(pattern_lock_masks(sparse, "n:m", 2, 4)[k], masks[k]) for k in ws)


def test_pattern_lock_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        pattern_lock_masks({"w": torch.ones(4, 4)}, "channel", 1, 1)


# ---------------------------------------------------------------- check_masks

def test_check_masks_raises_on_bad_masks():
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[:4, 1] = False
    check_masks({"w": mask}, "block", 4, 1)
    mask[5, 2] = False
    with pytest.raises(ValueError, match=r"w: 4x1 block \(1, 2\)"):
        check_masks({"w": mask}, "block", 4, 1)
    one_zero = torch.ones(2, 8, dtype=torch.bool)
    one_zero[1, 5] = False
    with pytest.raises(ValueError, match=r"2:4 group \(1, 1\) has 1 zeros"):
        check_masks({"w": one_zero}, "n:m", 2, 4)
    with pytest.raises(ValueError, match="bool"):
        check_masks({"w": torch.ones(8, 4)}, "block", 4, 1)


def test_check_masks_uses_the_conv_block_view():
    mask = torch.ones(4, 8, 3, 3, dtype=torch.bool)
    mask[0, :4, 1, 1] = False  # a whole group of 4 input channels at one tap
    check_masks({"c": mask}, "n:m", 2, 4)
    mask[0, 4, 1, 1] = False  # 1 zero in the next group of input channels
    with pytest.raises(ValueError, match="group"):
        check_masks({"c": mask}, "n:m", 2, 4)


def test_n_of_m_group_count_rounds_half_up():
    masks = n_of_m_masks({"w": torch.rand(5, 4, generator=_gen(11))}, 0.25, 2, 4)
    assert int((~masks["w"]).any(-1).sum()) == 3  # round(0.25 * 4 / 2 * 5) = round(2.5) -> 3
