"""Where the compact models' time goes: onnxruntime's per-op profile of dense, fxprune and peer graphs.

    python benchmarks/profile_ops.py --models densenet121 squeezenet1_1 mobilenetv2 --out benchmarks/results_profile.md

For each model: fxprune's default config with the classifier excluded at ``--sparsity`` and Torch-Pruning
at the same ratio (classifier ignored), one-shot; each ONNX file is run alone in one onnxruntime session
(1 thread, ORT_ENABLE_ALL, ``enable_profiling``) for ``--runs`` runs after 10 warm-up runs, and the kernel
times of every node are summed per op type (the types onnxruntime runs after its own fusions and layout
changes: ``ReorderInput`` / ``ReorderOutput`` are its NCHWc layout conversions, ``FusedConv`` a conv it
could not put in that layout). Per-run milliseconds; a profile runs one model at a time, so use it to
compare where time goes, and ``bench_sweep.py`` / ``bench_latency.py`` (interleaved) for speedups.
"""

from __future__ import annotations

import argparse
import collections
import json
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
import bench_latency  # noqa: E402
import concat_zoo  # noqa: E402

import fxprune  # noqa: E402
from fxprune.exporters.ort_benchmark import session_options  # noqa: E402
from fxprune.passes.macs import count_macs  # noqa: E402

CHOICES = list(concat_zoo.MODELS) + list(bench_latency.MODELS)


def build(name: str):
    return concat_zoo.build(name) if name in concat_zoo.MODELS else bench_latency.build(name)


def peer(name: str, x: torch.Tensor, ratio: float, path: str) -> int:
    import torch_pruning as tp

    model = build(name)[0]
    tp.pruner.MagnitudePruner(model, (x,), importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                              ignored_layers=[model.classifier], output_transform=bench_latency.logits).step()
    model.eval()
    fxprune.export_onnx(model, path, (x,), progress=False)
    return count_macs(torch.export.export(model, (x,), strict=False).module(), (x,))


def profile(path: str, x: torch.Tensor, runs: int) -> tuple[dict[str, float], dict[str, int], float]:
    """(ms per run by op type, nodes by op type, median wall ms per run) of one file."""
    import numpy as np
    import onnxruntime as ort

    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = path[:-5]
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    wall = []
    for i in range(10 + runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        if i >= 10:
            wall.append((time.perf_counter() - t0) * 1e3)
    events = json.load(open(session.end_profiling()))
    ms: dict[str, float] = collections.Counter()
    nodes: dict[str, set] = collections.defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            ms[op] += e["dur"] / 1e3 / (10 + runs)
            nodes[op].add(e["name"])
    return dict(ms), {k: len(v) for k, v in nodes.items()}, float(np.median(wall))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=CHOICES, default=["densenet121", "squeezenet1_1", "mobilenetv2"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--config", default="{}",
                    help='JSON keys added to fxprune\'s config, e.g. \'{"prune_domain": "local"}\'')
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    extra = json.loads(args.config)
    start, command = time.perf_counter(), _measure.command_line(sys.argv[0])
    sections, summary = [], ["| model | dense ms | fxprune ms | peer ms | fxprune ideal | peer ideal | "
                             "fxprune speedup/ideal | peer speedup/ideal |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.models:
        model, x = build(name)
        tmp = tempfile.mkdtemp(prefix=f"fxprune-profile-{name}-")
        p = fxprune.compile(model, (x,), {"target_sparsity": args.sparsity, "excluded_names": ["classifier"], **extra},
                            progress=False)
        small = p.prune().compact(progress=False)
        files = {"dense": os.path.join(tmp, "dense.onnx"), "fxprune": os.path.join(tmp, "fx.onnx"),
                 "peer": os.path.join(tmp, "peer.onnx")}
        fxprune.export_onnx(p.captured.graph_module, files["dense"], (x,), progress=False)
        fxprune.export_onnx(small, files["fxprune"], (x,), progress=False)
        macs = {"dense": count_macs(p.captured.graph_module, (x,)), "fxprune": count_macs(small, (x,)),
                "peer": peer(name, x, args.sparsity, files["peer"])}
        prof = {label: profile(path, x, args.runs) for label, path in files.items()}
        ops = sorted(set().union(*(r[0] for r in prof.values())), key=lambda o: -max(r[0].get(o, 0) for r in prof.values()))
        lines = [f"### {name}", "", "| op type | " + " | ".join(f"{k} ms (nodes)" for k in files) + " |",
                 "|---|" + "---:|" * len(files)]
        for op in ops:
            lines.append(f"| {op} | " + " | ".join(f"{prof[k][0].get(op, 0):.3f} ({prof[k][1].get(op, 0)})"
                                                  for k in files) + " |")
        lines.append("| **kernels total** | " + " | ".join(f"**{sum(prof[k][0].values()):.3f}**" for k in files) + " |")
        lines.append("| wall median | " + " | ".join(f"{prof[k][2]:.3f}" for k in files) + " |")
        sections.append("\n".join(lines))
        dense_ms = prof["dense"][2]
        ideal = {k: macs["dense"] / macs[k] for k in ("fxprune", "peer")}
        eff = {k: dense_ms / prof[k][2] / ideal[k] for k in ideal}
        summary.append(f"| {name} | {dense_ms:.2f} | {prof['fxprune'][2]:.2f} | {prof['peer'][2]:.2f} | "
                       f"{ideal['fxprune']:.2f} | {ideal['peer']:.2f} | {eff['fxprune']:.2f} | {eff['peer']:.2f} |")
        print("\n".join([summary[0], summary[-1]]), "\n", sections[-1], flush=True)
    config = json.dumps({"target_sparsity": args.sparsity, "excluded_names": ["classifier"], **extra})
    details = [f"- fxprune `{config}` (defaults otherwise), peer Torch-Pruning "
               "`MagnitudePruner(pruning_ratio=s, ignored_layers=[classifier])`; "
               f"onnxruntime 1 thread, {args.runs} profiled runs after 10 warm-up runs, each model alone; ideal = dense "
               "MACs / compact MACs; speedup from the wall medians of these (not interleaved) runs"]
    _measure.write_report(args.out, "## Per-op profiles of compact models (onnxruntime)", command, _measure.machine(),
                          details, time.perf_counter() - start, "\n".join(summary), sections)


if __name__ == "__main__":
    main()
