"""Pruning during fine-tuning: schedules, pruners, hooks, state, DDP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxprune
from fxprune.config import PruningConfig
from fxprune.schedulers import get_scheduler
from fxprune.importance import group_scores
from fxprune.selection import align_narrow, choose_kept, unaligned_pieces
from tests.models import ARCHITECTURES, PreNormMLP


@pytest.mark.parametrize("decay", ["exp", "cos", "linear", "cube"])
def test_schedule_first_step_prunes_last_step_reaches_target(decay):
    sched = get_scheduler(PruningConfig(target_sparsity=0.8, start_step=2, end_step=11, update_frequency_on_step=3,
                                        sparsity_decay_type=decay))
    steps = [s for s in range(20) if sched.is_pruning_step(s)]
    assert steps == [2, 5, 8, 11]
    values = [sched.sparsity(s) for s in steps]
    assert values[0] > 0.0
    assert values == sorted(values)
    # exactly: the last step is recognised as the one that reaches the target (a latency target is measured there);
    # s * (1 - cos(pi / 2)) and 1 - (1 - s) ** 1 miss some targets by one rounding
    for target in (0.8, 0.1, 1 - 1 / 22.8):
        last = get_scheduler(PruningConfig(target_sparsity=target, start_step=2, end_step=11,
                                           update_frequency_on_step=3, sparsity_decay_type=decay))
        assert last.sparsity(11) == last.target == target and last.sparsity(15) == target
    if decay == "linear":
        assert values == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_oneshot_schedule():
    sched = get_scheduler(PruningConfig(target_sparsity=0.3, start_step=4, end_step=4))
    assert [s for s in range(10) if sched.is_pruning_step(s)] == [4]
    assert sched.sparsity(3) == 0.0 and sched.sparsity(4) == pytest.approx(0.3)


def _train(pruning, steps, seed=0, start=0):
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(start + steps)]
    opt = torch.optim.SGD(pruning.model.parameters(), lr=0.05, momentum=0.9)
    pruning.attach(opt)
    pruning.model.train()
    seen = []
    for x, y in batches[start:]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(pruning.model(x), y).backward()
        opt.step()
        seen.append(pruning.sparsity)
    return opt, seen


@pytest.mark.parametrize("pruner", ["magnitude", "snip", "snip_momentum", "taylor"])
def test_iterative_pruning_reaches_target_during_training(pruner):
    factory, inputs = ARCHITECTURES["MLP"]
    pruning = fxprune.compile(factory(), inputs(), {
        "pruning_type": pruner, "target_sparsity": 0.5, "start_step": 2, "end_step": 10,
        "update_frequency_on_step": 4, "prune_domain": "local", "sparsity_decay_type": "linear"})
    _, seen = _train(pruning, 14)
    assert seen == sorted(seen)                      # never un-prunes
    assert 0 < seen[2] < 0.5                         # the first pruning step prunes
    assert pruning.sparsity == pytest.approx(0.5)    # the last one reaches the target
    for name, mask in pruning.masks.items():         # masked weights stayed zero while training
        assert (pruning.model.get_parameter(name)[~mask] == 0).all()
    small = pruning.compact()
    x = inputs()
    with torch.no_grad():
        assert (small(*x) - pruning.model.eval()(*x)).abs().max() <= 1e-4


def test_pattern_lock_keeps_existing_zero_channels():
    factory, inputs = ARCHITECTURES["MLP"]
    model = factory()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    first = linears[0]
    with torch.no_grad():  # a model saved from an earlier masked run: channels 0..31 are zero in every member
        first.weight[:32] = 0
        first.bias[:32] = 0
        linears[1].weight[:, :32] = 0
    pruning = fxprune.compile(model, inputs(), {"pruning_type": "pattern_lock"}).prune()
    group = next(g for g in pruning.groups if any(m.dim == 0 and m.name.endswith("weight") and
                                                 m.atoms.size == first.weight.shape[0] for m in g.parameters))
    kept = pruning.kept_channels[group.index]
    assert len(kept) == first.weight.shape[0] - 32 and kept.min() == 32


def test_user_registered_pruner_works_like_a_builtin():
    @fxprune.register_pruners("reverse_index")
    class ReverseIndex(fxprune.Pruner):
        """Prunes the highest-numbered channels first: easy to check."""

        def channel_scores(self, group):
            return -np.arange(group.size, dtype=float)

    factory, inputs = ARCHITECTURES["MLP"]
    pruning = fxprune.compile(factory(), inputs(), {"pruning_type": "reverse_index", "target_sparsity": 0.5,
                                                     "prune_domain": "local"}).prune()
    assert isinstance(pruning.pruners[0], ReverseIndex)
    for g in pruning.groups:
        assert list(pruning.kept_channels[g.index]) == list(range(g.size - g.size // 2))
    pruning.compact()


def test_get_pruner_unknown_name_lists_registered():
    with pytest.raises(fxprune.ConfigError, match="registered pruners: .*snip_momentum"):
        fxprune.get_pruner({}, {"pruning_type": "nope"})


def test_several_pruners_local_settings_override_global():
    factory, inputs = ARCHITECTURES["PlainCNN"]
    pruning = fxprune.compile(factory(), inputs(), {
        "target_sparsity": 0.5, "prune_domain": "local",
        "pruners": [{"names": ["^conv1$"], "target_sparsity": 0.25}, {"excluded_names": ["fc"]}]})
    assert [p.target_sparsity_ratio for p in pruning.pruners] == [0.25, 0.5]
    pruning.prune()
    conv1 = next(g for g in pruning.groups if any(m.name == "conv1.weight" and m.dim == 0 for m in g.parameters))
    assert len(pruning.kept_channels[conv1.index]) == conv1.size - conv1.size // 4
    # excluded fc1/fc2 keep their output widths; fc1's input channels (conv3's outputs) still prune
    kept = {m.name: len(pruning.kept_channels[g.index]) for g in pruning.groups for m in g.parameters if m.dim == 0}
    assert (kept["fc1.weight"], kept["conv3.weight"]) == (64, 16)


def test_frozen_names_leave_every_group_of_the_layer_alone():
    factory, inputs = ARCHITECTURES["PlainCNN"]
    pruning = fxprune.compile(factory(), inputs(), {"target_sparsity": 0.5, "prune_domain": "local",
                                                    "frozen_names": ["fc1"]}).prune()
    kept = {m.name: len(pruning.kept_channels[g.index]) for g in pruning.groups for m in g.parameters if m.dim == 0}
    assert (kept["fc1.weight"], kept["conv3.weight"], kept["conv2.weight"]) == (64, 32, 16)


def test_state_resumes_to_the_same_masks(tmp_path):
    config = {"pruning_type": "snip_momentum", "target_sparsity": 0.5, "start_step": 1, "end_step": 13,
              "update_frequency_on_step": 3, "prune_domain": "global"}
    factory, inputs = ARCHITECTURES["MLP"]

    straight = fxprune.compile(factory(), inputs(), config)
    _train(straight, 16)

    first = fxprune.compile(factory(), inputs(), config)
    opt, _ = _train(first, 8)
    torch.save({"pruning": first.state_dict(), "model": first.model.state_dict(), "opt": opt.state_dict()},
               tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = fxprune.compile(factory(), inputs(), config)
    resumed.model.load_state_dict(ckpt["model"])
    resumed.load_state_dict(ckpt["pruning"])
    gen_opt = torch.optim.SGD(resumed.model.parameters(), lr=0.05, momentum=0.9)
    gen_opt.load_state_dict(ckpt["opt"])
    # continue the same data stream from step 8
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(16)]
    resumed.attach(gen_opt)
    resumed.model.train()
    for x, y in batches[8:]:
        gen_opt.zero_grad()
        torch.nn.functional.cross_entropy(resumed.model(x), y).backward()
        gen_opt.step()
    assert resumed.global_step == straight.global_step == 16
    for g in straight.kept_channels:
        assert np.array_equal(straight.kept_channels[g], resumed.kept_channels[g])
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k


def _ddp_worker(rank: int, world: int, rendezvous: str, out: str, hidden: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = PreNormMLP().eval() if hidden else ARCHITECTURES["MLP"][0]()
    x = (torch.randn(2, 64, generator=torch.Generator().manual_seed(0)),)
    pruning = fxprune.compile(model, x, {"pruning_type": "snip_momentum", "target_sparsity": 0.5,
                                         "start_step": 1, "end_step": 7, "update_frequency_on_step": 2,
                                         "prune_hidden_size": hidden})
    ddp = torch.nn.parallel.DistributedDataParallel(pruning.model)
    opt = pruning.attach(torch.optim.SGD(ddp.parameters(), lr=0.05))
    gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(torch.randn(8, 64, generator=gen)),
                                          torch.randint(0, 10, (8,), generator=gen)).backward()
        opt.step()
    kept = torch.cat([torch.from_numpy(pruning._kept[g]) for g in sorted(pruning._kept)]).to(torch.int64)
    gathered = [torch.zeros_like(kept) for _ in range(world)]
    dist.all_gather(gathered, kept)
    if rank == 0:
        pruning.model.eval()
        small = pruning.compact()
        fresh = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))  # not the example compact() checked
        with torch.no_grad():
            outputs = (pruning.model(fresh), small(fresh))  # masked (norms over kept channels) and compact
        torch.save({"kept": gathered, "sparsity": pruning.sparsity, "outputs": outputs,
                    "hidden_kept": [int(pruning._kept[g.index].sum()) for g in pruning.groups if g.normalized]}, out)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


@pytest.mark.parametrize("hidden", [False, True], ids=["mlp", "pre-norm-hidden-size"])
def test_ddp_two_processes_hold_the_same_masks(tmp_path, hidden):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), out, hidden), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert torch.equal(result["kept"][0], result["kept"][1])
    assert result["sparsity"] == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(*result["outputs"], atol=1e-6, rtol=1e-5)  # float32: rounding only
    assert len(result["hidden_kept"]) == hidden and all(0 < k < 32 for k in result["hidden_kept"])


@pytest.mark.parametrize("pattern, pruner", [("4x1", "magnitude"), ("2:4", "snip_momentum"), ("1x1", "snip")])
def test_mask_patterns_during_training(pattern, pruner):
    from fxprune.patterns import check_masks

    factory, inputs = ARCHITECTURES["PlainCNN"]
    target = 0.5
    pruning = fxprune.compile(factory(), inputs(), {"pruning_type": pruner, "pattern": pattern,
                                                     "target_sparsity": target, "start_step": 1, "end_step": 7,
                                                     "update_frequency_on_step": 3})
    _fit_cnn(pruning, steps=10, batch=4, seed=0)
    kind = fxprune.parse_pattern(pattern).kind
    masks = {k: v for k, v in pruning.masks.items()}
    assert set(masks) == {"conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight"}
    check_masks(masks, kind, *((4, 1) if pattern == "4x1" else (2, 4) if pattern == "2:4" else (1, 1)),
                full=pattern == "2:4")
    assert pruning.weight_sparsity == pytest.approx(target, abs=0.02)
    for name, mask in masks.items():
        assert (pruning.model.get_parameter(name)[~mask] == 0).all()


SCHEDULES = {"oneshot": {"start_step": 3, "end_step": 3},
             "iterative-exp": {"start_step": 1, "end_step": 7, "update_frequency_on_step": 2, "sparsity_decay_type": "exp"},
             "iterative-cube": {"start_step": 0, "end_step": 6, "update_frequency_on_step": 3, "sparsity_decay_type": "cube"}}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("pattern", ["channelx1", "4x1", "2:4"])
@pytest.mark.parametrize("pruner", ["magnitude", "snip", "snip_momentum", "taylor"])
def test_pruner_pattern_schedule_matrix(pruner, pattern, schedule):
    """Every combination reaches its target with masks of the declared pattern."""
    from fxprune.patterns import check_masks

    factory, inputs = ARCHITECTURES["PlainCNN"]
    target = 0.5
    pruning = fxprune.compile(factory(), inputs(), {"pruning_type": pruner, "pattern": pattern, "target_sparsity": target,
                                                    "round_to": 1,  # exact counts: no width alignment
                                                    "prune_domain": "global", **SCHEDULES[schedule]})
    _fit_cnn(pruning, steps=8, batch=2, seed=1)
    for name, mask in pruning.masks.items():
        assert (pruning.model.get_parameter(name)[~mask] == 0).all()
    if pattern == "channelx1":
        total = sum(g.size for g in pruning.groups)
        assert pruning.sparsity == pytest.approx(int(total * target) / total)  # within one channel
        for g in pruning.groups:  # whole channels across every member
            dead = np.flatnonzero(~np.isin(np.arange(g.size), pruning.kept_channels[g.index]))
            for m in g.parameters:
                w = pruning.model.get_parameter(m.name)
                for c in dead[:3]:
                    assert (w.index_select(m.dim, torch.from_numpy(m.indices(c))) == 0).all()
        small = pruning.compact()
        x = inputs()
        with torch.no_grad():
            assert (small(*x) - pruning.model.eval()(*x)).abs().max() <= 1e-4
    else:
        n, m = (4, 1) if pattern == "4x1" else (2, 4)
        check_masks(pruning.masks, fxprune.parse_pattern(pattern).kind, n, m, full=pattern == "2:4")
        assert pruning.weight_sparsity == pytest.approx(target, abs=0.01)


def _fit_cnn(pruning, steps, batch, seed):
    """A few momentum-SGD steps on random images with every hook attached."""
    opt = pruning.attach(torch.optim.SGD(pruning.model.parameters(), lr=0.01, momentum=0.9))
    pruning.model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        pruning.model(torch.randn(batch, 3, 32, 32, generator=gen)).square().mean().backward()
        opt.step()


def test_get_pruner_from_a_plain_dict_like_the_reference():
    layer = torch.nn.Linear(8, 4)
    pruner = fxprune.get_pruner({"fc.weight": layer.weight}, {"prune_type": "snip_momentum", "target_sparsity": 0.3,
                                                             "start_step": 2, "end_step": 8})
    assert isinstance(pruner, fxprune.SnipMomentumPruner)
    assert (pruner.target_sparsity_ratio, pruner.start_step, pruner.end_step) == (0.3, 2, 8)
    assert pruner.masks["fc.weight"].all() and pruner.masks["fc.weight"].shape == (4, 8)
    assert pruner.scheduler.total == 7 and pruner.max_sparsity_ratio_per_layer == 0.98


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_attach_works_with_lr_schedulers_in_either_order(scheduler_first):
    factory, inputs = ARCHITECTURES["MLP"]
    pruning = fxprune.compile(factory(), inputs(), {"target_sparsity": 0.5, "start_step": 2, "end_step": 2})
    opt = torch.optim.SGD(pruning.model.parameters(), lr=0.1)
    if scheduler_first:
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        pruning.attach(opt)
    else:
        pruning.attach(opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(4):
        opt.zero_grad()
        pruning.model(*inputs()).square().mean().backward()
        opt.step()
        sched.step()
    assert pruning.global_step == 4 and pruning.sparsity == pytest.approx(0.5, abs=0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)


def test_taylor_scores_restart_after_each_pruning_step():
    factory, inputs = ARCHITECTURES["MLP"]
    pruning = fxprune.compile(factory(), inputs(), {"pruning_type": "taylor", "target_sparsity": 0.5,
                                                     "start_step": 3, "end_step": 3})
    _train(pruning, 3)  # steps 0..2 accumulate, the pruning at step 3 happens inside the third step()
    assert pruning.sparsity > 0 and pruning.pruners[0].scores == {}
    pruning.model(*inputs()).square().mean().backward()
    pruning.on_before_optimizer_step()
    assert set(pruning.pruners[0].scores) == set(pruning.pruners[0].modules)


def test_default_round_to_aligns_kept_widths_to_16_elements():
    """round_to "auto": conv channels keep multiples of 16 in groups of 64 and more; narrower groups are exact under
    a local budget, and aligned to 8 from 16 channels under a global one (onnxruntime's NCHWc convs need their
    input channels in blocks of 8 on AVX2; the shared budget takes up what the coarse rounding moves)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 96, 1), torch.nn.ReLU(), torch.nn.Conv2d(96, 48, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(48, 12, 1), torch.nn.ReLU(), torch.nn.Conv2d(12, 4, 1))
    pruning = fxprune.compile(net, (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.4, "prune_domain": "local"})
    pruning.prune()
    kept = sorted(len(k) for k in pruning.kept_channels.values())
    assert kept == [8, 29, 64]  # 12 - 4 and 48 - 19, unrounded (< 4 * 16); 96 - 38 = 58 -> 64
    # 1 - 101 / 156 = 0.353 instead of 0.4: said, not hidden
    assert pruning.report().notes == ["target_sparsity 0.4 reached 0.3526 over its 3 groups: kept counts are rounded to "
                                      "aligned widths (round_to='auto'; round_to=1 gives exact counts)"]
    # global: the 48-wide group is under a quarter of the channels (48 of 156 + 160), so it is aligned to 8
    wide = torch.nn.Sequential(torch.nn.Conv2d(3, 160, 1), torch.nn.ReLU(), torch.nn.Conv2d(160, 96, 1), *list(net)[1:])
    pruning = fxprune.compile(wide, (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.4}).prune()
    sizes = {g.index: g.size for g in pruning.groups}
    assert sorted(sizes.values()) == [12, 48, 96, 160]
    for g, k in pruning.kept_channels.items():
        assert len(k) % {160: 16, 96: 16, 48: 8, 12: 1}[sizes[g]] == 0, (sizes[g], len(k))
    # where narrow groups are more than a quarter of the channels (48 of 156), they keep exact counts
    assert align_narrow(pruning.groups, True) and not align_narrow(pruning.groups, False)
    narrow_net = fxprune.compile(net, (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.4})
    assert not align_narrow(narrow_net.groups, True)


