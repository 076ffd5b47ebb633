#!/usr/bin/env python
"""Accuracy after structured channel pruning: DigitsCNN on scikit-learn's digits, over several seeds.

For each seed (``load_digits_split(seed)``: stratified 80/20 split, 1,437 train / 360 test images):

1. Train the dense ``DigitsCNN`` for ``--dense-steps`` steps (lr ``--dense-lr``, ``fxprune.demo.train``)
   and record its test accuracy ("dense").
2. Baseline "dense +F": a copy of that dense model trained ``--finetune-steps`` more steps with the
   fine-tuning lr and seed, no pruning, so every pruned model has a dense model with the same
   total number of steps to be compared against.
3. For every sparsity in ``--sparsities`` and every method, a fresh ``fxprune.compile`` of the dense
   model (example inputs = the whole 360-image test set, so the compact graph runs on it as is),
   then ``--finetune-steps`` steps of fine-tuning with the pruning hooks attached (``pruning.attach``):

   - ``magnitude one-shot``: ``p.prune()`` to the target before fine-tuning (config start_step =
     end_step = 0, so the hook at step 0 re-selects the same channels); masks are held while fine-tuning;
   - ``snip_momentum iterative`` / ``taylor iterative``: start_step 0, end_step F//2,
     update_frequency_on_step F//10, cos decay, pruning while fine-tuning;
   - ``snip_momentum iterative (global)``: the same with prune_domain "global" (``--global-sparsities``).

   All use prune_domain "local" unless stated, round_to ``--round-to``, the same fine-tuning lr and
   seed. Recorded: test accuracy of the masked model, test accuracy of ``p.compact()`` (asserted equal
   to the masked one), channel sparsity reached (``p.sparsity``), ``p.report()``'s MACs and params
   ratios (dense / compact).

Usage::

    python benchmarks/bench_digits.py --seeds 0 1 2 --out benchmarks/results_digits.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxprune  # noqa: E402
from fxprune.demo import DigitsCNN, accuracy, load_digits_split, train  # noqa: E402

TARGET_SPARSITY = 0.5
TARGET_POINTS = 1.0  # the project's target: at 50% channels, within 1 point of dense


def method_configs(sparsity: float, ft_steps: int, round_to: int, global_sparsities) -> list[tuple[str, dict]]:
    common = {"pattern": "channelx1", "target_sparsity": sparsity, "round_to": round_to}
    iterative = {"start_step": 0, "end_step": ft_steps // 2, "update_frequency_on_step": max(1, ft_steps // 10),
                 "sparsity_decay_type": "cos"}
    out = [
        ("magnitude one-shot", {**common, "pruning_type": "magnitude", "start_step": 0, "end_step": 0,
                                "prune_domain": "local"}),
        ("snip_momentum iterative", {**common, **iterative, "pruning_type": "snip_momentum", "prune_domain": "local"}),
        ("taylor iterative", {**common, **iterative, "pruning_type": "taylor", "prune_domain": "local"}),
    ]
    if any(abs(sparsity - g) < 1e-9 for g in global_sparsities):
        out.append(("snip_momentum iterative (global)",
                    {**common, **iterative, "pruning_type": "snip_momentum", "prune_domain": "global"}))
    return out


def run_seed(seed: int, args) -> list[dict]:
    rows = []
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    dense = DigitsCNN()
    t0 = time.perf_counter()
    train(dense, xtr, ytr, args.dense_steps, lr=args.dense_lr, batch=args.batch, seed=seed, desc="dense")
    dense_acc = accuracy(dense, xte, yte)
    rows.append({"seed": seed, "method": "dense", "sparsity": 0.0, "acc": dense_acc, "compact_acc": None,
                 "reached": 0.0, "macs_ratio": 1.0, "params_ratio": 1.0, "seconds": time.perf_counter() - t0})
    print(f"[seed {seed}] dense ({args.dense_steps} steps): {dense_acc:.2%}", flush=True)

    t0 = time.perf_counter()
    longer = copy.deepcopy(dense)
    train(longer, xtr, ytr, args.finetune_steps, lr=args.finetune_lr, batch=args.batch, seed=seed + 1,
          desc="dense +F")
    acc = accuracy(longer, xte, yte)
    rows.append({"seed": seed, "method": "dense +F", "sparsity": 0.0, "acc": acc, "compact_acc": None,
                 "reached": 0.0, "macs_ratio": 1.0, "params_ratio": 1.0, "seconds": time.perf_counter() - t0})
    print(f"[seed {seed}] dense +{args.finetune_steps} steps: {acc:.2%}", flush=True)

    for sparsity in args.sparsities:
        for name, config in method_configs(sparsity, args.finetune_steps, args.round_to, args.global_sparsities):
            t0 = time.perf_counter()
            p = fxprune.compile(dense, (xte,), config)  # copies the dense model
            if name.startswith("magnitude"):
                p.prune()
                before = p.sparsity
            train(p.model, xtr, ytr, args.finetune_steps, lr=args.finetune_lr, batch=args.batch, seed=seed + 1,
                  pruning=p, desc=f"{name} {sparsity}")
            if name.startswith("magnitude"):
                assert abs(p.sparsity - before) < 1e-12, "one-shot masks changed during fine-tuning"
            acc = accuracy(p.model, xte, yte)
            small = p.compact()
            with torch.no_grad():
                compact_acc = float((small(xte).argmax(1) == yte).float().mean())
            assert compact_acc == acc, f"{name} @ {sparsity}: compact {compact_acc} != masked {acc}"
            rep = p.report()
            rows.append({"seed": seed, "method": name, "sparsity": sparsity, "acc": acc, "compact_acc": compact_acc,
                         "reached": p.sparsity, "macs_ratio": rep.macs_ratio, "params_ratio": rep.params_ratio,
                         "compact_error": p.compact_error, "seconds": time.perf_counter() - t0})
            print(f"[seed {seed}] {name:<34} target {sparsity:.2f} reached {p.sparsity:.3f}  acc {acc:.2%} "
                  f"(compact {compact_acc:.2%}, max abs err {p.compact_error:.1e})  MACs {rep.macs_ratio:.2f}x fewer  "
                  f"params {rep.params_ratio:.2f}x  [{time.perf_counter() - t0:.1f} s]", flush=True)
    return rows


def _ms(values, scale=100.0) -> str:
    a = np.asarray(values, dtype=float) * scale
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.2f} ± {sd:.2f}"


def summarise(rows: list[dict], seeds) -> tuple[list[dict], str]:
    by_seed = {(r["seed"], r["method"], r["sparsity"]): r for r in rows}
    keys = []
    for r in rows:
        k = (r["method"], r["sparsity"])
        if k not in keys:
            keys.append(k)
    summary = []
    lines = ["| method | target sparsity | channel sparsity reached | accuracy % (mean ± std) | Δ vs dense (points) "
             "| Δ vs dense +F (points) | MACs ratio (dense/compact) | params ratio | compact acc == masked |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method, sparsity in keys:
        sel = [by_seed[(s, method, sparsity)] for s in seeds]
        acc = [r["acc"] for r in sel]
        d_dense = [r["acc"] - by_seed[(r["seed"], "dense", 0.0)]["acc"] for r in sel]
        d_long = [r["acc"] - by_seed[(r["seed"], "dense +F", 0.0)]["acc"] for r in sel]
        same = all(r["compact_acc"] == r["acc"] for r in sel) if sel[0]["compact_acc"] is not None else None
        summary.append({"method": method, "sparsity": sparsity, "mean_acc": float(np.mean(acc)),
                        "mean_delta_dense": float(np.mean(d_dense)) * 100, "mean_delta_long": float(np.mean(d_long)) * 100})
        pruned = method not in ("dense", "dense +F")
        target = f"{sparsity:.2f}" if pruned else "-"
        reached = f"{np.mean([r['reached'] for r in sel]):.3f}" if pruned else "-"
        lines.append(
            f"| {method} | {target} | {reached} | {_ms(acc)} | "
            f"{_ms(d_dense) if method != 'dense' else '-'} | {_ms(d_long) if pruned else '-'} | "
            f"{np.mean([r['macs_ratio'] for r in sel]):.2f} | {np.mean([r['params_ratio'] for r in sel]):.2f} | "
            f"{'yes' if same else ('-' if same is None else 'NO')} |")
    return summary, "\n".join(lines)


def per_seed_table(rows: list[dict]) -> str:
    lines = ["| seed | method | target | reached | masked acc % | compact acc % | compact max abs err | MACs ratio | s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ca = "-" if r["compact_acc"] is None else f"{100 * r['compact_acc']:.2f}"
        err = f"{r['compact_error']:.1e}" if "compact_error" in r else "-"
        lines.append(f"| {r['seed']} | {r['method']} | {r['sparsity']:.2f} | {r['reached']:.3f} | {100 * r['acc']:.2f} "
                     f"| {ca} | {err} | {r['macs_ratio']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _processor() -> str:
    """platform.processor(), or /proc/cpuinfo's model name where that is empty (Linux)."""
    name = platform.processor()
    if name and name not in ("x86_64", "aarch64"):
        return name
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} (from /proc/cpuinfo; platform.processor() = {name!r})"
    except OSError:
        pass
    return name or "?"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dense-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--dense-lr", type=float, default=0.05)
    ap.add_argument("--finetune-lr", type=float, default=0.02)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--global-sparsities", type=float, nargs="*", default=[0.75],
                    help="sparsities at which the snip_momentum global variant also runs")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--out", default=None, help="markdown file to write")
    args = ap.parse_args(argv)

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    start = time.perf_counter()
    rows = []
    for seed in args.seeds:
        rows += run_seed(seed, args)
    total = time.perf_counter() - start

    summary, table = summarise(rows, args.seeds)
    ft = args.finetune_steps
    target_lines = []
    for s in summary:
        if abs(s["sparsity"] - TARGET_SPARSITY) < 1e-9:
            ok = s["mean_delta_dense"] >= -TARGET_POINTS
            verdict = "meets" if ok else f"MISSES by {-TARGET_POINTS - s['mean_delta_dense']:.2f} points"
            target_lines.append(
                f"- {s['method']} @ {TARGET_SPARSITY:.0%}: mean Δ vs dense {s['mean_delta_dense']:+.2f} points "
                f"({verdict}); "
                f"vs dense +F {s['mean_delta_long']:+.2f} points")
    dense_line = next(s for s in summary if s["method"] == "dense")
    machine = (f"processor = {_processor()}, os.cpu_count() = {os.cpu_count()}, "
               f"torch threads = {torch.get_num_threads()}, platform = {platform.platform()}, "
               f"python = {platform.python_version()}, torch = {torch.__version__}, fxprune = {fxprune.__version__}")
    md = f"""## Digits accuracy benchmark: DigitsCNN, channel pruning with fine-tuning

```
{command}
```

- date (UTC): {datetime.now(timezone.utc):%Y-%m-%d %H:%M}
- machine: {machine}
- data: scikit-learn digits, `load_digits_split(seed)` (stratified 80/20: 1,437 train / 360 test), seeds {args.seeds} (the seed sets the split, the init and the batch order)
- dense: `DigitsCNN()` (width 64), {args.dense_steps} steps, SGD momentum 0.9, wd 1e-4, lr {args.dense_lr}, cosine, batch {args.batch}
- fine-tuning: {ft} steps, lr {args.finetune_lr}, cosine, batch {args.batch}, batch-order seed = seed + 1, identical for every method and for "dense +F" (the dense model trained {ft} more steps without pruning, so totals match)
- magnitude one-shot: `p.prune()` before fine-tuning (L2 group magnitude; config start_step = end_step = 0), masks held during fine-tuning
- iterative (snip_momentum, taylor): start_step 0, end_step {ft // 2}, update_frequency_on_step {max(1, ft // 10)}, sparsity_decay_type cos ({(ft // 2) // max(1, ft // 10) + 1} pruning steps)
- all: pattern channelx1, round_to {args.round_to}, prune_domain local unless "(global)"; `fxprune.compile(dense, (x_test,), config)` so the compact graph runs on the 360 test images as is
- accuracy = masked model on the test set; the compact model (`p.compact()`) is evaluated on the same 360 images and asserted to give the identical accuracy
- Δ columns: per-seed paired difference in accuracy points, mean ± std (std with ddof=1) over seeds
- MACs ratio = dense MACs / compact MACs from `p.report()` (conv/linear MACs of the captured graph)
- total wall time: {total / 60:.1f} min

Dense accuracy (after {args.dense_steps} steps): {100 * dense_line['mean_acc']:.2f} % mean over seeds.

### Summary

{table}

### Target: at {TARGET_SPARSITY:.0%} of channels, accuracy within {TARGET_POINTS:g} point of dense

{chr(10).join(target_lines)}

### Per seed

{per_seed_table(rows)}
"""
    print()
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
