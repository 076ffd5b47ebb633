"""Time one convolution or matrix product alone in onnxruntime, cached on disk.

A latency table needs the same layer at many widths. Exporting the model for each would take
minutes; a one-node ONNX model built with ``onnx.helper`` at the layer's shapes takes a
millisecond to build and is timed under the session options the full benchmark uses. Times
are cached in a JSON file per machine (CPU model, core count, onnxruntime version), so a
second run, or another model with the same layer shapes, measures nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ort_benchmark import session_options

__all__ = ["OpShape", "OpTimer", "edge_shapes", "machine_key", "default_cache_dir"]


@dataclass(frozen=True)
class OpShape:
    """One layer at one width: a convolution (``kind="conv"``) or ``x @ w`` (``kind="matmul"``).

    conv: ``x`` is (N, C, *spatial), ``w`` (O, C // group, *kernel). matmul: ``x`` is (..., K), ``w`` (K, O).
    ``chain``: the conv applied that many times in a row (its output must have its input's shape), which is how
    :meth:`OpTimer.edge_ms` separates a conv from the layout changes at the edges of a one-layer model.
    """

    kind: str
    x: tuple
    w: tuple
    bias: bool = True
    strides: tuple = ()
    pads: tuple = ()
    dilations: tuple = ()
    group: int = 1
    chain: int = 1

    def key(self) -> str:
        fields = [self.kind, self.x, self.w, self.bias, self.strides, self.pads, self.dilations, self.group]
        return json.dumps(fields + ([self.chain] if self.chain != 1 else []))

    def y(self) -> tuple:
        """The output shape."""
        if self.kind == "matmul":
            return self.x[:-1] + (self.w[-1],)
        nd = len(self.x) - 2
        spatial = tuple((n + self.pads[i] + self.pads[i + nd] - self.dilations[i] * (k - 1) - 1) // self.strides[i] + 1
                        for i, (n, k) in enumerate(zip(self.x[2:], self.w[2:])))
        return (self.x[0], self.w[0]) + spatial

    def model(self) -> onnx.ModelProto:
        """A one-node model (plus the bias add of a matmul) with random weights as initializers."""
        rng = np.random.default_rng(0)
        w = numpy_helper.from_array(rng.standard_normal(self.w).astype(np.float32), "w")
        out_channels = self.w[0] if self.kind == "conv" else self.w[-1]
        b = numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "b")
        inits = [w] + ([b] if self.bias else [])
        if self.kind == "conv":
            names = [f"y{i}" for i in range(1, self.chain)] + ["y"]
            nodes = [helper.make_node("Conv", [x, "w"] + (["b"] if self.bias else []), [y],
                                      strides=list(self.strides), pads=list(self.pads),
                                      dilations=list(self.dilations), group=self.group)
                     for x, y in zip(["x"] + names[:-1], names)]
        else:
            nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not self.bias else "xw"])]
            if self.bias:
                nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
        graph = helper.make_graph(nodes, self.kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.x)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def machine_key(threads: int) -> str:
    """What a time depends on besides the layer: CPU model, cores, onnxruntime version, threads."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | {os.cpu_count()} cpus | onnxruntime {ort.__version__} | {threads} threads"


def default_cache_dir() -> Path:
    """``$FXPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxprune``, else ``~/.cache/fxprune``."""
    if os.environ.get("FXPRUNE_CACHE_DIR"):
        return Path(os.environ["FXPRUNE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fxprune"


def edge_shapes(x: tuple) -> tuple[OpShape, OpShape]:
    """The two models :meth:`OpTimer.edge_ms` times for a tensor of shape ``x``: a 3x3 depthwise conv, once and
    three in a row."""
    nd = len(x) - 2
    dw = OpShape("conv", tuple(x), (x[1], 1) + (3,) * nd, True, (1,) * nd, (1,) * (2 * nd), (1,) * nd, x[1])
    return dw, dataclasses.replace(dw, chain=3)


class OpTimer:
    """Median latency in ms of :class:`OpShape` s under ``threads`` intra-op threads, cached on disk.

    ``cache_dir=False`` keeps times in memory only.
    """

    def __init__(self, threads: int = 1, cache_dir: str | os.PathLike | None | bool = None,
                 min_runs: int = 10, min_seconds: float = 0.03):
        self.threads, self.min_runs, self.min_seconds = threads, min_runs, min_seconds
        self.machine = machine_key(threads)
        self.measured = 0  # shapes timed (not found in the cache) by this timer
        self.path = None
        if cache_dir is not False:
            digest = hashlib.sha1(self.machine.encode()).hexdigest()[:12]
            self.path = Path(cache_dir or default_cache_dir()) / f"op_latency-{digest}.json"
        self.times: dict[str, float] = self._load()

    def _load(self) -> dict[str, float]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache is measured again, not trusted
        return dict(data.get("times", {})) if data.get("machine") == self.machine else {}

    def save(self) -> None:
        """Write the cache (atomically: a crash leaves the old file)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"machine": self.machine, "times": self.times}, f)
        os.replace(tmp, self.path)

    def __contains__(self, shape: OpShape) -> bool:
        return shape.key() in self.times

    def __call__(self, shape: OpShape) -> float:
        key = shape.key()
        if key not in self.times:
            self.times[key] = self._time(shape)
            self.measured += 1
        return self.times[key]

    def edge_ms(self, x: tuple) -> float:
        """What a one-layer model pays beyond its layer for a tensor of shape ``x`` (N, C, *spatial) at its input
        and one of that shape at its output: onnxruntime converts a conv's tensors to its blocked layout (NCHWc)
        and back at the edges of a model, where inside a network they stay blocked. Measured on a 3x3 depthwise
        conv of that shape, alone and three in a row: the chain's extra time is two convs, the rest is the edges.
        0 where the layout is not changed (channels the blocked kernels do not take)."""
        one, three = (self(s) for s in edge_shapes(x))
        return max(one - max(three - one, 0.0) / 2, 0.0)

    def in_layout_ms(self, shape: OpShape) -> float:
        """A conv's time inside a network: its time alone less half the edges of its input and of its output
        (see :meth:`edge_ms`), at least a quarter of its time alone; other ops as timed alone."""
        alone = self(shape)
        if shape.kind != "conv":
            return alone
        edges = 0.5 * (self.edge_ms(shape.x) + self.edge_ms(shape.y()))
        return max(alone - edges, 0.25 * alone)

    def _time(self, shape: OpShape) -> float:
        import onnxruntime as ort

        session = ort.InferenceSession(shape.model().SerializeToString(), sess_options=session_options(self.threads),
                                       providers=["CPUExecutionProvider"])
        feed = {"x": np.random.default_rng(1).standard_normal(shape.x).astype(np.float32)}
        for _ in range(3):
            session.run(None, feed)
        samples: list[float] = []
        began = time.perf_counter()
        while len(samples) < self.min_runs or (time.perf_counter() - began < self.min_seconds and len(samples) < 200):
            start = time.perf_counter()
            session.run(None, feed)
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
