"""Time one convolution or matrix product alone in onnxruntime, cached on disk.

A latency table needs the same layer at many widths. Exporting the model for each would take
minutes; a one-node ONNX model built with ``onnx.helper`` at the layer's shapes takes a
millisecond to build and is timed under the session options the full benchmark uses. Times
are cached in a JSON file per machine (CPU model, core count, onnxruntime version), so a
second run, or another model with the same layer shapes, measures nothing.
"""

from __future__ import annotations

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

__all__ = ["OpShape", "OpTimer", "machine_key", "default_cache_dir"]


@dataclass(frozen=True)
class OpShape:
    """One layer at one width: a convolution (``kind="conv"``) or ``x @ w`` (``kind="matmul"``).

    conv: ``x`` is (N, C, *spatial), ``w`` (O, C // group, *kernel). matmul: ``x`` is (..., K), ``w`` (K, O).
    """

    kind: str
    x: tuple
    w: tuple
    bias: bool = True
    strides: tuple = ()
    pads: tuple = ()
    dilations: tuple = ()
    group: int = 1

    def key(self) -> str:
        return json.dumps([self.kind, self.x, self.w, self.bias, self.strides, self.pads, self.dilations, self.group])

    def model(self) -> onnx.ModelProto:
        """A one-node model (plus the bias add of a matmul) with random weights as initializers."""
        rng = np.random.default_rng(0)
        w = numpy_helper.from_array(rng.standard_normal(self.w).astype(np.float32), "w")
        out_channels = self.w[0] if self.kind == "conv" else self.w[-1]
        b = numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "b")
        inits = [w] + ([b] if self.bias else [])
        if self.kind == "conv":
            nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if self.bias else []), ["y"],
                                      strides=list(self.strides), pads=list(self.pads),
                                      dilations=list(self.dilations), group=self.group)]
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
