"""How far a 2-vCPU host moves the 2-thread speedup: the same request timed in short blocks.

    python benchmarks/thread_phases.py --models resnet50 convnext-tiny --blocks 40 --out benchmarks/results_thread_phases.md

The same request as ``bench_latency.py`` (a) (50% of channels, classifier excluded, each tool's
defaults); the dense, fxprune and peer ONNX files are timed in blocks: per block each file runs
``--runs`` times at 1 thread and at 2 threads (median per file and thread count). The dense model's
own 2-thread scaling in a block (its 1-thread ms over its 2-thread ms) says how much of a second
core the host gave in that block; the compact models' 2-thread speedups are split by it. The host's
steal time over each block's 2-thread runs is read from /proc/stat.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure  # noqa: E402
import bench_latency  # noqa: E402



def _cpu_ticks() -> tuple[int, int]:
    """(all ticks, steal ticks) of the whole machine so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields), fields[7] if len(fields) > 7 else 0


def _blocks(files: dict, x: np.ndarray, blocks: int, runs: int) -> list[dict]:
    import onnxruntime as ort

    from fxprune.exporters.ort_benchmark import session_options

    sessions = {(k, t): ort.InferenceSession(path, session_options(t), providers=["CPUExecutionProvider"])
                for k, path in files.items() for t in (1, 2)}
    feed = {k: {s.get_inputs()[0].name: x} for (k, _), s in sessions.items()}

    def median_ms(key) -> float:
        s = sessions[key]
        s.run(None, feed[key[0]])  # wakes the session's threads; not timed
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            s.run(None, feed[key[0]])
            out.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(out))

    rows = []
    for _ in range(blocks):
        row = {key: median_ms(key) for key in sessions if key[1] == 1}
        all0, steal0 = _cpu_ticks()
        row.update({key: median_ms(key) for key in sessions if key[1] == 2})
        all1, steal1 = _cpu_ticks()
        row["steal"] = (steal1 - steal0) / max(1, all1 - all0)
        rows.append(row)
    return rows


def _summary(name: str, files: dict, macs: dict, rows: list[dict]) -> list[str]:
    scaling = np.array([r["dense", 1] / r["dense", 2] for r in rows])
    cut = float(np.median(scaling))
    lines = [f"### {name}", "",
             f"Dense 2-thread scaling per block (1-thread ms / 2-thread ms): min {scaling.min():.2f}, median {cut:.2f}, "
             f"max {scaling.max():.2f}; steal time during the 2-thread runs: max "
             f"{max(r['steal'] for r in rows):.1%} of the CPU time.", "",
             "| files | ideal | 1t speedup (median of blocks) | 2t speedup, all blocks: median (p10–p90) | "
             f"2t, blocks where dense scales ≥ {cut:.2f} | 2t, blocks where it scales < {cut:.2f} |",
             "|---|---:|---:|---:|---:|---:|"]
    fast = scaling >= cut
    for k in files:
        if k == "dense":
            continue
        ideal = macs["dense"] / macs[k]
        s1 = np.array([r["dense", 1] / r[k, 1] for r in rows])
        s2 = np.array([r["dense", 2] / r[k, 2] for r in rows])

        def cell(v):
            return f"{np.median(v):.2f}x ({np.median(v) / ideal:.2f})"

        lines.append(f"| {k} | {ideal:.2f} | {cell(s1)} | {cell(s2)} ({np.percentile(s2, 10):.2f}–"
                     f"{np.percentile(s2, 90):.2f}) | {cell(s2[fast])} | {cell(s2[~fast])} |")
    lines += ["", "Speedup (speedup / ideal). Per block, in order (dense scaling; fxprune and peer 2-thread speedup):",
              "", "`" + "; ".join(f"{sc:.2f}: " + "/".join(f"{r['dense', 2] / r[k, 2]:.2f}" for k in files
                                                             if k != "dense")
                                 for sc, r in zip(scaling, rows)) + "`", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50"], choices=list(bench_latency.MODELS))
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--runs", type=int, default=8, help="timed runs per file, thread count and block")
    ap.add_argument("--out")
    args = ap.parse_args()
    start = time.time()
    lines = ["# The 2-thread speedup block by block", "", "```", _measure.command_line(__file__), "```", "",
             "- machine: " + ", ".join(f"{k} = {v}" for k, v in _measure.machine().items()), ""]
    for name in args.models:
        tmp = tempfile.mkdtemp()
        files, macs, x, failure = bench_latency.request_files(name, tmp, hidden=False)
        if failure is not None:
            lines.append(f"- {name}: Torch-Pruning failed: {failure}")
        lines += _summary(name, files, macs, _blocks(files, x.numpy(), args.blocks, args.runs))
    lines.append(f"Total wall time: {(time.time() - start) / 60:.1f} min")
    _measure.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
