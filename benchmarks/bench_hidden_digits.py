#!/usr/bin/env python
"""Why norm layers compute over kept channels: accuracy of the deployed model, with and without.

A pre-norm residual MLP (LayerNorm, width 128) on scikit-learn's digits (64 pixels as features)
is trained dense, then half its hidden size is pruned while fine-tuning (snip_momentum,
iterative) and the pruned channels are removed. Two ways, same seeds and steps:

* ``kept-channel norms`` (fxprune): while pruning, the norm layers whose statistics span pruned
  channels compute them over the kept channels only, which is what the compact model computes.
* ``zeros in norm stats``: the pruned channels are only zeroed, so LayerNorm still averages over
  them while fine-tuning; removing them afterwards (what slicing the weights gives) changes every
  norm's statistics. The script gets this by switching fxprune's norm layers back after each
  pruning step, and compacts with the check turned off.

For each: test accuracy of the masked model that was fine-tuned, of the compact model that would
be deployed, and the largest logit difference between them.

Usage::

    python benchmarks/bench_hidden_digits.py --seeds 0 1 2 --out benchmarks/results_hidden_digits.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure  # noqa: E402

import fxprune  # noqa: E402
from fxprune.demo import accuracy, load_digits_split, train  # noqa: E402
from fxprune.norms import unpatch_norms  # noqa: E402


class PreNormMLP(nn.Module):
    """64 pixels -> width 128 residual stream, two pre-LayerNorm MLP blocks, final LayerNorm, 10 classes."""

    def __init__(self, width: int = 128, blocks: int = 2):
        super().__init__()
        self.proj = nn.Linear(64, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(blocks)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                   for _ in range(blocks)])
        self.final = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.proj(torch.flatten(x, 1))
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        return self.head(self.final(h))


def run(seed: int, method: str, args) -> dict:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    model = PreNormMLP()
    train(model, xtr, ytr, args.dense_steps, seed=seed, desc="dense")
    dense = accuracy(model, xte, yte)
    config = {"pruning_type": "snip_momentum", "target_sparsity": args.sparsity, "prune_hidden_size": True,
              "names": ["proj"],  # the pruner that owns the hidden-size group (it spans proj)
              "start_step": 10, "end_step": args.finetune_steps // 2,
              "update_frequency_on_step": max(1, args.finetune_steps // 15), "sparsity_decay_type": "cos"}
    pruning = fxprune.compile(model, (xte,), config)  # captured at the test batch, which the compact graph then takes
    if method == "zeros in norm stats":
        build = pruning._build_masks

        def build_without_switch():
            build()
            unpatch_norms(pruning.model)

        pruning._build_masks = build_without_switch
    train(pruning.model, xtr, ytr, args.finetune_steps, lr=0.02, seed=seed + 1, pruning=pruning, desc=method)
    masked = accuracy(pruning.model, xte, yte)
    small = pruning.compact(check=False)
    with torch.no_grad():
        diff = float((pruning.model(xte) - small(xte)).abs().max())
    hidden = next(g for g in pruning.groups if g.normalized)
    return {"seed": seed, "method": method, "dense": dense, "masked": masked, "compact": accuracy(small, xte, yte),
            "max_logit_diff": diff, "hidden": f"{hidden.size} → {len(pruning.kept_channels[hidden.index])}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dense-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    methods = ("kept-channel norms", "zeros in norm stats")
    start = time.perf_counter()
    rows = [run(seed, m, args) for seed in args.seeds for m in methods]
    lines = ["| seed | method | hidden width | dense acc % | masked (fine-tuned) acc % | compact (deployed) acc % "
             "| max abs logit diff, masked vs compact |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['method']} | {r['hidden']} | {100 * r['dense']:.2f} | "
                     f"{100 * r['masked']:.2f} | {100 * r['compact']:.2f} | {r['max_logit_diff']:.2e} |")
    summary = ["| method | masked acc % (mean) | compact acc % (mean) | worst max abs logit diff |",
               "|---|---:|---:|---:|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        summary.append(f"| {m} | {100 * np.mean([r['masked'] for r in rs]):.2f} | "
                       f"{100 * np.mean([r['compact'] for r in rs]):.2f} | "
                       f"{max(r['max_logit_diff'] for r in rs):.2e} |")
    info = _measure.machine()
    details = [f"- {args.sparsity:.0%} of the hidden size (width 128, 3 LayerNorms) pruned with snip_momentum from "
               f"step 10 to {args.finetune_steps // 2} of a {args.finetune_steps}-step fine-tune, after "
               f"{args.dense_steps} dense steps; 360 held-out digits; seeds {args.seeds}"]
    _measure.write_report(args.out, "## Hidden-size pruning on digits: norm statistics over kept channels or not",
                          _measure.command_line(__file__), info, details, time.perf_counter() - start, "\n".join(summary),
                          ["\n".join(lines)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
