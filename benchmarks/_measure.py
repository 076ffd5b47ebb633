"""What ``bench_cnn.py`` and ``bench_transformers.py`` share: one fxprune measurement pipeline,
the worker-process plumbing, peak-RSS probes, ONNX export with retry and the report plumbing.

Kept in one place so that both benchmarks time, measure and report the same steps the same way:
a figure in results_cnn.md and the one of the same name in results_transformers.md mean the same.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone

WORKER_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------------------
# peak-RSS probes (run inside the workers)
# ------------------------------------------------------------------------------------------
def _status_mib(key: str) -> float | None:
    """A Vm* line of /proc/self/status in MiB (VmRSS: current, VmHWM: peak resident set size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    rss = _status_mib("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mib() -> float:
    """Peak RSS of this process (MiB) since it started or since the last ``_reset_peak()``.

    VmHWM, not ``getrusage().ru_maxrss``: in a process started by fork+exec, ru_maxrss also
    counts the parent's RSS at exec time (the kernel carries the old mm's high-water mark into
    signal->maxrss), so every worker would report at least the driver's RSS. VmHWM is the same
    high-water counter for this process's own address space only.
    """
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mark_build_start(out: dict, peak_before: bool = False) -> None:
    """Reset the RSS high-water mark and note the RSS just before a graph build.

    Every tool's "peak RSS during graph build" and "RSS increase" are read against this same
    baseline; ``peak_before`` also records the peak reached before it (model build, warm-up).
    """
    if peak_before:
        out["peak_before_mib"] = _peak_rss_mib()
    out["peak_reset"] = _reset_peak()
    out["rss_before_mib"] = _rss_mib()


# ------------------------------------------------------------------------------------------
# measurement helpers (run inside the workers)
# ------------------------------------------------------------------------------------------
def _checksum(model) -> float:
    """Sum of |w| over all parameters: shows both workers pruned identical weights."""
    import torch

    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def _err(exc: BaseException) -> str:
    """The full traceback as text: a failure is reported in the markdown, not raised."""
    return "".join(traceback.format_exception(exc)).strip()


def _export(module, path, x) -> dict:
    """``fxprune.export_onnx`` with its default check (atol=1e-4, absolute).

    If only that check fails (OnnxMismatchError), the error is recorded and the export is redone
    with the tolerance scaled to the output (atol = 1e-4 * max(1, max|y|), the rule ``compact()``
    uses) so the latency benchmark can still run; the table marks such exports.
    """
    import torch
    import torch.utils._pytree as pytree

    import fxprune
    from fxprune.exporters import OnnxMismatchError

    t0 = time.perf_counter()
    info = {}
    try:
        e = fxprune.export_onnx(module, path, (x,))
    except OnnxMismatchError as exc:
        with torch.no_grad():
            ys = [t for t in pytree.tree_leaves(module(x)) if isinstance(t, torch.Tensor)]
        scale = max([1.0] + [float(t.abs().max()) for t in ys if t.numel()])
        info["check_error"] = _err(exc)
        info["retry_atol"] = 1e-4 * scale
        e = fxprune.export_onnx(module, path, (x,), atol=1e-4 * scale)
    info.update(path=e.path, opset=e.opset, max_abs_error=e.max_abs_error, num_nodes=e.num_nodes,
                size_bytes=e.size_bytes, seconds=time.perf_counter() - t0)
    return info


def _reasons(blocked: dict, top: int = 4) -> list:
    """Most common reasons in fxprune's blocked-dims dict ('origin[d]: reason [op at file:line]')."""
    import collections

    c = collections.Counter(str(v).split(": ", 1)[-1].split(" [")[0] for v in blocked.values())
    return c.most_common(top)


def fxprune_pipeline(out: dict, model_box: list, x, cfg: dict, tmp: str, *, warm, peak_before: bool = False,
                     after_prune=None, reasons_top: int = 4) -> None:
    """The measured fxprune run: compile, dense ONNX, prune, compact, report, compact ONNX.

    One copy of the sequence so both benchmarks time the same steps and fill ``out`` with the same
    keys. A failure is recorded as ``out["error_stage"]`` (the step) and ``out["error"]`` instead of
    raised, so the figures measured before it are still reported.

    ``model_box`` is a one-item list holding the only reference to the eager model: it is emptied
    once ``compile()`` has made its own copy, so that memory is freed before the later steps whose
    peak RSS is measured. ``warm(model)`` runs under ``torch.no_grad()`` before the RSS baseline
    (so compile does not pay eager first-call costs); ``after_prune(p)`` returns extra figures.
    """
    import torch

    import fxprune

    stage = "build"
    try:
        with torch.no_grad():
            warm(model_box[0])
        mark_build_start(out, peak_before)
        stage = "compile"
        t0 = time.perf_counter()
        p = fxprune.compile(model_box[0], (x,), cfg)
        out["compile_wall_s"] = time.perf_counter() - t0
        out["peak_after_build_mib"] = _peak_rss_mib()
        out["capture_s"] = p.captured.seconds
        out["group_s"] = p.grouping.seconds
        out["build_s"] = p.captured.seconds + p.grouping.seconds
        out["groups"] = len(p.groups)
        model_box.clear()  # compile() works on its own copy

        stage = "export dense"
        out["dense_onnx"] = _export(p.captured.graph_module, os.path.join(tmp, "dense.onnx"), x)

        stage = "prune"
        t0 = time.perf_counter()
        p.prune()
        out["prune_s"] = time.perf_counter() - t0
        out["channel_sparsity"] = p.sparsity
        if after_prune is not None:
            out.update(after_prune(p))
        stage = "compact"
        t0 = time.perf_counter()
        small = p.compact()
        out["compact_s"] = time.perf_counter() - t0
        out["compact_error"] = getattr(p, "compact_error", None)
        stage = "report"
        t0 = time.perf_counter()
        r = p.report()
        out["report_s"] = time.perf_counter() - t0
        out.update(params_before=r.params_before, params_after=r.params_after, macs_before=r.macs_before,
                   macs_after=r.macs_after, ideal=r.macs_ratio, params_ratio=r.params_ratio,
                   blocked=len(r.blocked), blocked_reasons=_reasons(r.blocked, top=reasons_top))
        stage = "export compact"
        out["onnx"] = _export(small, os.path.join(tmp, "fxprune.onnx"), x)
    except BaseException as exc:  # noqa: BLE001 - recorded, not hidden
        out["error_stage"] = stage
        out["error"] = _err(exc)
    out["peak_end_mib"] = _peak_rss_mib()


# ------------------------------------------------------------------------------------------
# worker processes
# ------------------------------------------------------------------------------------------
def add_run_args(ap, models: dict) -> None:
    """The options both benchmarks take, with the same defaults, so their command lines compare."""
    ap.add_argument("--models", nargs="+", default=list(models), choices=list(models))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)


def add_worker_args(ap, **worker_kw) -> None:
    """Hidden options that turn a script into its own worker (see ``run_worker``)."""
    import argparse

    ap.add_argument("--_worker", help=argparse.SUPPRESS, **worker_kw)
    ap.add_argument("--_tmp", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)


def run_worker(script: str, tool: str, model: str, args, tmp: str, extra: list[str]) -> dict:
    """Run ``script`` again as a worker for one model and return the dict it wrote.

    A fresh process per measurement keeps each one's peak RSS its own, and a crash or hang (e.g. a
    segfault) becomes an error entry (stage "worker") instead of ending the whole benchmark run.
    """
    result_path = os.path.join(tmp, f"{tool}.json")
    cmd = [sys.executable, os.path.abspath(script)] + extra + [
        "--models", model, "--sparsity", str(args.sparsity), "--batch", str(args.batch),
        "--round-to", str(args.round_to), "--_tmp", tmp, "--_result", result_path]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "error_stage": "worker", "error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(result_path):
        tail = (proc.stderr or proc.stdout or "").strip()[-4000:]
        return {"tool": tool, "error_stage": "worker",
                "error": f"worker exited with status {proc.returncode}\n{tail}", "worker_s": wall}
    with open(result_path) as f:
        res = json.load(f)
    res["worker_s"] = wall
    return res


def worker_main(args, worker) -> int:
    """The worker side of ``run_worker``: measure one model, hand the dict back as JSON."""
    args.model, args.tmp = args.models[0], args._tmp
    res = worker(args)
    with open(args._result, "w") as f:
        json.dump(res, f, indent=1, default=str)
    return 0


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def _f(v, fmt=".2f", unit=""):
    """A figure formatted for a table cell; "-" where it was not measured."""
    if v is None:
        return "-"
    return f"{format(v, fmt)}{unit}"


def _mb(n):
    """A count in millions (params M), None passed through."""
    return None if n is None else n / 1e6


def _first_line(err: str) -> str:
    """The last non-empty line of a traceback (the exception itself), for one-line messages."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else err


def rows_by_label(bench) -> dict:
    """``fxprune.benchmark`` rows as {label: {threads: row}} for the summary tables."""
    by: dict = {}
    if bench is not None:
        for b in bench.rows:
            by.setdefault(b.label, {})[b.threads] = b
    return by


def run_notes(fx: dict, scale_tail: str, load_tail: str) -> list[str]:
    """The notes every model section starts with: the dense output scale (the ONNX errors are
    absolute, so they need it) and the load average around the latency run (other processes skew it).
    """
    notes = []
    if fx.get("output_absmax") is not None:
        notes.append(f"dense output max |last_hidden_state| = {fx['output_absmax']:.3g}{scale_tail}")
    if fx.get("loadavg"):
        notes.append(f"1-min load average before / after the latency benchmark: {fx['loadavg'][0]:.2f} / "
                     f"{fx['loadavg'][1]:.2f}{load_tail}")
    return notes


def machine() -> dict:
    """CPU, OS and library versions: latency figures mean little without them."""
    import onnxruntime
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = f"{cpu} ({names[0]})" if cpu else names[0]
    except OSError:
        pass
    return {"platform.processor()": cpu, "os.cpu_count()": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}


def command_line(script: str) -> str:
    """The command that produced a report, quoted so it can be pasted to rerun it."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script)] + sys.argv[1:])


def write_report(path: str | None, title: str, command: str, info: dict, details: list[str], total_s: float,
                 summary: str, sections: list[str]) -> None:
    """Print the markdown report (title, command, run details, summary, per-model sections); write it to ``path``.

    Both benchmarks' results files share this layout, so RESULTS.md can quote either the same way.
    """
    header = [
        title, "",
        "```", command, "```", "",
        f"- date (UTC): {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        "- machine: " + ", ".join(f"{k} = {v}" for k, v in info.items()),
        *details,
        f"- total wall time of this run: {total_s / 60:.1f} min",
        "",
        "### Summary", "",
        summary, "",
    ]
    text = "\n".join(header + ["\n\n".join(sections), ""])
    emit(text, path)


def emit(text: str, path: str | None) -> None:
    """Print a report, and write it to ``path`` when one is given."""
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
