"""The ``fxprune`` command, run as a user runs it: a model file in a folder, the command started there.

The commands a user runs (prune, bench, explain, and the user errors the command-line issue
names) run as subprocesses with that folder as the working directory and no
PYTHONPATH. Every process imports torch (seconds each), so the rest of the user errors are
checked in-process through ``main()``, which is what the entry point calls.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxprune
from fxprune.cli import main, make_inputs, parse_input_spec, token_range

MODELS = '''
import torch
import torch.nn as nn

SIZE = 3


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


def build():
    torch.manual_seed(0)
    return Net()


class Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def text():
    torch.manual_seed(0)
    return Text()


def needs(width):
    return Net(width)


def broken():
    raise RuntimeError("weights file missing")


def number():
    return 3


def on_meta():
    with torch.device("meta"):
        return Net()


def bf16():
    return build().to(torch.bfloat16)


class Fixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).reshape(2, 8)  # fixes the batch at 2


def fixed():
    return Fixed()
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A user's folder: mymodels.py and a YAML config."""
    path = tmp_path_factory.mktemp("user")
    (path / "mymodels.py").write_text(MODELS)
    (path / "prune.yaml").write_text("target_sparsity: 0.5\nround_to: 4\n")
    return path


def _command() -> list[str]:
    exe = shutil.which("fxprune", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "fxprune.cli"]


