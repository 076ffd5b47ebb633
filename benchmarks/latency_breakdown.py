"""Where a latency target's prediction misses: per-layer predicted time against onnxruntime's profile.

    python benchmarks/latency_breakdown.py --model mobilenetv2 --target 2 --threads 1 --batch 1

fxprune plans ``{"target_speedup": T, "excluded_names": ["classifier"], ...}`` once (``latency_verify``
off, so the plan is the first one the check would time); then the dense and the compact ONNX files
are each profiled alone by :meth:`LatencyModel.profile` (every kernel's time attributed to the captured
graph's layer it computes, a conv's fused activation counted as the conv's, or to "rest":
``exporters/ort_profile.py``). Printed per kind of layer: the latency model's time (each layer's
in-network line at the dense and at the planned widths, times its fitted scale) against the profiled one.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_latency  # noqa: E402

import fxprune  # noqa: E402
import fxprune.latency  # noqa: E402
from fxprune.exporters.ort_profile import REST  # noqa: E402


def kind(layer) -> str:
    b = layer.base
    if b.kind == "matmul":
        return "matmul"
    if layer.tied is not None:
        return "depthwise/grouped conv"
    return "1x1 conv" if all(k == 1 for k in b.w[2:]) else "kxk conv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2", choices=list(bench_latency.MODELS))
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    model, x = bench_latency.build(args.model)
    p = fxprune.compile(model, (x,), {"target_speedup": args.target, "excluded_names": ["classifier"],
                                      "latency_threads": args.threads, "latency_batch": args.batch,
                                      "latency_verify": False,
                                      "latency_cache": args.cache or tempfile.mkdtemp(prefix="fxprune-tables-")})
    p.prune()
    lat = p.pruners[0].latency
    frac = np.array([k.mean() for k in p._kept.values()])
    dense_frac = np.ones_like(frac)
    small = p.compact(check=False)
    dense_ms, compact_ms = lat.measure(small)
    again = [lat.measure(small) for _ in range(2)]
    fxprune.latency.PROFILE_RUNS = args.runs
    in_compact, in_dense = lat.profile(small)
    prof = {"dense": in_dense, "compact": in_compact}
    rows: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * 4)
    for i, layer in enumerate(lat.layers):
        r = rows[kind(layer)]
        r[0] += lat.scale * lat.layer_ms(i, dense_frac)
        r[1] += prof["dense"].get(layer.node, 0.0)
        r[2] += lat.scale * lat.layer_ms(i, frac)
        r[3] += prof["compact"].get(layer.node, 0.0)
    kept_elems = sum(lat._value_elements(j, frac) for j in range(len(lat.values)))
    rest_share = kept_elems / lat.rest_elements if lat.rest_elements else 1.0
    rest = lambda which: sum(v for k, v in prof[which].items() if k.startswith(REST))  # noqa: E731
    rows["rest (other ops)"] = [lat.scale * lat.rest_ms, rest("dense"), lat.scale * lat.rest_ms * rest_share,
                                rest("compact")]
    rows["offset (fit)"] = [lat.offset, 0.0, lat.offset, 0.0]
    print(f"{args.model} target {args.target:g}x, {args.threads} threads, batch {args.batch}: predicted "
          f"{lat.dense_ms / lat.predict(frac):.2f}x, measured {dense_ms / compact_ms:.2f}x "
          f"(dense {dense_ms:.2f} ms, compact {compact_ms:.2f} ms; fit scale {lat.scale:.3f}, "
          f"offset {lat.offset:.3f} ms; rest kept {rest_share:.2f}); when the tables were fit: dense "
          f"{lat.dense_ms:.2f} ms, probe {lat.probe['measured_ms']:.2f} ms (predicted {lat.probe['predicted_ms']:.2f}, "
          f"kept fraction {lat.probe['kept_fraction']:.2f}); the plan measured twice more: "
          + ", ".join(f"{d / c:.2f}x" for d, c in again))
    print("| layers | model dense ms | profiled dense ms | model compact ms | profiled compact ms | model ratio | "
          "profiled ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, (md, pd, mc, pc) in rows.items():
        print(f"| {k} | {md:.3f} | {pd:.3f} | {mc:.3f} | {pc:.3f} | {md / mc if mc else 0:.2f} | "
              f"{pd / pc if pc else 0:.2f} |")
    for op in sorted({k for d in prof.values() for k in d if k.startswith(REST)},
                     key=lambda k: -prof["dense"].get(k, 0.0))[:8]:
        d, c = prof["dense"].get(op, 0.0), prof["compact"].get(op, 0.0)
        print(f"| &nbsp; {op} | | {d:.3f} | | {c:.3f} | | {d / c if c else 0:.2f} |")
    total = [sum(r[i] for r in rows.values()) for i in range(4)]
    print(f"| total | {total[0]:.3f} | {total[1]:.3f} | {total[2]:.3f} | {total[3]:.3f} | "
          f"{total[0] / total[2]:.2f} | {total[1] / total[3]:.2f} |")


if __name__ == "__main__":
    main()
