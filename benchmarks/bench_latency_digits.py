"""Accuracy at equal measured latency: latency-aware allocation vs uniform widths, on digits.

    python benchmarks/bench_latency_digits.py --out benchmarks/results_latency_digits.md

Per seed, the demo's DigitsCNN is trained dense (300 steps), then pruned during the same
300-step fine-tune (snip_momentum, iterative, cos decay, as ``fxprune demo``) twice:

- **latency-aware**: ``{"target_speedup": T}`` at batch 64, 1 thread;
- **uniform**: ``prune_domain: local`` (every group loses the same fraction, aligned as the
  default does) at the sparsity whose compact model measures the latency-aware model's latency
  (found by bisection on one-shot prunes of the dense model: a compact model's latency depends
  on its widths, not its weights).

Both compact models are then timed interleaved against the dense one (onnxruntime, 1 thread,
batch 64) and their test accuracy reported. Uniform widths move in aligned steps (16 channels
of 64-256), so the uniform model matches the latency only to the nearest step at or above it:
compare the two speedups as well as the accuracies.
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
    res = fxprune.benchmark(files, threads=(1,), repeat=repeat, warmup=5, baseline="dense",
                            inputs={input_name(files["dense"]): example[0].numpy()})
    return {r.label: r.speedup for r in res.rows}


def uniform_sparsity(model, example, want: float, tmp: str, repeat: int) -> float:
    """Local-scope sparsity whose one-shot compact model measures ``want`` x faster than the dense one."""
    lo, hi = 0.0, 0.9
    for i in range(7):
        mid = (lo + hi) / 2
        p = fxprune.compile(model, example, {"target_sparsity": mid, "prune_domain": "local"})
        got = speedups({"dense": onnx_of(p.captured.graph_module, example, tmp, "d"),
                        "u": onnx_of(p.prune().compact(), example, tmp, f"u{i}")}, example, repeat)["u"]
        lo, hi = (mid, hi) if got < want else (lo, mid)
    return (lo + hi) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=2.5)
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
        aware = fxprune.compile(dense, example, {"target_speedup": args.target, "latency_cache": cache,
                                                 **schedule(args.steps)})
        train(aware.model, xtr, ytr, args.steps, lr=0.02, seed=seed + 1, pruning=aware, desc="latency-aware")
        aware_small = aware.compact()
        files = {"dense": onnx_of(aware.captured.graph_module, example, tmp, "dense"),
                 "latency-aware": onnx_of(aware_small, example, tmp, "aware")}
        want = speedups(files, example, args.repeat)["latency-aware"]
        s = uniform_sparsity(dense, example, want, tmp, args.repeat)
        uniform = fxprune.compile(dense, example, {"target_sparsity": s, "prune_domain": "local",
                                                   **schedule(args.steps)})
        train(uniform.model, xtr, ytr, args.steps, lr=0.02, seed=seed + 1, pruning=uniform, desc="uniform")
        files["uniform"] = onnx_of(uniform.compact(), example, tmp, "uniform")
        sp = speedups(files, example, args.repeat)
        rows.append((seed, accuracy(dense, xte, yte), accuracy(aware.model, xte, yte), sp["latency-aware"],
                     aware.sparsity, aware.report().macs_ratio, accuracy(uniform.model, xte, yte), sp["uniform"], s,
                     uniform.report().macs_ratio))
        print(rows[-1], flush=True)
    lines = [f"# Latency-aware vs uniform allocation at equal measured latency, digits "
             f"({datetime.now(timezone.utc):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs)", "",
             f"Command: `python benchmarks/bench_latency_digits.py {' '.join(sys.argv[1:])}`", "",
             f"target_speedup {args.target:g}, onnxruntime 1 thread, batch {BATCH}; {args.steps} dense steps, "
             f"{args.steps} fine-tune steps (snip_momentum, iterative); speedups measured interleaved per seed.", "",
             "| seed | dense acc | latency-aware acc | its speedup | its channel sparsity | its ideal | "
             "uniform acc | its speedup | its sparsity | its ideal |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.2%} | {r[2]:.2%} | {r[3]:.2f}x | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2%} | "
                     f"{r[7]:.2f}x | {r[8]:.2f} | {r[9]:.2f} |")
    m = np.array([r[1:] for r in rows], dtype=float).mean(0)
    lines.append(f"| mean | {m[0]:.2%} | {m[1]:.2%} | {m[2]:.2f}x | {m[3]:.2f} | {m[4]:.2f} | {m[5]:.2%} | "
                 f"{m[6]:.2f}x | {m[7]:.2f} | {m[8]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
