"""Why ``bias`` compensation raises perplexity on the byte-level Llama with biases.

Each compensated layer (``o_proj``, ``down_proj``) gets its mean output back; the removed channels'
fluctuation stays removed. The final RMSNorm divides the residual stream by its root mean square, so
a restored mean over a smaller total takes a larger share after the norm, and the LM head turns that
share into one logit shift at every position. This script measures it: perplexity, logit error and
the part of it that is one per-vocabulary shift, and the mean's share of the final norm's input, for
``none``, ``bias`` and ``least_squares`` on the cached checkpoint of bench_retrain_free_lm.py.

    python benchmarks/bias_norm_share.py --criterion wanda_sp --ratio 0.5
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_retrain_free_lm as lm  # noqa: E402

import fxprune  # noqa: E402


def final_norm_input(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the input of the final norm (the residual stream after the last block)."""
    seen = {}

    def keep(module, inputs, output) -> None:  # returns None: the norm's output is left as it is
        seen["x"] = inputs[0]

    hook = model.model.norm.register_forward_hook(keep)
    try:
        with torch.no_grad():
            logits = lm.logits_of(model(x)).double()
    finally:
        hook.remove()
    return logits, seen["x"].double()


def describe(name: str, logits, stream, dense_logits, x) -> str:
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    err = logits - dense_logits
    shift = err.mean(dim=(0, 1))  # one per-vocabulary shift, the same at every position
    shifted = F.cross_entropy((logits - shift)[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    mean = stream.mean(dim=(0, 1))
    energy = stream.pow(2).mean()
    total = float(err.pow(2).sum())
    share = f"{float(shift.pow(2).sum()) * err.shape[0] * err.shape[1] / total:.2f}" if total > 0 else "–"
    return (f"| {name} | {float(nll.exp()):.3f} | {float(err.pow(2).mean()):.3f} | {share} | "
            f"{float(shifted.exp()):.3f} | {float(energy.sqrt()):.3f} | {float(mean.pow(2).mean().sqrt()):.3f} | "
            f"{float(mean.pow(2).mean() / energy):.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--criterion", default="wanda_sp")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--train-steps", type=int, default=376)
    ap.add_argument("--calibration-windows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    # the benchmark's default (6.7 M) config with biases in every Linear, and its calibration draw
    args = lm.parser().parse_args(["--bias", "--train-steps", str(a.train_steps),
                                   "--calibration-windows", str(a.calibration_windows)])
    train, val, corpus = lm.load_corpus(args.heldout)
    model, _ = lm.train_or_load(args, train, corpus)
    x = lm.even_windows(val, args.eval_windows, args.seq_len)
    calib = list(lm.random_windows(train, args.calibration_windows, args.seq_len,
                                   torch.Generator().manual_seed(args.seed + 1)).split(args.calibration_batch))
    dense_logits, dense_stream = final_norm_input(model, x)
    print(f"{a.criterion} at {a.ratio:.0%} of heads and FFN channels, local scope, {a.calibration_windows} "
          f"calibration windows; validation: {args.eval_windows} windows of {args.seq_len} bytes\n")
    print("| compensation | perplexity | logit MSE | share of it one per-vocab shift | perplexity without that "
          "shift | final norm input: rms | rms of its mean over positions | mean's share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(describe("dense", dense_logits, dense_stream, dense_logits, x), flush=True)
    for compensation in ("none", "bias", "least_squares"):
        cfg = {"pruning_type": a.criterion, "compensation": compensation, "prune_domain": "local",
               "target_sparsity": a.ratio}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruning = fxprune.compile(model, (x[:1],), cfg)
            pruning.calibrate(calib, progress=False).prune()
        print(describe(compensation, *final_norm_input(pruning.model, x), dense_logits, x), flush=True)


if __name__ == "__main__":
    main()
