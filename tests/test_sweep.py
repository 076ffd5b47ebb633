"""fxprune.sweep: latency against sparsity, each point a real compact model timed beside the dense one."""

from __future__ import annotations

import pytest
import torch

import fxprune
from tests.models import ARCHITECTURES


def _mlp():
    factory, inputs = ARCHITECTURES["MLP"]
    return factory(), inputs()


def test_each_point_is_the_compact_model_of_that_sparsity(tmp_path):
    model, inputs = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxprune.sweep(model, inputs, {"round_to": 1}, sparsities=[0.5, 0.25], threads=(1, 2), batch=16,
                           warmup=2, repeat=5, folder=tmp_path, progress=False)
    assert [p.asked for p in result.points] == [0.25, 0.5]  # sorted
    for p in result.points:
        assert p.sparsity == pytest.approx(p.asked, abs=0.02)
        one = fxprune.compile(model, inputs, {"round_to": 1, "target_sparsity": p.asked}, progress=False).prune()
        assert p.params == sum(t.numel() for t in one.compact(progress=False).parameters())
    assert result.dense_macs > result.points[0].macs > result.points[1].macs
    rows = result.rows()
    assert [(r["threads"], r["asked"]) for r in rows] == [(1, 0.25), (1, 0.5), (2, 0.25), (2, 0.5)]
    for r in rows:
        assert r["ideal"] == pytest.approx(result.dense_macs / r["macs"])
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["compact_ms"])
    assert {shape[0] for shape, _ in result.timing.inputs.values()} == {16}  # timed at the batch asked
    table = result.to_markdown()
    assert table.count("\n") == 1 + len(rows) and "| 25% | 25.0% | 1 |" in table
    assert sorted(f.name for f in tmp_path.iterdir()) == ["compact-0.onnx", "compact-1.onnx", "dense.onnx"]
    result.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kwargs, config, message", [
    ({}, {}, "sparsities=.* or target_speedups=.*one of the two"),
    ({"sparsities": [0.5], "target_speedups": [2.0]}, {}, "one of the two"),
    ({"sparsities": []}, {}, "no points"),
    ({"sparsities": [0.5, 1.0]}, {}, "target_sparsity 1 is out of range"),
    ({"target_speedups": [0.8]}, {}, "target_speedup 0.8 is out of range"),
    ({"sparsities": [0.5, 0.5]}, {}, "the same target_sparsity twice"),
    ({"sparsities": [0.5]}, {"target_sparsity": 0.3}, "drop 'target_sparsity'"),
    ({"sparsities": [0.5]}, {"pruners": [{}]}, "one pruner's config"),
])
def test_bad_requests_are_refused_before_any_work(kwargs, config, message):
    model, inputs = _mlp()
    with pytest.raises(fxprune.ConfigError, match=message):
        fxprune.sweep(model, inputs, config, progress=False, **kwargs)


def test_another_batch_needs_a_dynamic_capture():
    model, inputs = _mlp()
    with pytest.raises(fxprune.ConfigError, match="capture fixed the batch"):
        fxprune.sweep(model, inputs, sparsities=[0.5], batch=8, dynamic_shapes={}, progress=False)
