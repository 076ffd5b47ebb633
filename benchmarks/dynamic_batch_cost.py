"""What a dynamic batch axis costs at one batch size, and what telling onnxruntime the size recovers.

    python benchmarks/dynamic_batch_cost.py --models convnext-tiny resnet50 --out benchmarks/results_dynamic_batch_cost.md

The same request with the hidden size (``{"target_sparsity": 0.5, "excluded_names": ["classifier"],
"prune_hidden_size": True}``; ResNet-50 has no hidden size, so it is the plain same request) is
compacted and exported twice: with the dynamic batch fxprune writes by default, and at the example's
fixed shapes. Three sessions are timed interleaved at batch 1: the dynamic file, the dynamic file with
``add_free_dimension_override_by_name("batch", 1)``, and the static file.
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

import fxprune  # noqa: E402


def _sessions(dynamic: str, static: str, threads: int) -> dict:
    import onnxruntime as ort

    from fxprune.exporters.ort_benchmark import session_options

    fixed = session_options(threads)
    fixed.add_free_dimension_override_by_name("batch", 1)
    return {"dynamic file": ort.InferenceSession(dynamic, session_options(threads), providers=["CPUExecutionProvider"]),
            "dynamic file, batch fixed in the session": ort.InferenceSession(dynamic, fixed,
                                                                             providers=["CPUExecutionProvider"]),
            "static file": ort.InferenceSession(static, session_options(threads), providers=["CPUExecutionProvider"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["convnext-tiny"], choices=list(bench_latency.MODELS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=60)
    ap.add_argument("--out")
    args = ap.parse_args()
    start = time.time()
    lines = ["# A dynamic batch axis at batch 1", "", "```", _measure.command_line(__file__), "```", "",
             "- machine: " + ", ".join(f"{k} = {v}" for k, v in _measure.machine().items()), "",
             "| model | threads | session | median ms | p10 ms | against the static file (median) |",
             "|---|---:|---|---:|---:|---:|"]
    for name in args.models:
        model, x = bench_latency.build(name)
        config = {"target_sparsity": 0.5, "excluded_names": ["classifier"],
                  "prune_hidden_size": name in bench_latency.HIDDEN}
        small = fxprune.compile(model, (x,), config, progress=False).prune().compact()
        tmp = tempfile.mkdtemp()
        dynamic = fxprune.export_onnx(small, os.path.join(tmp, "dynamic.onnx"), (x,), progress=False).path
        static = fxprune.export_onnx(small, os.path.join(tmp, "static.onnx"), (x,), dynamic_shapes=(None,),
                                     progress=False).path
        for threads in args.threads:
            sessions = _sessions(dynamic, static, threads)
            times = {k: [] for k in sessions}
            for i in range(args.repeat + 3):
                for label, s in sessions.items():
                    feed = {s.get_inputs()[0].name: x.numpy()}
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    if i >= 3:
                        times[label].append(1e3 * (time.perf_counter() - t0))
            ref = float(np.median(times["static file"]))
            for label, t in times.items():
                lines.append(f"| {name} | {threads} | {label} | {np.median(t):.2f} | {np.percentile(t, 10):.2f} | "
                             f"{np.median(t) / ref - 1:+.1%} |")
    lines += ["", f"Total wall time: {(time.time() - start) / 60:.1f} min"]
    _measure.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
