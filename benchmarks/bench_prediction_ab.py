"""How far a latency target's first plan is from its prediction, with a latency-model switch on and off.

    python benchmarks/bench_prediction_ab.py --switch IN_NETWORK --models resnet50 mobilenetv2 \
        --targets 2 3 --settings 1x1 1x8 --rounds 2

For every model, (threads x batch) setting and target, each round plans once with the switch on and
once off (alternating, on one table cache, so both see the same tables and the same drift of the
host): ``{"target_speedup": T, "excluded_names": [classifier], "latency_threads": t, "latency_batch": b,
"latency_verify": False}``. The plan's
compact model is then timed against the dense one three times (the latency model's own measurement,
the 10th percentile of 30 interleaved runs); the error is predicted over the median measured speedup.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_latency  # noqa: E402
from _measure import command_line, machine, write_report  # noqa: E402

import fxprune  # noqa: E402
import fxprune.latency  # noqa: E402


def plan_error(name: str, target: float, threads: int, batch: int, cache: str) -> tuple[float, float, float]:
    """(predicted speedup, median measured speedup, spread of the three measurements) of one first plan."""
    model, x = bench_latency.build(name)
    p = fxprune.compile(model, (x,), {"target_speedup": target, "excluded_names": [bench_latency.classifier(model)],
                                      "latency_threads": threads, "latency_batch": batch, "latency_verify": False,
                                      "latency_cache": cache}, progress=False)
    p.prune()
    lat = p.pruners[0].latency
    frac = np.array([k.mean() for k in p._kept.values()])
    predicted = lat.dense_ms / lat.predict(frac)
    small = p.compact(check=False)
    measured = [d / c for d, c in (lat.measure(small) for _ in range(3))]
    return predicted, float(np.median(measured)), max(measured) / min(measured) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", default="IN_NETWORK", help="a boolean of fxprune.latency")
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv2"], choices=list(bench_latency.MODELS))
    ap.add_argument("--targets", nargs="+", type=float, default=[2.0, 3.0])
    ap.add_argument("--settings", nargs="+", default=["1x1"], help="THREADSxBATCH")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not isinstance(getattr(fxprune.latency, args.switch, None), bool):
        ap.error(f"--switch {args.switch}: not a boolean of fxprune.latency")
    cache = args.cache or tempfile.mkdtemp(prefix="fxprune-tables-")
    began = time.perf_counter()
    rows = ["| model | target | threads | batch | round | switch | predicted | measured (median of 3) | error | "
            "spread of the 3 |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    errors: dict[bool, list[float]] = {True: [], False: []}
    for name in args.models:
        for setting in args.settings:
            threads, batch = (int(v) for v in setting.split("x"))
            for target in args.targets:
                for r in range(args.rounds):
                    for on in ((True, False) if r % 2 == 0 else (False, True)):
                        setattr(fxprune.latency, args.switch, on)
                        pred, meas, spread = plan_error(name, target, threads, batch, cache)
                        errors[on].append(pred / meas - 1)
                        switch = "on" if on else "off"
                        rows.append(f"| {name} | {target:g}x | {threads} | {batch} | {r + 1} | {switch} | "
                                    f"{pred:.2f}x | {meas:.2f}x | {pred / meas - 1:+.1%} | {spread:.1%} |")
                        print(rows[-1], flush=True)
    summary = "; ".join(f"{'on' if on else 'off'}: mean |error| {np.mean(np.abs(e)):.1%}, max |error| "
                        f"{np.max(np.abs(e)):.1%}, within 10%: {sum(abs(v) <= 0.1 for v in e)} of {len(e)}"
                        for on, e in errors.items())
    write_report(args.out, f"# First-plan prediction error, {args.switch} on and off", command_line(__file__),
                 machine(), [], time.perf_counter() - began, summary, ["\n".join(rows)])


if __name__ == "__main__":
    main()
