#!/usr/bin/env python
"""The hidden size or not, when the model is fine-tuned: perplexity at equal MACs on a byte-level Llama.

fxprune leaves the hidden size out of the default budget because, pruned one shot with the default
magnitude pruner and no fine-tuning, it costs more perplexity than heads and FFN channels at equal
MACs (README, "Pruning the hidden size"; ``bench_retrain_free_lm.py``). fxprune's default use is
pruning while fine-tuning, so this measures that case on the same checkpoints:

- Model, corpus and evaluation: those of ``bench_retrain_free_lm.py`` (its arguments; the dense
  checkpoint is trained once and cached).
- Columns, at about equal MACs (local scope, ``magnitude``, no compensation, as the README's comparison):
  heads + FFN channels at ``--ratio`` (35%), against heads + FFN and the hidden size at ``--hidden-ratio``
  (20%; a second pruner with ``prune_hidden_size: True``).
- Schedules: ``oneshot`` prunes at step 0 and fine-tunes ``--finetune-steps``; ``gradual`` prunes from
  step 0 to half of them every eighth (``sparsity_decay_type`` exp, the default), then fine-tunes on.
  Both through ``pruning.attach(optimizer)``; the dense model fine-tuned the same way is the reference.
- Fine-tuning: AdamW as the dense training (weight decay 0.1 on matrices, betas 0.9/0.95, clip 1.0),
  ``--finetune-lr`` with 20 warm-up steps and a cosine to a tenth; each seed draws its own batches.
- Every pruned model is compacted and its perplexity measured again (compact == masked).

Usage::

    python benchmarks/bench_hidden_finetune_lm.py --train-steps 376 --seeds 0 1 --out benchmarks/results_hidden_finetune_lm.md
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _measure  # noqa: E402
import bench_retrain_free_lm as lm  # noqa: E402

import fxprune  # noqa: E402
from fxprune.passes.macs import count_macs  # noqa: E402

SCHEDULES = ("oneshot", "gradual")


def parser():
    ap = lm.parser()
    ap.description = __doc__.split("\n")[0]
    ap.set_defaults(ratios=[0.35])
    ap.add_argument("--ratio", type=float, default=0.35, help="heads + FFN column")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tune batch draws")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    return ap


def config(ratio: float, hidden: bool, schedule: str, steps: int) -> dict:
    base = {"pruning_type": "magnitude", "prune_domain": "local", "round_to": 1}
    if schedule == "gradual":
        base.update(start_step=0, end_step=steps // 2, update_frequency_on_step=max(1, steps // 16))
    if not hidden:
        return {**base, "target_sparsity": ratio}
    return {**base, "pruners": [{"target_sparsity": ratio}, {"target_sparsity": ratio, "prune_hidden_size": True}]}


def finetune(model, train: torch.Tensor, args, seed: int, pruning=None) -> float:
    """Fine-tune in place for ``args.finetune_steps`` steps; the seconds it took."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.finetune_lr, betas=(0.9, 0.95))
    if pruning is not None:
        opt = pruning.attach(opt)
    t0 = time.perf_counter()
    for step in range(args.finetune_steps):
        warm = min(1.0, (step + 1) / 20)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.finetune_steps))
        for group in opt.param_groups:
            group["lr"] = args.finetune_lr * warm * cosine
        x = lm.random_windows(train, args.batch, args.seq_len, gen)
        loss = lm.next_byte_nll(model, x) / (x.shape[0] * (x.shape[1] - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


def run(dense, example, train, val, args, hidden: bool, schedule: str, seed: int) -> dict:
    ratio = args.hidden_ratio if hidden else args.ratio
    cfg = config(ratio, hidden, schedule, args.finetune_steps)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if schedule == "oneshot":  # the perplexity right after pruning, before any fine-tuning
            p0 = fxprune.compile(dense, example, cfg)
            out["ppl_pruned"] = lm.perplexity(p0.prune().model, val, args.eval_batch)
            del p0
        p = fxprune.compile(copy.deepcopy(dense), example, cfg)
        out["seconds"] = finetune(p.model, train, args, seed, pruning=p)
        out["ppl"] = lm.perplexity(p.model, val, args.eval_batch)
        out["sparsity"] = p.sparsity
        small = p.compact()
    out["ppl_compact"] = lm.perplexity(small, val, args.eval_batch)
    out["macs"] = count_macs(small, example)
    out["params"] = lm.n_params(small)
    out.update(lm.group_widths(p, dense.config))
    return out


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    command = _measure.command_line(sys.argv[0])
    began = time.perf_counter()
    train, val, corpus = lm.load_corpus(args.heldout)
    dense, record = lm.train_or_load(args, train, corpus)
    val_windows = lm.even_windows(val, args.eval_windows, args.seq_len)
    example = (val_windows[:1],)
    dense_ppl = lm.perplexity(dense, val_windows, args.eval_batch)
    dense_macs = count_macs(torch.export.export(dense, example, strict=False).module(), example)
    print(f"dense: {lm.n_params(dense) / 1e6:.2f} M params, perplexity {dense_ppl:.3f}", flush=True)

    results = {"dense": []}
    for seed in args.seeds:
        model = copy.deepcopy(dense).train()
        secs = finetune(model, train, args, seed)
        results["dense"].append({"ppl": lm.perplexity(model.eval(), val_windows, args.eval_batch), "seconds": secs})
        print(f"dense fine-tuned, seed {seed}: {results['dense'][-1]['ppl']:.3f}", flush=True)
    columns = {f"heads + FFN {args.ratio:.0%}": False, f"heads + FFN + hidden {args.hidden_ratio:.0%}": True}
    for schedule in args.schedules:
        for label, hidden in columns.items():
            key = f"{schedule} | {label}"
            results[key] = []
            for seed in args.seeds:
                r = run(dense, example, train, val_windows, args, hidden, schedule, seed)
                results[key].append(r)
                print(f"{key}, seed {seed}: {r}", flush=True)

    def mean(rows, k):
        vals = [r[k] for r in rows if r.get(k) is not None]
        return (np.mean(vals), min(vals), max(vals)) if vals else None

    def cell(rows, k):
        m = mean(rows, k)
        if m is None:
            return "–"
        return f"{m[0]:.3f}" if m[1] == m[2] else f"{m[0]:.3f} ({m[1]:.3f}–{m[2]:.3f})"

    lines = [f"# The hidden size after fine-tuning ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"Command: `{command}`", "", "Machine: " + ", ".join(f"{k} = {v}" for k, v in _measure.machine().items()), "",
             f"Dense: {lm.n_params(dense) / 1e6:.2f} M parameters, {dense_macs / 1e6:.1f} M MACs per window "
             f"of {args.seq_len}, validation perplexity {dense_ppl:.3f} ({record['steps']} training steps). "
             f"Fine-tuning: {args.finetune_steps} steps of {args.batch} x {args.seq_len} bytes, lr "
             f"{args.finetune_lr:g}; seeds {args.seeds} (mean, and range over seeds).", "",
             "| schedule | pruned | MACs | params M | hidden / heads / FFN kept (layer 0) | perplexity before "
             "fine-tuning | after | compact after |", "|---|---|---:|---:|---|---:|---:|---:|",
             f"| – | dense, fine-tuned the same | {dense_macs / 1e6:.1f} M | {lm.n_params(dense) / 1e6:.2f} | – | "
             f"{dense_ppl:.3f} | {cell(results['dense'], 'ppl')} | – |"]
    for key, rows in results.items():
        if key == "dense":
            continue
        schedule, label = key.split(" | ")
        r = rows[0]
        lines.append(f"| {schedule} | {label} | {r['macs'] / 1e6:.1f} M | {r['params'] / 1e6:.2f} | "
                     f"{r['hidden']} / {r['heads']} / {r['ffn']} | {cell(rows, 'ppl_pruned')} | **{cell(rows, 'ppl')}** | "
                     f"{cell(rows, 'ppl_compact')} |")
    lines += ["", f"Total wall time: {(time.perf_counter() - began) / 60:.1f} min"]
    text = "\n".join(lines) + "\n"
    _measure.emit(text, args.out)


if __name__ == "__main__":
    main()
