"""The README's main job, `fxprune demo`, end to end at small step counts."""

from __future__ import annotations

from fxprune.cli import main
from fxprune.demo import run_demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    result = run_demo(steps=60, finetune_steps=60, repeat=3, threads=(1,), out_dir=str(tmp_path))
    assert result["dense_accuracy"] > 0.8
    assert result["pruned_accuracy"] > 0.8
    assert result["sparsity"] == 0.5
    assert result["report"].macs_ratio > 3.5
    rows = {r.label: r for r in result["benchmark"].rows}
    assert set(rows) == {"dense", "compact"} and rows["compact"].ideal > 3.5
    assert (tmp_path / "compact.onnx").stat().st_size < (tmp_path / "dense.onnx").stat().st_size / 3
    out = capsys.readouterr().out
    assert "onnxruntime latency" in out and "test accuracy" in out


def test_cli_demo_arguments(tmp_path, capsys):
    assert main(["demo", "--steps", "20", "--finetune-steps", "20", "--repeat", "2", "--threads", "1",
                 "--sparsity", "0.25", "--pruner", "magnitude", "--out", str(tmp_path)]) == 0
    assert "25% of channels removed" in capsys.readouterr().out
