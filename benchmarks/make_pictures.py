#!/usr/bin/env python
"""Draw the README's pictures into ``benchmarks/pictures/``: a report, a benchmark and a groups graph.

1. ``report.png``: ``pruning.report().plot()`` of the tests' small bottleneck ResNet
   (``tests/models.py``, ``ResNetBottleneck``), pruned one shot by magnitude to 50% with the default config.
2. ``groups.png``: ``fxprune.explain(...).draw()`` of the same model: its channel groups and frozen dims.
3. ``benchmark.png``: ``plot_benchmarks`` (``BenchmarkResult.plot`` for several batches), a column per batch: dense and
   compact ONNX of the demo's ``DigitsCNN`` (untrained: latency does not depend on the weights), 50%
   channels removed with ``round_to`` 8, timed with onnxruntime at 1 and 2 threads, batches 1 and 32.
   Latencies are of the machine it runs on; the ideal speedup is the MACs ratio.

Usage::

    python benchmarks/make_pictures.py            # about 15 s on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxprune  # noqa: E402
from fxprune.demo import DigitsCNN  # noqa: E402
from fxprune.exporters.ort_benchmark import plot_benchmarks  # noqa: E402
from tests.models import ARCHITECTURES  # noqa: E402


def report_and_groups(out: str) -> None:
    make, inputs = ARCHITECTURES["ResNetBottleneck"]
    model, x = make(), inputs()
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5})
    pruning.prune()
    pruning.report().plot(os.path.join(out, "report.png"))
    fxprune.explain(model, x).draw(os.path.join(out, "groups.png"))


def benchmark(out: str, repeat: int) -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 8, 8)
    pruning = fxprune.compile(model, (x,), {"target_sparsity": 0.5, "round_to": 8})
    small = pruning.prune().compact()
    report = pruning.report()
    macs = {"dense": report.macs_before, "compact": report.macs_after}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": os.path.join(tmp, "dense.onnx"), "compact": os.path.join(tmp, "compact.onnx")}
        fxprune.export_onnx(pruning.captured.graph_module, paths["dense"], (x,))
        fxprune.export_onnx(small, paths["compact"], (x,))
        results = []
        for batch in (1, 32):
            feed = {"x": np.random.default_rng(0).standard_normal((batch, 1, 8, 8)).astype(np.float32)}
            results.append(fxprune.benchmark(paths, threads=[1, 2], repeat=repeat, inputs=feed, macs=macs))
    plot_benchmarks(results, os.path.join(out, "benchmark.png"), titles=["batch 1", "batch 32"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "pictures"))
    parser.add_argument("--repeat", type=int, default=50, help="timed rounds per thread count and batch")
    args = parser.parse_args()
    start = time.perf_counter()
    report_and_groups(args.out)
    benchmark(args.out, args.repeat)
    for name in sorted(os.listdir(args.out)):
        print(f"{os.path.join(args.out, name)}: {os.path.getsize(os.path.join(args.out, name)) / 1e3:.1f} kB")
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
