"""Where a sparsity target's speedup falls short of its ideal: time and MACs per kind of layer.

    python benchmarks/time_by_layer_kind.py --model mobilenetv2 --threads 1 2

The ideal speedup counts MACs, so it assumes every layer's time falls as its MACs do. fxprune
prunes ``{"target_sparsity": S, "excluded_names": ["classifier"]}`` once; the dense and the
compact ONNX files are each profiled alone in onnxruntime (``enable_profiling``), every kernel's
time attributed to its layer (``exporters/ort_profile.py``), and printed per kind of layer
(1x1 conv, depthwise/grouped conv, kxk conv, matmul, the rest): its share of the time and of the
MACs, and how far each falls. A kind whose time falls less than its MACs is where the gap is.
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
from latency_breakdown import kind  # noqa: E402

import fxprune  # noqa: E402
from fxprune.exporters.ort_profile import REST, attribute, kernel_ms, layer_weights  # noqa: E402
from fxprune.latency import LatencyModel  # noqa: E402


def layer_macs(shape) -> float:
    """MACs of one layer's :class:`OpShape`."""
    if shape.kind == "matmul":
        return float(np.prod(shape.x[:-1]) * shape.w[0] * shape.w[1])
    return float(shape.x[0] * shape.w[0] * shape.w[1] * np.prod(shape.w[2:]) * np.prod(shape.y()[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2", choices=list(bench_latency.MODELS))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    model, x = bench_latency.build(args.model)
    p = fxprune.compile(model, (x,), {"target_sparsity": args.sparsity, "excluded_names": ["classifier"]},
                        progress=False)
    small = p.prune().compact()
    lat = LatencyModel(p)  # its layers and their channel spaces; nothing is timed
    layers = lat.layers
    tmp = tempfile.mkdtemp()
    files = {label: fxprune.export_onnx(gm, os.path.join(tmp, f"{label}.onnx"), (x,), progress=False).path
             for label, gm in (("dense", p.captured.graph_module), ("compact", small))}
    nodes = [layer.node for layer in layers]
    weights = {"dense": layer_weights(p.captured.graph_module, nodes), "compact": layer_weights(small, nodes)}
    feeds = {label: lat._feed(_names(path)) for label, path in files.items()}

    frac = np.array([k.mean() for k in p._kept.values()])
    macs: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for layer in layers:
        widths = (lat._space(layer.x_space).width(frac), lat._space(layer.y_space).width(frac))
        macs[kind(layer)][0] += layer_macs(layer.base)
        macs[kind(layer)][1] += layer_macs(layer.shape(*(int(round(w)) for w in widths)))
    dense_macs = sum(m[0] for m in macs.values())
    print(f"{args.model}, {args.sparsity:.0%} of channels, classifier excluded; ideal {p.report().macs_ratio:.2f} "
          f"(layer MACs {dense_macs / sum(m[1] for m in macs.values()):.2f})\n")
    for threads in args.threads:
        ms = {}
        for label, path in files.items():
            prof = attribute(kernel_ms(path, feeds[label], threads, args.runs), path, nodes, weights[label])
            by = collections.Counter()
            for layer in layers:
                by[kind(layer)] += prof.get(layer.node, 0.0)
            by["rest"] = sum(v for k, v in prof.items() if k.startswith(REST))
            ms[label] = by
        total = {label: sum(by.values()) for label, by in ms.items()}
        print(f"{threads} thread{'s' * (threads != 1)}: kernels {total['dense']:.3f} ms -> {total['compact']:.3f} ms, "
              f"{total['dense'] / total['compact']:.2f}x\n")
        print("| layers | share of dense time | share of dense MACs | time falls | MACs fall |")
        print("|---|---:|---:|---:|---:|")
        for k in sorted(ms["dense"], key=lambda k: -ms["dense"][k]):
            d, c = ms["dense"][k], ms["compact"][k]
            m = macs.get(k, (0.0, 0.0))
            mfall = f"{m[0] / m[1]:.2f}x" if m[1] else "-"
            mshare = f"{m[0] / dense_macs:.0%}" if m[0] else "-"
            print(f"| {k} | {d / total['dense']:.0%} | {mshare} | {d / max(c, 1e-9):.2f}x | {mfall} |")
        print()


def _names(path: str) -> list[str]:
    import onnxruntime as ort

    return [i.name for i in ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()]


if __name__ == "__main__":
    main()
