"""How evenly onnxruntime's NCHWc convolutions split over threads, dense against compact.

onnxruntime's MLAS runs a blocked (NCHWc) convolution as ``batch x filter sets x output rows`` work
units and gives each thread an equal count of units. A filter set is up to four blocks of output
channels (16 channels a block on AVX-512, 8 on AVX2), so when the output channels are not a multiple
of four blocks the last set is smaller, and a thread whose units fall on it has less to do. Depthwise
convolutions split ``batch x channel blocks x output rows`` units of one block each, so they stay even.
Pruning halves the output channels: fewer filter sets, partial sets, and at the 7x7 and 14x14 maps
of the last stages few units per thread. This script counts, from the ONNX graphs' shapes, each conv's
work per thread at a thread count (MACs over the channels padded to whole blocks), and reports the
network's predicted speedup from 1 to N threads for the dense and the compact model: a model of the
split, not a timing. Compare it with the measured scaling (RESULTS.md).

    python benchmarks/conv_thread_split.py --model mobilenetv2 --threads 2 --batch 1
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_latency  # noqa: E402

import fxprune  # noqa: E402

FILTER_SET = 4  # output-channel blocks per work unit of a grouped/pointwise NCHWc conv (MLAS FilterSetSize)


def conv_shapes(path: str, batch: int) -> list[dict]:
    """Every Conv's channels, output map, kernel and groups (the batch axis is dynamic in the files)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1])
        x, y = dims.get(node.input[0]), dims.get(node.output[0])
        if w is None or x is None or y is None or not all(y[1:]):
            raise RuntimeError(f"{node.name}: shapes not inferred")
        out.append({"name": node.name, "in": x[1], "out": y[1], "oh": y[2], "ow": y[3], "kernel": w[2] * w[3],
                    "group": attrs.get("group", 1), "batch": batch})
    return out


def per_thread(conv: dict, threads: int, block: int) -> tuple[float, float]:
    """(total work, the busiest thread's work) of one conv, in multiply-accumulates over padded channels."""
    blocks = math.ceil(conv["out"] / block)
    if conv["group"] > 1 and conv["group"] == conv["in"]:  # depthwise: units of one block x one output row
        unit = [block * conv["ow"] * conv["kernel"]] * (conv["batch"] * blocks * conv["oh"])
    else:
        sets = math.ceil(blocks / FILTER_SET)
        cin = math.ceil(conv["in"] / block) * block if conv["in"] >= block else conv["in"]
        unit = []
        for _ in range(conv["batch"] * conv["group"]):
            for s in range(sets):
                filters = min(FILTER_SET, blocks - s * FILTER_SET)
                unit += [filters * block * conv["ow"] * cin * conv["kernel"]] * conv["oh"]
    per, extra = divmod(len(unit), threads)
    start, loads = 0, []
    for t in range(threads):  # MlasPartitionWork: the first `extra` threads take one unit more
        n = per + (1 if t < extra else 0)
        loads.append(sum(unit[start:start + n]))
        start += n
    return float(sum(unit)), float(max(loads))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2", choices=sorted(bench_latency.MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=16, help="NCHWc block: 16 on AVX-512, 8 on AVX2")
    a = ap.parse_args(argv)
    model, x = bench_latency.build(a.model)
    x = x.expand(a.batch, *x.shape[1:]).contiguous()
    p = fxprune.compile(model, (x,), {"target_sparsity": 0.5, "excluded_names": [bench_latency.classifier(model)]})
    small = p.prune().compact()
    tmp = tempfile.mkdtemp()
    graphs = {"dense": fxprune.export_onnx(p.captured.graph_module, os.path.join(tmp, "dense.onnx"), (x,)).path,
              "compact": fxprune.export_onnx(small, os.path.join(tmp, "compact.onnx"), (x,)).path}
    print(f"{a.model}, the same request (50%, classifier excluded), batch {a.batch}, {a.threads} threads, "
          f"blocks of {a.block}\n")
    print("| graph | kind | convs | work (GMAC, padded) | busiest thread / even share | predicted speedup 1 -> "
          f"{a.threads} threads |")
    print("|---|---|---:|---:|---:|---:|")
    sums = {}
    for name, path in graphs.items():
        convs = conv_shapes(path, a.batch)
        for kind, pick in (("pointwise", lambda c: c["kernel"] == 1 and c["group"] == 1),
                           ("depthwise", lambda c: c["group"] > 1),
                           ("other", lambda c: c["kernel"] > 1 and c["group"] == 1), ("all", lambda c: True)):
            chosen = [c for c in convs if pick(c)]
            if not chosen:
                continue
            total, busiest = (sum(v) for v in zip(*(per_thread(c, a.threads, a.block) for c in chosen)))
            sums[(name, kind)] = (total, busiest)
            print(f"| {name} | {kind} | {len(chosen)} | {total / 1e9:.3f} | {busiest / (total / a.threads):.3f} | "
                  f"{total / busiest:.2f} |")
    print()
    for kind in ("pointwise", "depthwise", "all"):
        if ("dense", kind) in sums and ("compact", kind) in sums:
            (dt, db), (ct, cb) = sums[("dense", kind)], sums[("compact", kind)]
            print(f"- {kind}: compact/dense work {dt / ct:.2f}x fewer at 1 thread, {db / cb:.2f}x at {a.threads} "
                  "threads (the busiest thread's)")


if __name__ == "__main__":
    main()
