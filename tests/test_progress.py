"""Progress bars: shown on request (and on a terminal), silent with progress=False."""

from __future__ import annotations

import torch

import fxprune
from tests.models import ARCHITECTURES


def _run(tmp_path, progress):
    factory, inputs = ARCHITECTURES["PlainCNN"]
    x = inputs()
    p = fxprune.compile(factory(), x, {"target_sparsity": 0.5}, progress=progress)
    small = p.prune().compact(progress=progress)
    fxprune.export_onnx(small, tmp_path / "small.onnx", x, progress=progress)
    return small


def test_bars_name_each_stage_when_asked(tmp_path, capsys):
    _run(tmp_path, True)
    err = capsys.readouterr().err
    for stage in ("compile: capture (torch.export)", "compile: group channels", "compact: remove channels",
                  "compact: compare with the masked model", "ONNX export: torch.onnx.export",
                  "ONNX export: onnx.checker", "ONNX export: onnxruntime == torch"):
        assert stage in err, stage


def test_no_bar_with_progress_false(tmp_path, capsys):
    small = _run(tmp_path, False)
    assert "compile:" not in capsys.readouterr().err
    assert isinstance(small, torch.fx.GraphModule)