def test_default_round_to_keeps_a_whole_block_in_narrow_groups():
    """Under a global budget the narrow groups are aligned to 8 but keep at least 16 channels: onnxruntime's NCHWc
    block is 16 floats on AVX-512, and a conv reading fewer channels than a block runs outside the blocked layout
    (MobileNetV2 at 50%, 1 thread: 2.02x with 8-wide streams, 2.28x with 16). The wide groups take up the budget."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(24, 40, 1), torch.nn.ReLU(), torch.nn.Conv2d(40, 256, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(256, 4, 1))
    pruning = fxprune.compile(net, (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.6}).prune()
    kept = {g.size: len(pruning.kept_channels[g.index]) for g in pruning.groups}
    assert kept[16] == 16 and kept[24] in (16, 24) and kept[40] in (16, 24, 32, 40), kept
    assert kept[256] % 16 == 0
    assert pruning.sparsity == pytest.approx(0.6, abs=0.02)  # the wide group takes up the budget
    # a minimum sparsity per group that the user asks for wins over the alignment's 16
    asked = fxprune.compile(net, (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.6,
                                                              "min_sparsity_ratio_per_op": 0.5}).prune()
    assert {g.size: len(asked.kept_channels[g.index]) for g in asked.groups}[16] == 8
    # a local budget keeps exact counts in narrow groups, down to a single channel
    local = fxprune.compile(net, (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.6, "prune_domain": "local"}).prune()
    assert {g.size: len(local.kept_channels[g.index]) for g in local.groups if g.size < 64} == {16: 7, 24: 10, 40: 16}


def test_a_target_that_cannot_be_met_is_reported():
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 2))
    with pytest.warns(UserWarning, match=r"target_sparsity 0.999 reached 0.9583 over its 2 groups: 2 groups are at their "
                                         r"cap \(every group keeps at least one channel"):
        pruning = fxprune.compile(net, (torch.randn(2, 8),), {"target_sparsity": 0.999}).prune()
    assert pruning.report().notes == [
        "target_sparsity 0.999 reached 0.9583 over its 2 groups: 2 groups are at their cap (every group keeps at least "
        "one channel, and at most max_sparsity_ratio_per_layer=0.98 of its channels go)"]
    with pytest.warns(UserWarning, match=r"round_to=64 is not smaller than 2 groups \(sizes \[16, 32\]\)"):
        fxprune.compile(net, (torch.randn(2, 8),), {"target_sparsity": 0.5, "round_to": 64}).prune()


class _Branches(torch.nn.Module):
    """Two convs of ``a`` and ``b`` channels concatenated into one 1x1 conv: a group of two concat pieces."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, a, 1), torch.nn.Conv2d(3, b, 3, padding=1)
        self.head = torch.nn.Conv2d(a + b, 8, 1)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))


