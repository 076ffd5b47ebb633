"""Tests for fxprune.exporters: ONNX export + check, and the ORT benchmark."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.exporters import (
    BenchmarkResult,
    OnnxExport,
    OnnxMismatchError,
    benchmark,
    export_onnx,
)
from fxprune.exporters import onnx_export as onnx_export_mod
from fxprune.exporters import ort_benchmark as ort_benchmark_mod
from fxprune.exporters.onnx_export import compare_outputs
from tests.checks import n_params


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(torch.flatten(y, 1)))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, padding=1)
        self.cls = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor):
        feat = torch.relu(self.body(x)) * scale
        return self.cls(feat.mean((2, 3))), feat


def _make_cnn(width: int = 8, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(width)
    # non-trivial BN statistics so eval vs. train mode give different numbers
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _ort_run(path: str, *arrays: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {meta.name: arr for meta, arr in zip(session.get_inputs(), arrays)}
    return session.run(None, feed)


def test_export_small_cnn_matches_torch(tmp_path: Path) -> None:
    model = _make_cnn()
    x = torch.randn(2, 3, 16, 16)
    result = export_onnx(model, tmp_path / "cnn.onnx", (x,))

    assert isinstance(result, OnnxExport)
    assert result.max_abs_error < 1e-4
    assert result.opset == 18
    assert result.num_nodes > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"], "weights must stay inline"
    onnx.checker.check_model(result.path, full_check=True)

    # independent check, not relying on export_onnx's own comparison
    (out,) = _ort_run(result.path, x.numpy())
    with torch.no_grad():
        expected = model(x).numpy()
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)

    # a fresh input, not the one used for tracing
    x2 = torch.randn(2, 3, 16, 16)
    (out2,) = _ort_run(result.path, x2.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(out2, model(x2).numpy(), atol=1e-4, rtol=0)


def test_file_size_follows_the_parameter_count(tmp_path: Path) -> None:
    """Weights are stored inline as float32: a file is 4 bytes per parameter of the torch module plus a graph of
    a few kB (4 kB here), so pruning 3/4 of the hidden channels makes the file about 4x smaller."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    x = (torch.randn(2, 128),)
    small = fxprune.compile(dense, x, {"target_sparsity": 0.75, "prune_domain": "local"}).prune().compact()
    n_dense, n_small = n_params(dense), n_params(small)
    assert n_dense == 128 * 1024 + 1024 + 1024 * 10 + 10 and n_small == 128 * 256 + 256 + 256 * 10 + 10
    files = {}
    for name, module, n in (("dense", dense, n_dense), ("compact", small, n_small)):
        files[name] = export_onnx(module, tmp_path / f"{name}.onnx", x).size_bytes
        assert 4 * n <= files[name] <= 4 * n + 16_000, (name, files[name], 4 * n)
    assert files["dense"] / files["compact"] == pytest.approx(n_dense / n_small, rel=0.05)


def test_export_graph_module_from_torch_export(tmp_path: Path) -> None:
    model = _make_cnn()
    x = torch.randn(2, 3, 16, 16)
    gm = torch.export.export(model, (x,), strict=False).module()
    assert isinstance(gm, torch.fx.GraphModule)
    flag_before = gm.training

    result = export_onnx(gm, tmp_path / "gm.onnx", (x,))

    assert result.max_abs_error < 1e-4
    assert gm.training == flag_before
    (out,) = _ort_run(result.path, x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=0)


