"""Plans re-apply to a fresh copy; compact models reload without their class; explain()."""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune import PruningError
from tests.checks import assert_compact_matches_masked, fresh_like
from tests.models import ARCHITECTURES


def _pruned(name="ResNetBottleneck"):
    factory, inputs = ARCHITECTURES[name]
    return fxprune.compile(factory(), inputs(), {"target_sparsity": 0.5}).prune(), inputs()


def test_plan_json_reapplies_to_a_fresh_model(tmp_path):
    first, x = _pruned()
    first.save_plan(tmp_path / "plan.json")
    assert (tmp_path / "plan.json").stat().st_size < 20_000
    factory, _ = ARCHITECTURES["ResNetBottleneck"]
    second = fxprune.compile(factory(), x, {}).apply_plan(tmp_path / "plan.json")
    a, b = first.compact(), second.compact()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(a(*x), b(*x))


def test_plan_for_another_model_is_refused():
    first, _ = _pruned("ResNetBottleneck")
    factory, inputs = ARCHITECTURES["ResNetBasic"]
    other = fxprune.compile(factory(), inputs(), {})
    with pytest.raises(PruningError, match="made for a different model"):
        other.apply_plan(first.plan())
    assert other.sparsity == 0.0


def test_compact_model_saves_and_reloads_without_its_class(tmp_path):
    pruning, x = _pruned("SENet")
    small = pruning.compact()
    fxprune.save_compact(small, tmp_path / "small.pt2", x)
    reloaded = fxprune.load_compact(tmp_path / "small.pt2")
    fresh = fresh_like(x)  # not the example it was saved with
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*fresh), small(*fresh), atol=1e-6, rtol=1e-6)


def test_explain_lists_groups_and_frozen_reasons():
    factory, inputs = ARCHITECTURES["ShuffleNetLike"]
    text = str(fxprune.explain(factory(), inputs()))
    assert "4 prunable channel groups" in text
    assert "dim split or merged by a reshape" in text and "models.py" in text


def test_explain_cli(capsys):
    from fxprune.cli import main

    main(["explain", "tests.models:MLP", "--input", "2x64"])
    assert "prunable channel groups" in capsys.readouterr().out


def test_compact_before_pruning_is_an_error():
    factory, inputs = ARCHITECTURES["MLP"]
    with pytest.raises(PruningError, match="nothing is pruned yet"):
        fxprune.compile(factory(), inputs(), {}).compact()


def test_hooks_out_of_order():
    factory, inputs = ARCHITECTURES["MLP"]
    pruning = fxprune.compile(factory(), inputs(), {})
    with pytest.raises(PruningError, match=r"on_before_optimizer_step\(\) was called before on_train_begin\(\)"):
        pruning.on_before_optimizer_step()


def test_nan_weights_are_reported():
    factory, inputs = ARCHITECTURES["MLP"]
    model = factory()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    pruning = fxprune.compile(model, inputs(), {})
    with pytest.raises(PruningError, match="non-finite channel scores"):
        pruning.prune()
    assert pruning.sparsity == 0.0


# about one rounding of an O(0.1) output (8 and 11 bit mantissas); a wrong channel moves it by O(0.1)
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, {"atol": 1e-3, "rtol": 1.6e-2}),
                                        (torch.float16, {"atol": 1e-4, "rtol": 1e-3})], ids=["bfloat16", "float16"])
def test_half_precision_models(dtype, tol):
    factory, inputs = ARCHITECTURES["MLP"]
    model = factory().to(dtype)
    x = tuple(t.to(dtype) for t in inputs())
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5}).prune()
    small = pruning.compact(atol=1e-2)
    assert_compact_matches_masked(pruning, small, fresh_like(x), **tol)  # also checks the dtype is kept