def test_concatenated_pieces_keep_aligned_widths():
    """A concat's pieces each keep a multiple of the alignment (onnxruntime's NCHWc concat and the convs after it
    need every piece in whole blocks), pieces nested as in DenseNet included; each keeps at least one chunk."""
    scores = np.random.default_rng(0).random(256)
    parts = [np.arange(0, 64), np.arange(64, 96), np.arange(0, 96), np.arange(96, 128), np.arange(0, 128)]
    keep = choose_kept(scores, 128, parts, 16)
    pieces = [keep[a:b].sum() for a, b in ((0, 64), (64, 96), (96, 128), (128, 256))]
    assert keep.sum() == 128 and all(n % 16 == 0 and n >= 16 for n in pieces), pieces
    keep = choose_kept(scores, 250, parts, 16)  # more than whole chunks can take: channel by channel
    assert keep.sum() == 6 and all(keep[a:b].any() for a, b in ((0, 64), (64, 96), (96, 128), (128, 256)))
    # without parts, or with align 1, the lowest scores go, as before
    assert np.array_equal(choose_kept(scores, 100, (), 16), scores >= np.sort(scores)[100])

    torch.manual_seed(0)
    pruning = fxprune.compile(_Branches(64, 32), (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.5}).prune()
    kept = pruning.masks["head.weight"][0, :, 0, 0]
    assert kept[:64].sum() % 16 == 0 and kept[64:].sum() % 16 == 0 and kept.sum() == 48


