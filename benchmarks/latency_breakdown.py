"""Where a latency target's prediction misses: per-layer predicted time against onnxruntime's profile.

    python benchmarks/latency_breakdown.py --model mobilenetv2 --target 2 --threads 1 --batch 1

fxprune plans ``{"target_speedup": T, "excluded_names": ["classifier"], ...}`` once (``latency_verify``
off, so the plan is the first one the check would time); then the dense and the compact ONNX files
are each run alone in an onnxruntime session with ``enable_profiling`` and every kernel's time is
attributed to the captured graph's layer it computes (a conv's fused activation counts as the
conv's), or to "rest". Printed per kind of layer: the latency model's time (its tables at the dense
and at the planned widths, times its fitted scale) against the profiled one.
"""

from __future__ import annotations

import argparse
import collections
import json
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
from fxprune.exporters.ort_benchmark import session_options  # noqa: E402


def profile(path: str, feed: dict, threads: int, runs: int) -> dict[str, float]:
    """Mean kernel ms per run of every onnxruntime node of one file, by node name."""
    import onnxruntime as ort

    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = path[:-5]
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(10 + runs):
        session.run(None, feed)
    events = json.load(open(session.end_profiling()))
    ms: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ms[e["name"][: -len("_kernel_time")]] += e["dur"] / 1e3 / (10 + runs)
    return ms


def layer_weights(gm, layers) -> dict[str, str]:
    """Weight name -> layer node, so a layer whose ONNX node the exporter renamed (a BatchNorm folded into a conv
    carries the BatchNorm's fx node) is found by the weight it reads."""
    names = {layer.node for layer in layers}
    return {a.target: n.name for n in gm.graph.nodes if n.name in names for a in n.args
            if getattr(a, "op", None) == "get_attr"}


def attribute(ms: dict[str, float], path: str, layers, weights: dict[str, str]) -> dict[str, float]:
    """Kernel ms per layer node name ("rest: <op>" for the other nodes). onnxruntime names a node by its
    ONNX node (``node_MatMul_1``, ``node_MatMul_1/MatMulAddFusion`` once fused) or, for a blocked-layout
    conv, by its output value (``relu_nchwc``: an activation fused into it); the exporter records each
    ONNX node's fx node, and a node that is not a layer is walked back through one-input nodes to one
    (the activation fused into a conv counts as the conv's; a Clip's constant bounds are not inputs)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    fx_of, producer, ops, inputs = {}, {}, {}, {}
    for n in graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        fx = meta.get("pkg.torch.onnx.fx_node", "")
        fx_of[n.name] = fx[1:].split(" ", 1)[0] if fx.startswith("%") else None
        ops[n.name] = n.op_type
        inputs[n.name] = [i for i in n.input if i]
        for o in n.output:
            producer[o] = n.name
    names = {layer.node for layer in layers}
    out: dict[str, float] = collections.Counter()
    for key, t in ms.items():
        onnx_name = key.split("/", 1)[0]
        if onnx_name not in fx_of and onnx_name.endswith("_nchwc"):
            onnx_name = producer.get(onnx_name[: -len("_nchwc")], onnx_name)
        node, hops = onnx_name, 0
        while node in fx_of and fx_of[node] not in names and hops < 4:
            read = [weights[i] for i in inputs[node] if i in weights]
            if read:
                fx_of[node] = read[0]
                break
            ins = [producer[i] for i in inputs[node] if i in producer and ops[producer[i]] != "Constant"]
            if len(ins) != 1:
                break
            node, hops = ins[0], hops + 1
        if node in fx_of and fx_of[node] in names:
            out[fx_of[node]] += t
        else:
            out["rest: " + ops.get(onnx_name, key.rsplit("_", 1)[0] if onnx_name not in ops else "?")] += t
    return out


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
    tmp = tempfile.mkdtemp()
    gm = p.captured.graph_module
    dense_path = fxprune.export_onnx(gm, os.path.join(tmp, "dense.onnx"), (x,), progress=False).path
    small = p.compact(check=False)
    compact_path = fxprune.export_onnx(small, os.path.join(tmp, "compact.onnx"), (x,), progress=False).path
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(dense_path, providers=["CPUExecutionProvider"]).get_inputs()]
    feed = lat._feed(names)
    dense_ms, compact_ms = lat.measure(small)
    again = [lat.measure(small) for _ in range(2)]
    prof = {"dense": attribute(profile(dense_path, feed, args.threads, args.runs), dense_path, lat.layers,
                               layer_weights(gm, lat.layers)),
            "compact": attribute(profile(compact_path, feed, args.threads, args.runs), compact_path, lat.layers,
                                 layer_weights(small, lat.layers))}
    rows: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * 4)
    for i, layer in enumerate(lat.layers):
        r = rows[kind(layer)]
        r[0] += lat.scale * lat.layer_ms(i, dense_frac)
        r[1] += prof["dense"].get(layer.node, 0.0)
        r[2] += lat.scale * lat.layer_ms(i, frac)
        r[3] += prof["compact"].get(layer.node, 0.0)
    kept_elems = sum(lat._value_elements(j, frac) for j in range(len(lat.values)))
    rest_share = kept_elems / lat.rest_elements if lat.rest_elements else 1.0
    rest = lambda which: sum(v for k, v in prof[which].items() if k.startswith("rest"))  # noqa: E731
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
    for op in sorted({k for d in prof.values() for k in d if k.startswith("rest")},
                     key=lambda k: -prof["dense"].get(k, 0.0))[:8]:
        d, c = prof["dense"].get(op, 0.0), prof["compact"].get(op, 0.0)
        print(f"| &nbsp; {op} | | {d:.3f} | | {c:.3f} | | {d / c if c else 0:.2f} |")
    total = [sum(r[i] for r in rows.values()) for i in range(4)]
    print(f"| total | {total[0]:.3f} | {total[1]:.3f} | {total[2]:.3f} | {total[3]:.3f} | "
          f"{total[0] / total[2]:.2f} | {total[1] / total[3]:.2f} |")


if __name__ == "__main__":
    main()
