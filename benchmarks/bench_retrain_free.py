#!/usr/bin/env python
"""Accuracy after one-shot channel pruning with no fine-tuning: DigitsCNN on scikit-learn's digits.

For each seed (``load_digits_split(seed)``: stratified 80/20 split, 1,437 train / 360 test images):

1. Train the dense ``DigitsCNN`` for ``--dense-steps`` steps (``fxprune.demo.train``, as ``fxprune demo``
   does) and record its test accuracy.
2. Calibration data: ``--calibration-images`` training images drawn with the seed, in batches of
   ``--calibration-batch`` (inputs only, no labels).
3. For every sparsity in ``--sparsities``, every criterion (magnitude, activation, wanda_sp, flap) and
   every compensation (none, bias, least_squares): a fresh ``fxprune.compile`` of the dense model,
   ``pruning.calibrate(batches)`` (skipped for magnitude without compensation, which needs none),
   ``pruning.prune()`` once (then, with ``--batch-norms reestimate``, ``pruning.reestimate_batch_norms``),
   no training. Recorded: test accuracy of the masked model and of
   ``pruning.compact()`` (asserted equal), the channel sparsity reached and the MACs ratio.

Every run uses the same config but for ``pruning_type`` and ``compensation``: pattern channelx1,
``prune_domain`` ``--scope`` (default global), ``round_to`` ``--round-to`` (default 1, so every
criterion removes the same number of channels).

Usage::

    python benchmarks/bench_retrain_free.py --seeds 0 1 2 --out benchmarks/results_retrain_free.md

``--compensation-inputs dense`` fits each layer on ``calibrate()``'s statistics instead of the
inputs the pruned layers before it give it (``results_retrain_free_dense_inputs.md``).
``--batch-norms reestimate`` measures the BatchNorm statistics again on the calibration images after
``prune()`` (``results_retrain_free_bn.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import _measure  # noqa: E402

import fxprune  # noqa: E402
from fxprune.demo import DigitsCNN, accuracy, load_digits_split, train  # noqa: E402

CRITERIA = ("magnitude", "activation", "wanda_sp", "flap")
COMPENSATIONS = ("none", "bias", "least_squares")


def run_seed(seed: int, args) -> tuple[float, list[dict]]:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    dense = DigitsCNN()
    train(dense, xtr, ytr, args.dense_steps, seed=seed, desc="dense")
    dense_acc = accuracy(dense, xte, yte)
    with torch.no_grad():
        logits = dense(xte)
    print(f"[seed {seed}] dense ({args.dense_steps} steps): {dense_acc:.2%}", flush=True)
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:args.calibration_images]
    batches = list(xtr[pick].split(args.calibration_batch))
    rows = []
    for sparsity in args.sparsities:
        for criterion in CRITERIA:
            for compensation in COMPENSATIONS:
                t0 = time.perf_counter()
                p = fxprune.compile(dense, (xte,), {"pruning_type": criterion, "target_sparsity": sparsity,
                                                    "prune_domain": args.scope, "round_to": args.round_to,
                                                    "compensation": compensation,
                                                    "compensation_inputs": args.compensation_inputs})
                if criterion != "magnitude" or compensation != "none":
                    p.calibrate(batches, progress=False)
                p.prune()
                if args.batch_norms == "reestimate":
                    p.reestimate_batch_norms(batches, progress=False)
                acc = accuracy(p.model, xte, yte)
                with torch.no_grad():
                    mse = float((p.model(xte) - logits).square().mean())
                small = p.compact()
                with torch.no_grad():
                    compact_acc = float((small(xte).argmax(1) == yte).float().mean())
                assert compact_acc == acc, f"{criterion}/{compensation} @ {sparsity}: compact {compact_acc} != {acc}"
                macs = p.report().macs_ratio
                rows.append({"seed": seed, "criterion": criterion, "compensation": compensation, "sparsity": sparsity,
                             "acc": acc, "delta": acc - dense_acc, "mse": mse, "reached": p.sparsity, "macs_ratio": macs,
                             "compact_error": p.compact_error, "seconds": time.perf_counter() - t0})
                print(f"[seed {seed}] {sparsity:.2f} {criterion:<10} {compensation:<13} acc {acc:.2%} "
                      f"(dense {dense_acc:.2%}) logit MSE {mse:.3g} reached {p.sparsity:.3f} MACs {macs:.2f}x "
                      f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    return dense_acc, rows


def _ms(values, scale=100.0) -> str:
    a = np.asarray(values, dtype=float) * scale
    return f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.2f}"


def summary_table(rows: list[dict], sparsities) -> str:
    head = "| criterion | compensation | " + " | ".join(
        f"{s:.0%} channels: accuracy % | Δ vs dense (points) | logit MSE vs dense" for s in sparsities) + " |"
    lines = [head, "|---|---|" + "---:|---:|---:|" * len(sparsities)]
    for criterion in CRITERIA:
        for compensation in COMPENSATIONS:
            cells = []
            for s in sparsities:
                sel = [r for r in rows if (r["criterion"], r["compensation"], r["sparsity"]) == (criterion, compensation, s)]
                cells += [_ms([r["acc"] for r in sel]), _ms([r["delta"] for r in sel]),
                          f"{np.mean([r['mse'] for r in sel]):.3g}"]
            lines.append(f"| {criterion} | {compensation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(rows: list[dict]) -> str:
    lines = ["| seed | sparsity | criterion | compensation | reached | accuracy % | logit MSE | MACs ratio "
             "| compact max abs err | s |", "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['sparsity']:.2f} | {r['criterion']} | {r['compensation']} | "
                     f"{r['reached']:.3f} | {100 * r['acc']:.2f} | {r['mse']:.3g} | {r['macs_ratio']:.2f} | {r['compact_error']:.1e} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dense-steps", type=int, default=300)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--calibration-images", type=int, default=512)
    ap.add_argument("--calibration-batch", type=int, default=128)
    ap.add_argument("--scope", choices=("global", "local"), default="global")
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--compensation-inputs", choices=("pruned", "dense"), default="pruned",
                    help="each layer re-fitted on the inputs pruning leaves it (default) or on the dense statistics")
    ap.add_argument("--batch-norms", choices=("keep", "reestimate"), default="keep",
                    help="after prune(), keep the dense model's BatchNorm statistics or measure them again on the "
                         "calibration images (pruning.reestimate_batch_norms)")
    ap.add_argument("--out", default=None, help="markdown file to write")
    args = ap.parse_args(argv)

    command = _measure.command_line(sys.argv[0])
    start = time.perf_counter()
    dense, rows = [], []
    for seed in args.seeds:
        acc, seed_rows = run_seed(seed, args)
        dense.append(acc)
        rows += seed_rows
    total = time.perf_counter() - start
    info = _measure.machine()
    info["torch threads"] = torch.get_num_threads()
    details = [
        f"- data: scikit-learn digits, `load_digits_split(seed)` (1,437 train / 360 test), seeds {args.seeds} "
        "(the seed sets the split, the init, the batch order and the calibration images)",
        f"- dense: `DigitsCNN()` (width 64), {args.dense_steps} steps of `fxprune.demo.train` (SGD momentum 0.9, "
        f"lr 0.05, cosine, batch 64); test accuracy {_ms(dense)} %",
        f"- calibration: {args.calibration_images} training images in batches of {args.calibration_batch}, "
        "`pruning.calibrate(batches)`; no labels, no fine-tuning",
        f"- pruning: `pruning.prune()` once; pattern channelx1, prune_domain {args.scope}, round_to {args.round_to}; "
        "compensation per row (`least_squares`: ridge damping 0.01 x mean diag of the kept Gram), "
        f"compensation_inputs {args.compensation_inputs}; BatchNorm statistics after pruning: "
        + ("re-estimated on the calibration images (`pruning.reestimate_batch_norms(batches)`)"
           if args.batch_norms == "reestimate" else "the dense model's"),
        "- accuracy: masked model on the 360 test images; `pruning.compact()` gives the identical accuracy "
        "(asserted); Δ: paired per-seed difference to the dense model, mean ± std (ddof=1) over seeds; logit MSE: "
        "mean squared difference of the 10 logits to the dense model's on the test images, mean over seeds",
    ]
    sections = ["### Per seed\n\n" + per_seed_table(rows)]
    _measure.write_report(args.out, "## Retrain-free pruning: DigitsCNN, one shot, no fine-tuning", command, info,
                          details, total, summary_table(rows, args.sparsities), sections)


if __name__ == "__main__":
    main()
