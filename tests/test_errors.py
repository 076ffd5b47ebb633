"""Bad input gets a clear error and changes nothing."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import CaptureError, ConfigError, ExampleInputsError, PruningError
from tests.models import ARCHITECTURES


@pytest.fixture
def mlp():
    factory, inputs = ARCHITECTURES["MLP"]
    return factory(), inputs()


@pytest.mark.parametrize("config, message", [
    ({"target_sparsity": 0.5, "taget_sparsity": 0.3}, "unknown config key 'taget_sparsity'.*did you mean 'target_sparsity'"),
    ({"pattern": "3y2"}, "unknown pattern '3y2'"),
    ({"target_sparsity": 1.0}, r"target_sparsity must be a number in \[0, 1\), got 1.0"),
    ({"target_sparsity": -0.1}, r"target_sparsity must be a number in \[0, 1\)"),
    ({"pruning_type": "magnitud"}, "unknown pruning_type 'magnitud'; registered pruners: .*magnitude"),
    ({"prune_domain": "everywhere"}, "prune_domain must be 'global' or 'local'"),
    ({"start_step": 5, "end_step": 2}, r"end_step \(2\) is before start_step \(5\)"),
    ({"sparsity_decay_type": "quadratic"}, "sparsity_decay_type must be one of"),
    ({"pattern": "2:4", "target_sparsity": 0.8}, "above what pattern 2:4 allows"),
    ({"round_to": 0}, "round_to must be an integer >= 1"),
    ({"pruners": [{"target_sparsity": 0.5, "bogus": 1}]}, r"unknown config key 'bogus' in pruners\[0\]"),
])
def test_bad_config_is_rejected_before_any_work(mlp, config, message):
    model, x = mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        fxprune.compile(model, x, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_name_pattern_matching_no_layer(mlp):
    model, x = mlp
    with pytest.raises(ConfigError, match="excluded_names pattern 'decoder' matches no layer"):
        fxprune.compile(model, x, {"excluded_names": ["decoder"]})
    with pytest.raises(ConfigError, match="names pattern 'nope' matches no layer"):
        fxprune.compile(model, x, {"names": "nope"})


def test_example_inputs_that_do_not_fit(mlp):
    model, _ = mlp
    with pytest.raises(ExampleInputsError, match=r"does not run on the example inputs \(Tensor\(2, 7\)\)"):
        fxprune.compile(model, (torch.randn(2, 7),), {})
    with pytest.raises(ExampleInputsError, match="must be a tuple"):
        fxprune.compile(model, torch.randn(2, 64), {})


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # branches on a tensor value: torch.export cannot capture this
            return y * 2
        return y


def test_untraceable_model_names_the_source_line():
    with pytest.raises(CaptureError) as info:
        fxprune.compile(DataDependent(), (torch.randn(2, 4),), {})
    text = str(info.value)
    assert "test_errors.py" in text and "if y.sum() > 0" in text
    assert "what to try" in text


def test_plan_that_empties_a_group_or_branch_is_refused():
    factory, inputs = ARCHITECTURES["InceptionLike"]
    pruning = fxprune.compile(factory(), inputs(), {})
    group = pruning.groups[0]
    with pytest.raises(PruningError, match="would lose all its channels"):
        pruning.set_kept({group.index: [False] * group.size})
    branchy = next(g for g in pruning.groups if g.parts)
    keep = [True] * branchy.size
    for c in branchy.parts[0]:
        keep[c] = False
    with pytest.raises(PruningError, match="would all be removed"):
        pruning.set_kept({branchy.index: keep})
    assert pruning.sparsity == 0.0  # nothing was applied


def test_mask_only_pattern_cannot_be_compacted(mlp):
    model, x = mlp
    pruning = fxprune.compile(model, x, {"pattern": "4x1"})
    with pytest.raises(ConfigError, match="pattern '4x1'"):
        pruning.compact()


@pytest.mark.parametrize("sparsity", [1.5, -1, float("nan"), "0.5", True])
def test_prune_refuses_a_sparsity_outside_0_1(mlp, sparsity):
    model, x = mlp
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5})
    before = {k: v.clone() for k, v in pruning.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"prune\(sparsity\) takes a number in \[0, 1\)"):
        pruning.prune(sparsity)
    assert all(torch.equal(v, before[k]) for k, v in pruning.model.state_dict().items())
    assert pruning.sparsity == 0.0


def _plan_with(pruning, **changes):
    plan = pruning.plan()
    plan["groups"][0] = {**plan["groups"][0], **changes}
    return plan


@pytest.mark.parametrize("kept", [[0, 0, 0, 1], [3, 1], [-1, 2], [0, 1.5], ["0"], [10**6]],
                         ids=["duplicates", "unsorted", "negative", "float", "string", "past-the-group"])
def test_a_tampered_plan_is_refused_and_changes_nothing(mlp, kept):
    model, x = mlp
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5})
    with pytest.raises(PruningError, match=r"plan group 0: 'kept' must be sorted, unique integer .*got "
                                           + re.escape(str(kept))):
        pruning.apply_plan(_plan_with(pruning, kept=kept))
    assert pruning.sparsity == 0.0 and not pruning.masks


def test_a_malformed_plan_or_state_is_refused_with_the_reason(mlp, tmp_path):
    model, x = mlp
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5})
    with pytest.raises(PruningError, match="the plan is malformed"):
        pruning.apply_plan({"version": 1, "groups": [{"index": 0}]})
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(PruningError, match="bad.json is not a plan: not JSON"):
        pruning.apply_plan(tmp_path / "bad.json")
    with pytest.raises(PruningError, match="not a pruning state: kept, global_step, pruners missing"):
        pruning.load_state_dict({"foo": 1})
    assert pruning.sparsity == 0.0


def test_attach_refuses_a_second_time_and_a_foreign_optimizer(mlp):
    model, x = mlp
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5})
    with pytest.raises(PruningError, match="holds none of pruning.model's parameters"):
        pruning.attach(torch.optim.SGD(model.parameters(), lr=0.1))  # the user's model, not the masked copy
    opt = pruning.attach(torch.optim.SGD(pruning.model.parameters(), lr=0.1))
    with pytest.raises(PruningError, match="already attached"):
        pruning.attach(opt)


def test_one_error_type_catches_onnx_mismatches_too():
    assert issubclass(fxprune.OnnxMismatchError, fxprune.FxPruneError)


@pytest.mark.parametrize("config, message", [
    ({"excluded_names": ["^fc"]}, r"the config selects no channel group.*2 groups are prunable.*excluded_names "
                                  r"\['\^fc'\] exclude 2"),
    ({"prune_layer_type": ["linear"]}, r"prune_layer_type \['linear'\] matches 0 \(the layers of these groups are "
                                       r"Linear; class names are case-sensitive\)"),
    ({"pruners": [{"names": ["fc1"]}, {"names": ["fc1"]}]}, r"pruners\[1\] selects no channel group.*names "
                                                            r"\['fc1'\] match 0"),  # the first one took fc1
])
def test_a_config_that_selects_nothing_is_refused_with_the_reason(mlp, config, message):
    model, x = mlp
    with pytest.raises(ConfigError, match=message):
        fxprune.compile(model, x, config)


def test_compile_takes_a_module(mlp):
    _, x = mlp
    with pytest.raises(TypeError, match="fxprune.compile takes a torch.nn.Module, got str"):
        fxprune.compile("not a model", x)


class _Noisy(nn.Module):
    """Adds noise it draws itself, like ViTMAE's patch shuffle: no two runs agree."""

    def __init__(self, draws: bool):
        super().__init__()
        self.draws = draws
        self.a, self.drop, self.b = nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 4)

    def forward(self, x):
        h = self.drop(torch.relu(self.a(x)))  # dropout in eval mode: deterministic, not reported
        return self.b(h * (1 + torch.rand(h.shape[0], 1)) if self.draws else h)  # noise per sample


def test_a_forward_that_draws_random_numbers_is_named_at_compile_and_at_compact():
    x = (torch.randn(2, 8),)
    with pytest.warns(UserWarning, match=r"forward draws random numbers \(aten\.rand\.default at test_errors"):
        pruning = fxprune.compile(_Noisy(draws=True), x, {"target_sparsity": 0.5})
    with pytest.raises(fxprune.CompactionError, match=r"differs from the masked model.*forward draws random numbers"
                                                      r".*make the random tensor an input"):
        pruning.prune().compact()


def test_eval_mode_dropout_is_not_taken_for_randomness():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fxprune.compile(_Noisy(draws=False), (torch.randn(2, 8),), {"target_sparsity": 0.5}).prune().compact()
