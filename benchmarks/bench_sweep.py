"""Latency against sparsity and against a speedup target (fxprune.sweep), with the peer at the same sparsities.

    python benchmarks/bench_sweep.py --out benchmarks/results_sweep.md --plot benchmarks/pictures/sweep.png

On a Hugging Face model built from its default config (random init; default ResNet-50):

(a) ``fxprune.sweep(model, (x,), {"excluded_names": ["classifier"]}, sparsities=...)``: the default
    config but for the classifier, one point per sparsity, timed with the dense model at 1 and 2
    threads (the curve in the picture).
(b) The same compact files and Torch-Pruning at the same sparsities (``MagnitudePruner``, L2 group
    magnitude, classifier ignored, its defaults otherwise), all timed together with the dense model
    in one interleaved run: the peer in the same run at the same request.
(c) ``fxprune.sweep(..., target_speedups=...)`` with ``latency_threads`` 1: the speedup measured
    against the one asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import _measure  # noqa: E402
from bench_latency import MODELS, build, logits  # noqa: E402

import fxprune  # noqa: E402
from fxprune.passes.macs import count_macs  # noqa: E402


def peer_file(name: str, x: torch.Tensor, ratio: float, path: str) -> int:
    """Torch-Pruning's model at ``ratio``, exported to ``path``; its MACs (fxprune's counter)."""
    import torch_pruning as tp

    model = build(name)[0]
    pruner = tp.pruner.MagnitudePruner(model, (x,), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=[model.classifier],
                                       output_transform=logits)
    pruner.step()
    model.eval()
    fxprune.export_onnx(model, path, (x,), progress=False)
    return count_macs(torch.export.export(model, (x,), strict=False).module(), (x,))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="resnet50")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG of (a)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    command = _measure.command_line(sys.argv[0])
    model, x = build(args.model)
    config = {"excluded_names": ["classifier"]}
    folder = tempfile.mkdtemp(prefix="fxprune-bench-sweep-")

    t0 = time.perf_counter()
    by_sparsity = fxprune.sweep(model, (x,), config, sparsities=args.sparsities, threads=args.threads,
                                repeat=args.repeat, folder=folder)
    sweep_s = time.perf_counter() - t0
    print(by_sparsity, flush=True)
    if args.plot:
        by_sparsity.plot(args.plot, title=f"{args.model}, fxprune default config (classifier excluded), "
                                          f"onnxruntime, {by_sparsity.timing.input_summary}")

    files = {"dense": os.path.join(folder, "dense.onnx")}
    macs = {"dense": by_sparsity.dense_macs}
    for i, point in enumerate(by_sparsity.points):
        files[f"fxprune {point.asked:.0%}"] = os.path.join(folder, f"compact-{i}.onnx")
        macs[f"fxprune {point.asked:.0%}"] = point.macs
        label = f"torch-pruning {point.asked:.0%}"
        files[label] = os.path.join(folder, f"peer-{i}.onnx")
        macs[label] = peer_file(args.model, x, point.asked, files[label])
    import onnxruntime as ort

    name = ort.InferenceSession(files["dense"], providers=["CPUExecutionProvider"]).get_inputs()[0].name
    both = fxprune.benchmark(files, threads=args.threads, repeat=args.repeat, macs=macs, inputs={name: x.numpy()})
    print(both, flush=True)

    t0 = time.perf_counter()
    by_target = fxprune.sweep(model, (x,), {**config, "latency_threads": 1}, target_speedups=args.targets,
                              threads=args.threads, repeat=args.repeat)
    target_s = time.perf_counter() - t0
    print(by_target, flush=True)

    details = [
        f"- model: `{MODELS[args.model][0]}({MODELS[args.model][1]}())`, random init, input "
        f"{'x'.join(map(str, x.shape))}; dense {by_sparsity.dense_macs / 1e9:.2f} GMACs",
        "- fxprune config: `{\"excluded_names\": [\"classifier\"]}` plus the point's `target_sparsity` (or "
        "`target_speedup` with `latency_threads: 1`); everything else default (global scope, `round_to: auto`, "
        "magnitude, one-shot `prune()`)",
        "- peer: Torch-Pruning `MagnitudePruner(pruning_ratio=s, ignored_layers=[classifier])`, "
        "`GroupMagnitudeImportance(p=2)`, its defaults otherwise",
        f"- onnxruntime CPU, ORT_ENABLE_ALL, threads {args.threads}, warmup 10, repeat {args.repeat}, interleaved; "
        "ideal = dense MACs / compact MACs (fxprune's counter for every model)",
        f"- (a) took {sweep_s:.0f} s, (c) {target_s:.0f} s (the per-layer latency tables come from the cache when "
        "they were timed before on this machine)",
    ]
    summary = ("fxprune (the files of (a)) and the peer at the same sparsities, one interleaved run:\n\n"
               + both.to_markdown())
    sections = [
        "### (a) fxprune.sweep over sparsities\n\n" + by_sparsity.to_markdown(),
        "### (c) fxprune.sweep over speedup targets (measured at 1 thread as planned, and at 2)\n\n"
        + by_target.to_markdown(),
    ]
    _measure.write_report(args.out, f"## Latency against sparsity and target: {args.model}", command,
                          _measure.machine(), details, time.perf_counter() - start, summary, sections)


if __name__ == "__main__":
    main()