def test_export_multiple_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TwoHeads().eval()
    x, scale = torch.randn(1, 3, 8, 8), torch.rand(1, 6, 1, 1) + 0.5
    result = export_onnx(model, tmp_path / "two.onnx", (x, scale))

    assert result.max_abs_error < 1e-4
    outs = _ort_run(result.path, x.numpy(), scale.numpy())
    with torch.no_grad():
        logits, feat = model(x, scale)
    assert len(outs) == 2
    np.testing.assert_allclose(outs[0], logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(outs[1], feat.numpy(), atol=1e-4, rtol=0)


def test_training_flags_restored_and_export_uses_eval(tmp_path: Path) -> None:
    model = _make_cnn().train()
    model.bn.eval()  # mixed state must survive exactly, not be flattened to model.train()
    x = torch.randn(4, 3, 16, 16)
    result = export_onnx(model, tmp_path / "train.onnx", (x,))

    assert model.training is True
    assert model.conv.training is True
    assert model.drop.training is True
    assert model.bn.training is False
    # the graph must be the eval-mode function (no dropout, running BN stats)
    model.eval()
    (out,) = _ort_run(result.path, x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=0)


def test_export_rejects_non_tuple_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tuple"):
        export_onnx(_make_cnn(), tmp_path / "bad.onnx", torch.randn(1, 3, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="list"):
        export_onnx(_make_cnn(), tmp_path / "bad.onnx", [torch.randn(1, 3, 8, 8)])  # type: ignore[arg-type]


def test_compare_outputs_accepts_close_and_reports_error() -> None:
    ref = (torch.ones(2, 3), [torch.zeros(4)], 7)  # non-tensor leaf is ignored
    err = compare_outputs(ref, [np.ones((2, 3), np.float32) + 5e-5, np.zeros(4, np.float32)], atol=1e-4)
    assert 4e-5 < err < 6e-5


def test_compare_outputs_mismatch_raises() -> None:
    ref = (torch.zeros(3), torch.ones(2, 2))
    bad = [np.zeros(3, np.float32), np.ones((2, 2), np.float32)]
    bad[1][1, 0] += 0.25
    with pytest.raises(OnnxMismatchError, match=r"output 1: max abs error 2\.500e-01.*atol=1\.0e-04"):
        compare_outputs(ref, bad, atol=1e-4)
    with pytest.raises(OnnxMismatchError, match="output count differs: torch produced 2.*onnxruntime 1"):
        compare_outputs(ref, [np.zeros(3, np.float32)], atol=1e-4)
    with pytest.raises(OnnxMismatchError, match="output 0: shape differs"):
        compare_outputs(ref, [np.zeros(4, np.float32), np.ones((2, 2), np.float32)], atol=1e-4)
    with pytest.raises(OnnxMismatchError, match="output 0"):
        compare_outputs((torch.zeros(2),), [np.array([0.0, np.nan], np.float32)], atol=1e-4)
    assert issubclass(OnnxMismatchError, RuntimeError)


def test_export_raises_when_runtime_disagrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = onnx_export_mod.run_onnxruntime

    def perturbed(path: str, *inputs) -> list[np.ndarray]:
        return [out + 1e-2 for out in real_run(path, *inputs)]

    monkeypatch.setattr(onnx_export_mod, "run_onnxruntime", perturbed)
    model = _make_cnn()
    with pytest.raises(OnnxMismatchError, match="output 0"):
        export_onnx(model, tmp_path / "m.onnx", (torch.randn(1, 3, 8, 8),))
    # check=False skips the runtime comparison entirely
    result = export_onnx(model, tmp_path / "m2.onnx", (torch.randn(1, 3, 8, 8),), check=False)
    assert np.isnan(result.max_abs_error)


@pytest.fixture(scope="module")
def two_widths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bench")
    x = torch.randn(1, 3, 16, 16)
    dense = export_onnx(_make_cnn(16), root / "dense.onnx", (x,))
    compact = export_onnx(_make_cnn(4), root / "compact.onnx", (x,))
    return {"dense": dense.path, "compact": compact.path}


def test_benchmark_rows(two_widths: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's bookkeeping, on a fake clock (speed itself is measured by the benchmarks, not asserted here):
    a dense run takes 8 ms / threads, a compact one 2 ms / threads, times 1..5 in turn, so any 5 timed runs
    have median 3x, p10 1.4x and p90 4.6x that; each session must run warmup + repeat times."""
    clock = [0.0]
    runs: Counter = Counter()
    label_of = {path: label for label, path in two_widths.items()}
    base_ms = {"dense": 8.0, "compact": 2.0}

    class FakeClockSession(ort.InferenceSession):
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            options = kwargs.get("sess_options") or args[0]
            self.key = (label_of[path], options.intra_op_num_threads)

        def run(self, *args, **kwargs):
            n = runs[self.key]
            runs[self.key] += 1
            clock[0] += base_ms[self.key[0]] / self.key[1] * (1 + n % 5) / 1e3
            return super().run(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", FakeClockSession)
    monkeypatch.setattr(ort_benchmark_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    result = benchmark(two_widths, threads=(1, 2), warmup=2, repeat=5, macs={"dense": 16_000, "compact": 4_000})

    assert isinstance(result, BenchmarkResult)
    assert runs == {(label, t): 2 + 5 for t in (1, 2) for label in two_widths}
    assert [(r.threads, r.label) for r in result.rows] == [
        (1, "dense"), (1, "compact"), (2, "dense"), (2, "compact"),
    ]
    for row in result.rows:
        unit = base_ms[row.label] / row.threads
        assert (row.median_ms, row.p10_ms, row.p90_ms) == pytest.approx((3 * unit, 1.4 * unit, 4.6 * unit))
        assert row.speedup == pytest.approx(1.0 if row.label == "dense" else 4.0)
        assert row.ideal == pytest.approx(1.0 if row.label == "dense" else 4.0)  # 16k / 4k MACs
        assert row.efficiency == pytest.approx(1.0)

    md = result.to_markdown().splitlines()
    assert md[0] == "| model | threads | median ms | p10 ms | p90 ms | speedup | ideal | speedup/ideal |"
    assert md[3] == "| compact | 1 | 6.000 | 2.800 | 9.200 | 4.00x | 4.00 | 1.00 |"
    assert len(md) == 2 + len(result.rows)
    text = str(result).splitlines()
    assert text[0].split()[0] == "model" and len(text) == 2 + len(result.rows)
    assert text[5].split() == ["compact", "2", "3.000", "1.400", "4.600", "4.00x", "4.00", "1.00"]
    assert len({len(line) for line in text}) == 1, "plain table columns must be aligned"
    dicts = result.as_dicts()
    assert dicts[1]["label"] == "compact" and dicts[1]["ideal"] == pytest.approx(4.0)


def test_benchmark_explicit_baseline_and_inputs(two_widths: dict[str, str]) -> None:
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    result = benchmark(two_widths, threads=(1,), warmup=1, repeat=3, inputs=feed, baseline="compact")
    assert [r.label for r in result.rows] == ["dense", "compact"]
    for row in result.rows:  # real timings: finite and ordered
        assert np.isfinite([row.p10_ms, row.median_ms, row.p90_ms]).all()
        assert 0 < row.p10_ms <= row.median_ms <= row.p90_ms
    by_label = {r.label: r for r in result.rows}
    assert by_label["compact"].speedup == 1.0
    assert by_label["dense"].ideal is None and by_label["dense"].efficiency is None
    assert "| - | - |" in result.to_markdown()


def test_benchmark_errors(two_widths: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        benchmark({})
    with pytest.raises(ValueError, match="unknown baseline 'sparse'"):
        benchmark(two_widths, baseline="sparse")
    missing = str(tmp_path / "nope.onnx")
    with pytest.raises(ValueError, match="nope.onnx"):
        benchmark({"dense": two_widths["dense"], "gone": missing})
    with pytest.raises(ValueError, match="macs has no entry"):
        benchmark(two_widths, macs={"dense": 10})
