"""Models and files fxprune cannot use are refused with an error that names the problem and the fix,
and nothing is changed: a model on the meta device, ONNX export of bfloat16, a truncated .pt2."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import FxPruneError, OnnxExportError, PruningError
from tests.checks import assert_compact_matches_masked


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def snapshot(model: nn.Module) -> dict:
    return {k: (v.device, v.dtype, v.shape, None if v.is_meta else v.clone()) for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now.keys() == before.keys()
    for k, (device, dtype, shape, value) in before.items():
        assert now[k][:3] == (device, dtype, shape), k
        assert value is None or torch.equal(now[k][3], value), k


def test_compile_refuses_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = mlp()
    before = snapshot(model)
    for inputs in ((torch.randn(2, 8),), (torch.randn(2, 8, device="meta"),)):
        with pytest.raises(ValueError, match=r"Sequential has 4 parameters or buffers on the meta device \(e\.g\. "
                                             r"0\.weight\): they have shapes but no values.*load or initialise the "
                                             r"weights first, e\.g\. model\.to_empty\(device='cpu'\) then load a "
                                             r"state dict"):
            fxprune.compile(model, inputs, {"target_sparsity": 0.5}, inplace=True)
    assert_unchanged(model, before)
    # the fix the message names works
    model.to_empty(device="cpu").load_state_dict(mlp().state_dict())
    pruning = fxprune.compile(model, (torch.randn(2, 8),), {"target_sparsity": 0.5}).prune()
    assert_compact_matches_masked(pruning, pruning.compact(), (torch.randn(5, 8),), atol=1e-6, rtol=1e-5)


def test_export_onnx_refuses_bfloat16_before_writing(tmp_path):
    model = mlp().to(torch.bfloat16)
    before = snapshot(model)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    path = tmp_path / "out" / "bf16.onnx"
    with pytest.raises(OnnxExportError, match=r"ONNX export of bfloat16 is not supported \(5 bfloat16 tensors, "
                                              r"e\.g\. 0\.weight\).*export a float32 copy: "
                                              r"copy\.deepcopy\(model\)\.float\(\)") as info:
        fxprune.export_onnx(model, path, (x,))
    assert isinstance(info.value, FxPruneError)
    assert not path.parent.exists()
    assert_unchanged(model, before)
    with pytest.raises(OnnxExportError, match="e.g. input 0"):  # a float32 model given bfloat16 inputs
        fxprune.export_onnx(mlp(), path, (x,), check=False)
    # the fix the message names works
    result = fxprune.export_onnx(copy.deepcopy(model).float(), path, (x.float(),))
    assert result.max_abs_error < 1e-4


def test_load_compact_of_a_truncated_file_is_one_quiet_error(tmp_path, capfd):
    x = torch.randn(2, 8)
    small = fxprune.compile(mlp(), (x,), {"target_sparsity": 0.5}).prune().compact()
    whole = tmp_path / "small.pt2"
    fxprune.save_compact(small, whole, (x,))
    data = whole.read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(data[: len(data) // 2])
    handlers = list(logging.getLogger("torch.export").handlers)
    capfd.readouterr()
    with pytest.raises(PruningError, match=rf"{cut} cannot be loaded: truncated or not a \.pt2 written by "
                                           r"save_compact \(.*central directory\)"):
        fxprune.load_compact(cut)
    assert capfd.readouterr().err == ""  # torch logs a 15-line traceback here; it is held back
    assert logging.getLogger("torch.export").handlers == handlers
    assert cut.read_bytes() == data[: len(data) // 2]
    with pytest.raises(FileNotFoundError, match="no such file; write one with fxprune.save_compact"):
        fxprune.load_compact(tmp_path / "missing.pt2")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        fxprune.load_compact(tmp_path)
    with torch.no_grad():  # the whole file still loads
        torch.testing.assert_close(fxprune.load_compact(whole)(x), small(x))