def test_a_piece_one_chunk_wide_is_cut_only_where_whole_chunks_cannot_meet_the_target():
    """A 16-wide concat piece cut channel by channel would be unaligned: it is kept whole while the other pieces
    can take the count in whole chunks; past that the target wins, and the pruner says which pieces it unaligned."""
    scores = np.arange(64, dtype=float)  # the 16-wide piece (0-15) scores lowest
    parts = [np.arange(0, 16), np.arange(16, 64)]
    keep = choose_kept(scores, 32, parts, 16)
    assert keep[:16].all() and keep[16:].sum() == 16  # two chunks of the wide piece, not the low-scoring narrow one
    keep = choose_kept(scores, 40, parts, 16)
    assert keep.sum() == 24 and keep[:16].sum() == 8 and keep[16:].sum() == 16  # the rest: lowest channels
    assert unaligned_pieces(keep, parts, 16) == 1 and unaligned_pieces(choose_kept(scores, 32, parts, 16), parts, 16) == 0

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"magnitude pruner: (\d) concatenated pieces keep widths that are not "
                                         r"multiples of their alignment: whole chunks could not remove") as seen:
        pruning = fxprune.compile(_Branches(16, 48), (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.75}).prune()
    assert pruning.sparsity == 0.75
    kept = pruning.masks["head.weight"][0, :, 0, 0]
    unaligned = int(kept[:16].sum() % 16 != 0) + int(kept[16:].sum() % 16 != 0)
    assert unaligned >= 1 and f"{unaligned} concatenated pieces" in str(seen[0].message)


def test_concat_pieces_of_different_widths_score_on_one_footing():
    """Each member is normalised over the channels it holds: with every weight equal, a 16-wide and a 48-wide
    concatenated piece score alike (a mean over the whole group scored them 1.8 and 0.73, and the wide
    piece lost all its channels first)."""
    model = _Branches(16, 48)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.1)
    pruning = fxprune.compile(model, (torch.randn(2, 3, 8, 8),), {"target_sparsity": 0.5, "round_to": 1})
    (group,) = [g for g in pruning.groups if g.size == 64]
    scores = group_scores(group, dict(pruning.model.named_parameters()))
    np.testing.assert_allclose(scores, 1.0, rtol=1e-6)
