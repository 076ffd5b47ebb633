"""Pictures: the report's widths plot, the benchmark plot and the groups graph of ``explain``.

The pictures are checked to be written; what they draw is checked on the data they are drawn from
(``report().layers``, ``Explanation.graph()``) against the compact model and ``pruning.groups``.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

import fxprune
from fxprune.cli import main
from fxprune.exporters import BenchmarkResult, benchmark
from fxprune.exporters.ort_benchmark import BenchmarkRow, plot_benchmarks
from fxprune.report import block_of, layer_of
from tests.models import ARCHITECTURES

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bottleneck():
    """A residual model with two indexed blocks, pruned one shot; the report taken before compact()."""
    make, inputs = ARCHITECTURES["ResNetBottleneck"]
    model, x = make(), inputs()
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5, "round_to": 1})
    pruning.prune()
    report = pruning.report()
    return model, x, pruning, report, pruning.compact()


def test_block_of_cuts_the_path_at_the_block_index():
    assert block_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert block_of("layer1.0.downsample.0") == "layer1.0"
    assert block_of("features.3") == "features"  # the index is the layer itself
    assert block_of("layer2.conv1") == "layer2"
    assert block_of("fc") == ""
    assert layer_of("layer1.0.conv1.weight") == "layer1.0.conv1" and layer_of("cls_token") == "cls_token"


def test_report_widths_are_the_compact_models_shapes(bottleneck):
    model, _, pruning, report, small = bottleneck
    weights = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    assert [r.parameter for r in report.layers] == list(weights)
    for row in report.layers:
        assert (row.out_before, row.in_before) == tuple(weights[row.parameter].shape[:2])
        assert (row.out_after, row.in_after) == tuple(small.get_parameter(row.parameter).shape[:2]), row
        assert row.name == layer_of(row.parameter)
    assert any(r.out_after < r.out_before for r in report.layers)
    assert {r.block for r in report.layers} == {"", "layer1.0", "layer1.1"}


def test_report_widths_are_the_kept_counts_of_the_groups(bottleneck):
    _, _, pruning, report, _ = bottleneck
    rows = {r.parameter: r for r in report.layers}
    seen = 0
    for group in pruning.groups:
        kept = pruning.kept_channels[group.index]  # indices of the kept channels
        assert 0 < len(kept) < group.size
        for m in group.parameters:
            if m.name in rows:
                width = int((np.isin(m.atoms, kept) | (m.atoms < 0)).sum())
                assert getattr(rows[m.name], "out_after" if m.dim == 0 else "in_after") == width, (m, group.index)
                seen += 1
    assert seen >= len(report.layers)  # every weight is in some group on at least one dim


def test_report_plot_writes_a_png_before_and_after_compact(bottleneck, tmp_path):
    _, _, pruning, report, _ = bottleneck
    report.plot(tmp_path / "before.png")  # the report taken before compact()
    pruning.report().plot(tmp_path / "sub" / "after.png")
    for name in ("before.png", "sub/after.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5_000


def test_a_missing_matplotlib_names_the_extra(bottleneck, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"needs matplotlib, which is not installed .*pip install fxprune\[plot\]"):
        bottleneck[3].plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# -- benchmark -------------------------------------------------------------------------------------
def _result(ideal: float | None = None) -> BenchmarkResult:
    rows = [BenchmarkRow(label, t, ms, ms * 0.9, ms * 1.2, 2.0 / ms if label == "compact" else 1.0, ideal, None)
            for t in (1, 2) for label, ms in (("dense", 2.0), ("compact", 1.0))]
    return BenchmarkResult(rows, "dense", {"x": ((8, 3, 8, 8), "float32")})


def test_benchmark_plot_of_synthetic_results(tmp_path):
    result = _result(ideal=3.0)
    assert result.input_summary == "x 8x3x8x8 float32"
    result.plot(tmp_path / "one.png")
    plot_benchmarks([result, _result()], tmp_path / "two.png", titles=["batch 8", "batch 1"])
    for name in ("one.png", "two.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5_000
    with pytest.raises(ValueError, match="1 titles for 2 results"):
        plot_benchmarks([result, result], tmp_path / "bad.png", titles=["only one"])
    with pytest.raises(ValueError, match="nothing to plot"):
        BenchmarkResult().plot(tmp_path / "empty.png")
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "empty.png").exists()


def test_benchmark_records_the_inputs_it_timed(tmp_path):
    path = tmp_path / "lin.onnx"
    fxprune.export_onnx(torch.nn.Linear(4, 3), path, (torch.randn(2, 4),))
    feed = {"input": np.zeros((2, 4), np.float32)}  # exported at its example's shapes
    result = benchmark({"lin": str(path)}, threads=[1], warmup=0, repeat=2, inputs=feed)
    assert result.inputs == {"input": ((2, 4), "float32")} and result.input_summary == "input 2x4 float32"
    result.plot(tmp_path / "lin.png")
    assert (tmp_path / "lin.png").read_bytes()[:8] == PNG


# -- explain graph ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explained(bottleneck):
    model, x, *_ = bottleneck
    return fxprune.explain(model, x)


def test_graph_groups_are_pruning_groups(bottleneck, explained):
    pruning = bottleneck[2]
    graph = explained.graph()
    assert len(graph.graph["groups"]) == len(pruning.groups) > 1
    for group in pruning.groups:
        layers = {layer_of(m.name) for m in group.parameters}
        assert set(graph.graph["groups"][group.index]) == layers
        assert {n for n, data in graph.nodes(data=True) if group.index in data["groups"]} == layers
        edges = [(a, b) for a, b, key in graph.edges(keys=True) if key == group.index]
        assert len(edges) == len(layers) - 1 and {n for e in edges for n in e} == (layers if edges else set())
    frozen = {f"{name}[{dim}]": reason for (name, dim), reason in explained.frozen_dims().items()}
    assert frozen and "fc.weight[0]" in frozen and "model output" in frozen["fc.weight[0]"]
    assert {d: r for _, data in graph.nodes(data=True) for d, r in data["frozen"].items()} == frozen
    assert graph.nodes["fc"]["frozen"]["fc.weight[0]"] == frozen["fc.weight[0]"]


def test_draw_every_format(explained, tmp_path):
    for ext in ("html", "svg", "dot", "png"):
        explained.draw(tmp_path / f"groups.{ext}")
    page = (tmp_path / "groups.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script" not in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)  # self-contained: nothing fetched
    rows = re.findall(r'<tr><td><span class="swatch".*?</span>(\d+)</td>', page)
    assert [int(r) for r in rows] == [g.index for g in explained.groups]
    assert "fc.weight[0]</code></td><td>fc</td><td>" in page and "model output" in page
    svg = (tmp_path / "groups.svg").read_text()
    assert svg.count('<g id="group-') == len(explained.groups)
    assert re.search(r'<g id="layer-\d+">\s*<title>fc\ngroups: \d+\nfrozen fc\.bias\[0\]: .*model output', svg)
    dot = (tmp_path / "groups.dot").read_text()
    assert dot.startswith("graph fxprune_groups {") and dot.rstrip().endswith("}")
    assert dot.count(" -- ") == explained.graph().number_of_edges()
    assert re.search(r'"fc" \[tooltip="fc\\ngroups: \d+\\nfrozen fc\.bias\[0\]: .*model output', dot)
    assert (tmp_path / "groups.png").read_bytes()[:8] == PNG


def test_draw_refuses_an_unknown_extension(explained, tmp_path):
    with pytest.raises(ValueError, match=r"cannot draw a graph as '\.pdf'; name the file \*\.html, \*\.svg"):
        explained.draw(tmp_path / "groups.pdf")
    assert not (tmp_path / "groups.pdf").exists()


# -- command line ----------------------------------------------------------------------------------
MODEL = '''
import torch.nn as nn


def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
'''


@pytest.fixture
def user(tmp_path, monkeypatch):
    (tmp_path / "picmodels.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop("picmodels", None)


def test_cli_explain_draws_the_graph(user, capsys):
    assert main(["explain", "picmodels:build", "--input", "1x3x8x8", "--graph", "out/groups.dot"]) == 0
    assert "graph: out/groups.dot" in capsys.readouterr().out
    dot = (user / "out" / "groups.dot").read_text()
    assert '"0" -- "2" [color="#1f77b4", label="g0"' in dot


@pytest.mark.parametrize("graph, message", [
    ("groups.pdf", r"--graph 'groups\.pdf': cannot draw a graph as '\.pdf'; name the file \*\.html"),
    ("groups.html", r"--graph \.html needs matplotlib, which is not installed .*pip install fxprune\[plot\]"),
])
def test_cli_explain_graph_errors_come_before_capture(user, capsys, monkeypatch, graph, message):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(sys.modules["fxprune.explain"], "capture", lambda *a, **k: pytest.fail("captured first"))
    assert main(["explain", "picmodels:build", "--input", "1x3x8x8", "--graph", graph]) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err) and len(captured.err.strip().splitlines()) == 1, captured.err
    assert not (user / graph).exists()