def start(folder, args: list[str]) -> subprocess.Popen:
    """Start ``fxprune ARGS`` in ``folder`` as a user would (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([*_command(), *args], cwd=folder, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(args: list[str], proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


PRUNE = ("prune", "mymodels:build", "--input", "1x3x8x8", "--config", "prune.yaml", "--out", "pruned")
EXPLAIN_TEXT = ("explain", "mymodels:text", "--input", "2x12:int64")
SWEEP = ("sweep", "mymodels:build", "--input", "2x3x8x8", "--sparsities", "0.5", "0.25", "--config", "{\"round_to\": 4}",
         "--batch", "3", "--repeat", "3", "--warmup", "1", "--out", "swept")
ERRORS = {  # the user errors the command-line issue names, and the pattern of their one line
    ("explain", "mymodels:biuld"): r"mymodels has no attribute 'biuld'; did you mean mymodels:build\? "
                                   r"callables defined in mymodels: .*build",
    ("explain", "mymodels:SIZE"): r"mymodels:SIZE is an int, not a callable; name a function or class",
    ("explain", "mymodels:build", "--input", "abc"): r"argument --input: 'abc' is not a shape: .* e\.g\. "
                                                     r"1x3x224x224 or 1x128:int64",
    ("demo", "--sparsity", "1.0"): r"argument --sparsity: '1\.0' is not a fraction in \[0, 1\)",
}


@pytest.fixture(scope="module")
def runs(folder):
    """Every subprocess but bench (which needs prune's files), started at once: each spends seconds importing torch."""
    commands = [PRUNE, EXPLAIN_TEXT, SWEEP, *ERRORS]
    procs = [(c, start(folder, list(c))) for c in commands]
    return {c: finish(list(c), p) for c, p in procs}


def assert_one_line_error(result, pattern: str) -> None:
    __tracebackhide__ = True
    assert result.returncode == 2, (result.args, result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, (result.args, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, (result.args, result.stderr)
    assert re.search(pattern, lines[0]), (result.args, lines[0], pattern)


@pytest.fixture(scope="module")
def pruned(folder, runs):
    result = runs[PRUNE]
    assert result.returncode == 0, result.stderr
    return folder / "pruned", result


# -- subprocess: as a user runs it -------------------------------------------------------------
def test_user_errors_are_one_line_with_exit_code_2(runs):
    for args, pattern in ERRORS.items():
        assert_one_line_error(runs[args], pattern)
        assert runs[args].stdout == ""


def test_prune_writes_every_file_from_the_users_folder(pruned):
    out, result = pruned
    names = {"dense.onnx", "compact.onnx", "compact.pt2", "plan.json", "report.txt"}
    assert names <= {p.name for p in out.iterdir()}
    report = (out / "report.txt").read_text()
    assert report.strip() in result.stdout and "MACs:" in report and "50.0%" in report
    assert "onnxruntime == torch" in result.stdout and "time them: fxprune bench" in result.stdout
    assert "capture and group" not in result.stderr  # stderr is no TTY here: no progress bar
    assert (out / "compact.onnx").stat().st_size < (out / "dense.onnx").stat().st_size

    # the files hold one compact model, with the batch dynamic: .pt2, ONNX and the plan agree on an unseen batch
    sys.path.insert(0, str(out.parent))
    try:
        import mymodels
    finally:
        sys.path.remove(str(out.parent))
        sys.modules.pop("mymodels", None)
    x = torch.randn(3, 3, 8, 8)
    small = fxprune.load_compact(out / "compact.pt2")
    with torch.no_grad():
        y = small(x)
    session = ort.InferenceSession(str(out / "compact.onnx"), providers=["CPUExecutionProvider"])
    (y_onnx,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(y_onnx, y.numpy(), atol=1e-4, rtol=1e-4)
    example = make_inputs([parse_input_spec("1x3x8x8")], None)
    again = fxprune.compile(mymodels.build().eval(), example, {"target_sparsity": 0.5, "round_to": 4})
    with torch.no_grad():
        torch.testing.assert_close(again.apply_plan(str(out / "plan.json")).compact()(x), y, atol=1e-5, rtol=1e-5)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["version"] == 1 and plan["groups"]


def test_bench_prints_the_interleaved_table_per_batch(pruned):
    out, _ = pruned
    plot = ["--plot", "latency.png"] if _has_matplotlib() else []
    args = ["bench", "dense.onnx", "compact.onnx", "--threads", "1", "--batch", "1", "3", "--repeat", "3",
            "--warmup", "1", *plot]
    result = finish(args, start(out, args))
    assert result.returncode == 0, result.stderr
    assert "onnxruntime latency, inputs x 1x3x8x8 float32:" in result.stdout
    assert "onnxruntime latency, inputs x 3x3x8x8 float32:" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("dense ", "compact "))]
    assert [(r[0], r[1]) for r in rows] == [("dense", "1"), ("compact", "1")] * 2
    assert all(r[5] == "1.00x" for r in rows if r[0] == "dense")  # the first file is the baseline
    if plot:
        assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_prints_a_row_per_point_timed_at_the_batch_asked(runs, folder):
    result = runs[SWEEP]
    assert result.returncode == 0, result.stderr
    assert "onnxruntime latency, inputs x 3x3x8x8 float32" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(("25%", "50%"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("25%", "25.0%", "1"), ("50%", "50.0%", "1")]
    assert float(rows[0][6].rstrip("x")) < float(rows[1][6].rstrip("x"))  # ideal grows with the sparsity
    assert sorted(p.name for p in (folder / "swept").iterdir()) == ["compact-0.onnx", "compact-1.onnx", "dense.onnx"]


def test_explain_a_text_model_with_integer_token_ids(runs):
    result = runs[EXPLAIN_TEXT]
    assert result.returncode == 0, result.stderr
    assert "prunable channel groups" in result.stdout and "fc1.weight[0]" in result.stdout
    assert "token ids in [0, 50) (the size of the first nn.Embedding, emb)" in result.stderr


# -- in-process: the same main() the entry point runs -------------------------------------------
def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def user(folder, monkeypatch):
    """In the user's folder, with sys.path and the imported model module restored afterwards."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield folder
    sys.modules.pop("mymodels", None)


def error_of(capsys, *argv) -> str:
    """main(argv) must fail as a user error: exit code 2, one line on stderr, nothing on stdout; returns the line."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith("fxprune: integer inputs")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, (code, captured.err)
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("factory, message", [
    ("mymodels:needs", r"mymodels:needs needs arguments \(width\), but FACTORY is called with none; give them "
                       r"defaults or add a function"),
    ("mymodels:broken", r"mymodels:broken\(\) raised RuntimeError: weights file missing \(at .*mymodels\.py:\d+\)"),
    ("mymodels:number", r"mymodels:number\(\) returned an int, not a torch\.nn\.Module"),
    ("mymodels", r"'mymodels' is not MODULE:FACTORY: .* e\.g\. mymodels:build"),
    ("mymodels:on_meta", r"parameters or buffers on the meta device .* model\.to_empty\(device='cpu'\) then load a "
                         r"state dict"),
])
def test_factory_errors(user, capsys, factory, message):
    assert re.search(message, error_of(capsys, "prune", factory, "--input", "1x3x8x8",
                                                              "--out", str(user / "never")))
    assert not (user / "never").exists()


def test_a_bfloat16_model_is_refused_before_any_work(user, capsys):
    line = error_of(capsys, "prune", "mymodels:bf16", "--input", "1x3x8x8:bfloat16", "--out", str(user / "bf"))
    assert "ONNX export of bfloat16 is not supported" in line and "model.float()" in line
    assert not (user / "bf").exists()


@pytest.mark.parametrize("name, body, message", [
    ("bad.yaml", "target_sparsity: [0.5\n", r"--config bad\.yaml: not valid YAML at line 2"),
    ("bad.json", '{"target_sparsity": 0.5,}', r"--config bad\.json: not valid JSON \(.* at line 1, column 25\)"),
    ("list.yaml", "- target_sparsity\n", r"expected a mapping of config keys .* got a list"),
    ("typo.yml", "taget_sparsity: 0.3\n", r"unknown config key 'taget_sparsity' .*did you mean 'target_sparsity'"),
    ("high.json", '{"target_sparsity": 1.0}', r"target_sparsity must be a number in \[0, 1\), got 1\.0"),
    (None, '{"target_sparsity": 0.5', r"--config: the inline JSON is malformed .* e\.g\. --config '\{"),
    (None, "missing.yaml", r"--config missing\.yaml: no such file; pass a \.json or \.yaml file, or inline JSON"),
])
def test_config_errors(user, capsys, name, body, message):
    config = body
    if name is not None:
        (user / name).write_text(body)
        config = name
    line = error_of(capsys, "prune", "mymodels:build", "--input", "1x3x8x8", "--config", config, "--out", "never")
    assert re.search(message, line), line
    assert not (user / "never").exists()


def test_bench_errors(user, capsys, monkeypatch, tmp_path):
    assert "nope.onnx: no such ONNX file" in error_of(capsys, "bench", "nope.onnx")
    static = tmp_path / "static.onnx"  # exported at the example's shapes: a fixed batch of 2
    fxprune.export_onnx(torch.nn.Linear(4, 3), static, (torch.randn(2, 4),))
    assert re.search(r"static\.onnx has a fixed batch of 2 .* pass --batch 2, or export it with a dynamic batch",
                     error_of(capsys, "bench", str(static), "--batch", "8"))
    assert "threads" in error_of(capsys, "bench", str(static), "--threads", "0")
    (tmp_path / "junk.onnx").write_text("junk")
    assert re.search(r"junk\.onnx: onnxruntime cannot load it \(.*\); pass an ONNX file",
                     error_of(capsys, "bench", str(tmp_path / "junk.onnx")))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert re.search(r"--plot needs matplotlib, which is not installed .*: pip install fxprune\[plot\]",
                     error_of(capsys, "bench", str(static), "--plot", "x.png"))


def _exit_output(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_shows_an_example_of_every_command_and_version(capsys):
    help_ = _exit_output(capsys, ["--help"])
    for example in ("fxprune prune mymodels:build --input 1x3x224x224", "fxprune prune mymodels:bert --input "
                    "1x128:int64", "fxprune bench pruned/dense.onnx pruned/compact.onnx --threads 1 2 --batch 1 8",
                    "fxprune explain mymodels:build", "fxprune sweep mymodels:build", "fxprune demo"):
        assert example in help_
    assert _exit_output(capsys, ["--version"]) == f"fxprune {importlib.metadata.version('fxprune')}\n"
    prune_help = _exit_output(capsys, ["prune", "--help"])
    assert "one-shot pruning (pruning.prune())" in prune_help and "num_embeddings of the" in prune_help
    for command in ("bench", "explain", "sweep", "demo"):
        assert f"fxprune {command} " in _exit_output(capsys, [command, "--help"]).split("examples:")[-1]


def test_a_module_not_in_the_folder(user, capsys):
    assert re.search(r"cannot import 'nosuch': there is no nosuch\.py \(or package\) in .* run fxprune from the "
                     r"folder that holds it", error_of(capsys, "explain", "nosuch:build"))


def test_a_warning_is_one_line(user, capsys):
    assert main(["explain", "mymodels:fixed", "--input", "2x8"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxprune explain: warning: Fixed: the batch dim could not be captured")


def test_debug_shows_the_traceback(user, capsys):
    with pytest.raises(Exception, match="cannot import 'nosuch'"):
        main(["explain", "nosuch:build", "--debug"])
    with pytest.raises(Exception, match="has no attribute 'biuld'"):
        main(["--debug", "explain", "mymodels:biuld"])


def test_input_specs():
    assert parse_input_spec("1x3x224x224") == ((1, 3, 224, 224), "float32")
    assert parse_input_spec("1x128:int64") == ((1, 128), "int64")
    assert parse_input_spec("2x8:BFloat16") == ((2, 8), "bfloat16")
    for bad in ("abc", "1x0", "1x-3", "1x3:int9", "", "x"):
        with pytest.raises(Exception, match="e.g."):
            parse_input_spec(bad)


def test_token_ids_follow_the_input_embedding():
    class Hf(torch.nn.Module):  # get_input_embeddings() wins over the first nn.Embedding
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Embedding(7, 4)
            self.tok = torch.nn.Embedding(30, 4)

        def get_input_embeddings(self):
            return self.tok

    assert token_range(Hf()) == (30, "the size of get_input_embeddings()")
    assert token_range(torch.nn.Sequential(torch.nn.Embedding(12, 4))) == (12, "the size of the first nn.Embedding, 0")
    assert token_range(torch.nn.Linear(2, 2))[0] == 100
    (ids,) = make_inputs([((4, 500), "int64")], Hf())
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) == 29
    mask, x = make_inputs([((2, 3), "bool"), ((2, 3), "float16")], None)
    assert bool(mask.all()) and x.dtype == torch.float16


def test_sweep_errors(user, capsys):
    assert "drop 'target_sparsity' from the config" in error_of(
        capsys, "sweep", "mymodels:build", "--input", "1x3x8x8", "--sparsities", "0.5", "--config",
        '{"target_sparsity": 0.3}')
    assert re.search(r"target_speedup 0\.5 is out of range", error_of(
        capsys, "sweep", "mymodels:build", "--input", "1x3x8x8", "--target-speedups", "0.5"))
    assert "not a fraction in [0, 1)" in error_of(capsys, "sweep", "mymodels:build", "--input", "1x3x8x8",
                                                 "--sparsities", "1.5")
