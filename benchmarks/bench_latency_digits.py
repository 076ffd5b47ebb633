"""Accuracy at equal measured latency: latency-aware allocation vs uniform widths, on digits.

    python benchmarks/bench_latency_digits.py --out benchmarks/results_latency_digits.md

Per seed, the demo's DigitsCNN is trained dense (300 steps), then pruned during the same
300-step fine-tune (snip_momentum, iterative, cos decay, as ``fxprune demo``) twice:

- **uniform**: ``prune_domain: local`` at ``--uniform-sparsity`` (every group loses the same
  fraction, aligned as the default does); its compact model is timed against the dense one;
- **latency-aware**: ``{"target_speedup": S}`` with ``S`` the speedup the uniform model measured,
  at batch 64, 1 thread: the allocation has to be as fast, and spends the same latency budget
  where its importance per millisecond says.

Both compact models are then timed interleaved against the dense one (onnxruntime, 1 thread,
batch 64; speedups from the 10th percentiles, as the target's check times) and their test accuracy
reported. The uniform model comes first because its widths move in aligned steps (16 channels of
64-256): a uniform model matched to a latency-aware one's latency lands a whole step away, while
``target_speedup`` can meet any speedup.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone

import numpy as np
import torch

import _measure
import fxprune
from fxprune.demo import DigitsCNN, accuracy, load_digits_split, train

BATCH = 64


def schedule(steps: int) -> dict:
    return {"pruning_type": "snip_momentum", "start_step": min(10, steps // 4), "end_step": steps // 2,
            "update_frequency_on_step": max(1, steps // 15), "sparsity_decay_type": "cos"}


def onnx_of(module, example, tmp: str, name: str) -> str:
    return fxprune.export_onnx(module, os.path.join(tmp, f"{name}.onnx"), example).path


def input_name(path: str) -> str:
    import onnxruntime

    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].name


def speedups(files: dict[str, str], example, repeat: int) -> dict[str, float]:
    """Speedup over the dense file from the 10th percentiles of interleaved runs, the statistic the latency
    target's check measures with (a median moved by up to 10% between two runs of the same files here)."""
    res = fxprune.benchmark(files, threads=(1,), repeat=repeat, warmup=5, baseline="dense",
                            inputs={input_name(files["dense"]): example[0].numpy()})
    p10 = {r.label: r.p10_ms for r in res.rows}
    return {label: p10["dense"] / ms for label, ms in p10.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uniform-sparsity", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp, cache = tempfile.mkdtemp(), tempfile.mkdtemp(prefix="fxprune-tables-")
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        xtr, ytr, xte, yte = load_digits_split(seed)
        dense = DigitsCNN()
        train(dense, xtr, ytr, args.steps, seed=seed, desc="dense")
        example = (xte[:BATCH],)
        uniform = fxprune.compile(dense, example, {"target_sparsity": args.uniform_sparsity, "prune_domain": "local",
                                                   **schedule(args.steps)})
        train(uniform.model, xtr, ytr, args.steps, lr=0.02, seed=seed + 1, pruning=uniform, desc="uniform")
        files = {"dense": onnx_of(uniform.captured.graph_module, example, tmp, "dense"),
                 "uniform": onnx_of(uniform.compact(), example, tmp, "uniform")}
        want = speedups(files, example, args.repeat)["uniform"]
        aware = fxprune.compile(dense, example, {"target_speedup": round(want, 2), "latency_cache": cache,
                                                 **schedule(args.steps)})
        train(aware.model, xtr, ytr, args.steps, lr=0.02, seed=seed + 1, pruning=aware, desc="latency-aware")
        files["latency-aware"] = onnx_of(aware.compact(), example, tmp, "aware")
        sp = speedups(files, example, args.repeat)
        s = uniform.sparsity
        rows.append((seed, accuracy(dense, xte, yte), accuracy(aware.model, xte, yte), sp["latency-aware"],
                     aware.sparsity, aware.report().macs_ratio, accuracy(uniform.model, xte, yte), sp["uniform"], s,
                     uniform.report().macs_ratio, round(want, 2)))
        print(rows[-1], flush=True)
    lines = [f"# Latency-aware vs uniform allocation at equal measured latency, digits "
             f"({datetime.now(timezone.utc):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs)", "",
             f"Command: `python benchmarks/bench_latency_digits.py {' '.join(sys.argv[1:])}`", "",
             f"uniform: local scope at sparsity {args.uniform_sparsity:g}; latency-aware: target_speedup = the uniform "
             f"model's measured speedup; onnxruntime 1 thread, batch {BATCH}; {args.steps} dense steps, "
             f"{args.steps} fine-tune steps (snip_momentum, iterative); the last two speedups measured interleaved "
             "per seed (10th percentiles of interleaved runs).", "",
             "| seed | dense acc | latency-aware acc | its speedup | its channel sparsity | its ideal | "
             "uniform acc | its speedup | its sparsity | its ideal | target asked |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.2%} | {r[2]:.2%} | {r[3]:.2f}x | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2%} | "
                     f"{r[7]:.2f}x | {r[8]:.2f} | {r[9]:.2f} | {r[10]:.2f}x |")
    m = np.array([r[1:] for r in rows], dtype=float).mean(0)
    lines.append(f"| mean | {m[0]:.2%} | {m[1]:.2%} | {m[2]:.2f}x | {m[3]:.2f} | {m[4]:.2f} | {m[5]:.2%} | "
                 f"{m[6]:.2f}x | {m[7]:.2f} | {m[8]:.2f} | {m[9]:.2f}x |")
    text = "\n".join(lines) + "\n"
    _measure.emit(text, args.out)


if __name__ == "__main__":
    main()
