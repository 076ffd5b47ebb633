"""Per-layer kernel times inside a whole network, from onnxruntime's profiler.

A layer timed alone is not the layer inside its network: there a wide convolution runs faster
than alone (its input is already in the blocked layout, its weights are warm) and a narrow one
does not. The latency tables time layers alone; these in-network times correct them per layer.

Every kernel onnxruntime profiles is attributed to the captured graph's layer it computes: the
exporter records each ONNX node's fx node, a kernel fused from several nodes (a conv with its
BatchNorm and activation) keeps one of their names, and a node that is not a layer is walked back
through the one-input element-wise nodes onnxruntime fuses after a layer to one. Everything else
is "rest".
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable

import numpy as np

__all__ = ["kernel_ms", "layer_weights", "attribute", "REST"]

REST = "rest: "  # prefix of the keys of kernels that are no layer's, by ONNX op type
# ops onnxruntime fuses into the conv or Gemm before them (or that a blocked-layout conv's kernel is named after):
# a kernel named after one is walked back to the layer; any other op's kernel is its own ("rest")
FUSED_AFTER = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Elu",
                         "Selu", "Softplus", "Gelu", "BatchNormalization", "Identity", "Add", "Sub", "Mul", "Div"})


def kernel_ms(path: str, feed: dict, threads: int, runs: int, warmup: int = 5) -> dict[str, float]:
    """Kernel ms per run of every onnxruntime node of one ``.onnx`` file run alone: per node, the median over
    ``runs`` profiled runs after ``warmup`` (a host that slows a few runs moves a median little)."""
    import onnxruntime as ort

    from fxprune.exporters.ort_benchmark import session_options

    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.splitext(path)[0] + "_profile"
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(warmup + runs):
        session.run(None, feed)
    trace = session.end_profiling()
    try:
        with open(trace) as f:
            events = json.load(f)
    finally:
        os.remove(trace)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            durations[e["name"][: -len("_kernel_time")]].append(e["dur"] / 1e3)
    out = {}
    for name, d in durations.items():
        per_run = max(1, round(len(d) / (warmup + runs)))  # a node run more than once per run (none so far)
        timed = d[warmup * per_run:] or d
        out[name] = float(np.median(timed)) * per_run
    return out


def layer_weights(gm, layer_nodes: Iterable[str]) -> dict[str, str]:
    """Weight name -> layer node of graph ``gm``, so a layer whose ONNX node the exporter renamed (a BatchNorm
    folded into a conv carries the BatchNorm's fx node) is found by the weight it reads."""
    names = set(layer_nodes)
    return {a.target: n.name for n in gm.graph.nodes if n.name in names for a in n.args
            if getattr(a, "op", None) == "get_attr"}


def attribute(ms: dict[str, float], path: str, layer_nodes: Iterable[str], weights: dict[str, str]) -> dict[str, float]:
    """Kernel ms per layer node name (``REST + op type`` for the other kernels). onnxruntime names a kernel by its
    ONNX node (``node_MatMul_1``; ``node_MatMul_1/MatMulAddFusion`` or ``fused node_linear`` once fused) or, for a
    blocked-layout conv, by its output value (``relu_nchwc``: an activation fused into it); a node that is not a
    layer is walked back through one-input element-wise nodes (:data:`FUSED_AFTER`; a Clip's constant bounds are
    not inputs) to one, so the activation fused into a conv counts as the conv's and a pool or a LayerNorm after it
    does not."""
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
    names = set(layer_nodes)
    out: dict[str, float] = collections.Counter()
    for key, t in ms.items():
        onnx_name = key.split("/", 1)[0].removeprefix("fused ")  # a Gemm with its activation: "fused node_linear"
        if onnx_name not in fx_of and onnx_name.endswith("_nchwc"):
            onnx_name = producer.get(onnx_name[: -len("_nchwc")], onnx_name)
        node, hops = onnx_name, 0
        while node in fx_of and fx_of[node] not in names and hops < 4:
            read = [weights[i] for i in inputs[node] if i in weights]
            if read:
                fx_of[node] = read[0]
                break
            if ops[node] not in FUSED_AFTER:
                break
            ins = [producer[i] for i in inputs[node] if i in producer and ops[producer[i]] != "Constant"]
            if len(ins) != 1:
                break
            node, hops = ins[0], hops + 1
        if node in fx_of and fx_of[node] in names:
            out[fx_of[node]] += t
        else:
            out[REST + ops.get(onnx_name, key.rsplit("_", 1)[0])] += t
    return out
