"""Latency against sparsity: what each pruning level buys on the user's runtime, as a table and a curve.

``fxprune.sweep(model, example_inputs, config, sparsities=[...])`` prunes the model once per
point (a fresh ``compile`` each time, one-shot ``prune()``, exactly what a user of that config
gets), exports every compact model and the dense one to ONNX, and times them all in one
interleaved onnxruntime run (:func:`fxprune.benchmark`) at the threads and batch asked. With
``target_speedups=[...]`` instead, each point is a latency-target config, and the curve shows
the speedup measured against the one asked for. Next to the measured speedup is the ideal one
(dense MACs over compact MACs), so the gap that kernels and layout leave shows at each point.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fxprune.errors import ConfigError
from fxprune.exporters.ort_benchmark import BenchmarkResult, benchmark
from fxprune.progress import quiet

__all__ = ["sweep", "SweepPoint", "SweepResult"]

_COLUMNS = ("asked", "sparsity reached", "threads", "dense ms", "compact ms", "speedup", "ideal", "speedup/ideal")


@dataclass(frozen=True)
class SweepPoint:
    """One pruned model of a sweep: what was asked, the channel sparsity it reached, its MACs and params."""

    label: str
    asked: float  # the target_sparsity or target_speedup of this point
    sparsity: float
    macs: int
    params: int


@dataclass
class SweepResult:
    """The points, the dense model's MACs and the benchmark of all of them (labels: ``dense`` and each point's)."""

    kind: str  # "target_sparsity" or "target_speedup"
    points: list[SweepPoint] = field(default_factory=list)
    dense_macs: int = 0
    dense_params: int = 0
    timing: BenchmarkResult = field(default_factory=BenchmarkResult)

    def rows(self) -> list[dict]:
        """One dict per (thread count, point): the point's fields and its dense/compact ms, speedup and ideal."""
        by = {(r.label, r.threads): r for r in self.timing.rows}
        threads = list(dict.fromkeys(r.threads for r in self.timing.rows))
        out = []
        for t in threads:
            dense = by["dense", t]
            for p in self.points:
                row = by[p.label, t]
                out.append({"label": p.label, "asked": p.asked, "sparsity": p.sparsity, "threads": t,
                            "dense_ms": dense.median_ms, "compact_ms": row.median_ms, "speedup": row.speedup,
                            "ideal": row.ideal, "efficiency": row.efficiency, "macs": p.macs, "params": p.params})
        return out

    def _cells(self) -> list[list[str]]:
        asked = "{:.0%}" if self.kind == "target_sparsity" else "{:.2f}x"
        return [[asked.format(r["asked"]), f"{r['sparsity']:.1%}", str(r["threads"]), f"{r['dense_ms']:.3f}",
                 f"{r['compact_ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x", f"{r['efficiency']:.2f}"]
                for r in self.rows()]

    def to_markdown(self) -> str:
        head = ("target sparsity" if self.kind == "target_sparsity" else "target speedup",) + _COLUMNS[1:]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in self._cells()])

    def __str__(self) -> str:
        table = [list(_COLUMNS)] + self._cells()
        widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in table]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])

    def plot(self, path, title: str | None = None) -> None:
        """Compact latency and speedup against what was asked, one line per thread count, the ideal speedup
        (MACs ratio) dashed; for speedup targets also the line where measured equals asked
        (needs ``fxprune[plot]``)."""
        from fxprune.plots import pyplot, save_figure

        plt = pyplot()
        rows = self.rows()
        if not rows:
            raise ValueError("nothing to plot: the sweep has no points")
        fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.2))
        scale = 100.0 if self.kind == "target_sparsity" else 1.0
        xlabel = "target sparsity (% of channels)" if self.kind == "target_sparsity" else "target speedup (x)"
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        origin = 0.0 if self.kind == "target_sparsity" else 1.0  # the dense model: nothing asked
        for k, t in enumerate(dict.fromkeys(r["threads"] for r in rows)):
            mine = [r for r in rows if r["threads"] == t]
            mine = [{"asked": origin, "compact_ms": mine[0]["dense_ms"], "speedup": 1.0, "ideal": 1.0,
                     "dense_ms": mine[0]["dense_ms"]}] + mine
            x = [scale * r["asked"] for r in mine]
            label = f"{t} thread{'s' * (t > 1)}"
            color = colors[k % len(colors)]
            left.plot(x, [r["compact_ms"] for r in mine], "o-", color=color, label=f"compact, {label}")
            left.axhline(mine[0]["dense_ms"], color=color, linestyle=":", linewidth=1, label=f"dense, {label}")
            right.plot(x, [r["speedup"] for r in mine], "o-", color=color, label=f"measured, {label}")
        ideal = [{"asked": origin, "ideal": 1.0}] + [r for r in rows if r["threads"] == rows[0]["threads"]]
        right.plot([scale * r["asked"] for r in ideal], [r["ideal"] for r in ideal], "k--", linewidth=1,
                   label="ideal (dense MACs / compact MACs)")
        if self.kind == "target_speedup":
            hi = max(r["asked"] for r in rows)
            right.plot([1.0, hi], [1.0, hi], color="#888888", linewidth=0.8, label="measured = asked")
        left.set_ylim(bottom=0)
        right.set_ylim(bottom=0)
        for ax, ylabel in ((left, "median latency (ms)"), (right, "speedup over dense")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title or f"onnxruntime, {self.timing.input_summary}", fontsize=10)
        fig.tight_layout()
        save_figure(fig, path, dpi=120)


def sweep(model: torch.nn.Module, example_inputs: tuple, config: dict | None = None, *,
          sparsities=None, target_speedups=None, threads=(1,), batch: int | None = None,
          warmup: int = 10, repeat: int = 30, folder=None, progress: bool | None = None,
          example_kwargs: dict | None = None, dynamic_shapes=None) -> SweepResult:
    """Prune ``model`` at each of ``sparsities`` (or each of ``target_speedups``) with ``config`` and time every
    compact model against the dense one in onnxruntime.

    ``config`` is one pruner's keys (the sweep sets ``target_sparsity`` or ``target_speedup`` itself, so they
    must not be in it). ``threads``: intra-op thread counts; ``batch``: the batch timed (default the example's;
    another needs the capture's dynamic batch). ONNX files go to ``folder`` (default a temporary one).
    ``example_kwargs`` and ``dynamic_shapes`` go to every :func:`fxprune.compile`.
    The user's model is not changed. Returns a :class:`SweepResult` (``print`` it, ``.to_markdown()``,
    ``.plot(path)``).
    """
    from fxprune.api import compile as compile_
    from fxprune.exporters.onnx_export import export_onnx
    from fxprune.latency import batch_is_dynamic, batch_of, example_feed
    from fxprune.passes.macs import count_macs, count_params
    from fxprune.passes.shapes import flat_inputs

    kind, values = _points(sparsities, target_speedups)
    config = dict(config or {})
    if "pruners" in config:
        raise ConfigError("sweep() takes one pruner's config (a dict of its keys), not a 'pruners' list")
    for key in ("target_sparsity", "target_speedup", "target_latency_ms"):
        if key in config:
            raise ConfigError(f"sweep() sets {kind} for each point itself: drop {key!r} from the config")
    own = tempfile.TemporaryDirectory(prefix="fxprune-sweep-") if folder is None else None
    out = Path(own.name if own is not None else folder)
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(kind)
    models, macs = {}, {}
    from tqdm import tqdm

    try:
        for i, value in enumerate(tqdm(values, desc="sweep", leave=False, disable=quiet(progress))):
            pruning = compile_(model, example_inputs, {**config, kind: value}, example_kwargs=example_kwargs,
                               dynamic_shapes=dynamic_shapes, progress=False)
            inputs = flat_inputs(pruning.example_inputs, pruning.example_kwargs)
            if i == 0:
                if batch is not None and batch != batch_of(pruning) and not batch_is_dynamic(pruning):
                    raise ConfigError(f"batch={batch} differs from the example's ({batch_of(pruning)}), but the "
                                      "capture fixed the batch: capture with a dynamic batch or time the example's")
                dense = pruning.captured.graph_module
                models["dense"] = str(out / "dense.onnx")
                export_onnx(dense, models["dense"], pruning.example_inputs, pruning.example_kwargs, progress=False)
                macs["dense"] = result.dense_macs = count_macs(dense, inputs)
                result.dense_params = count_params(dense)
                feed_of = (pruning.example_inputs, pruning.example_kwargs, batch or batch_of(pruning),
                           batch_of(pruning))
            pruning.prune()
            small = pruning.compact(progress=False)
            label = f"{kind}={value:g}"
            models[label] = str(out / f"compact-{i}.onnx")
            export_onnx(small, models[label], pruning.example_inputs, pruning.example_kwargs, progress=False)
            macs[label] = count_macs(small, inputs)
            result.points.append(SweepPoint(label, float(value), pruning.sparsity, macs[label], count_params(small)))
        import onnxruntime as ort

        names = [i.name for i in ort.InferenceSession(models["dense"], providers=["CPUExecutionProvider"]).get_inputs()]
        example, kwargs, timed_batch, example_batch = feed_of
        result.timing = benchmark(models, threads=threads, warmup=warmup, repeat=repeat, macs=macs,
                                  inputs=example_feed(example, kwargs, names, timed_batch, example_batch))
    finally:
        if own is not None:
            own.cleanup()
    return result


def _points(sparsities, target_speedups) -> tuple[str, list[float]]:
    if (sparsities is None) == (target_speedups is None):
        raise ConfigError("sweep() takes sparsities=[...] or target_speedups=[...], one of the two")
    kind = "target_sparsity" if sparsities is not None else "target_speedup"
    values = [float(v) for v in (sparsities if sparsities is not None else target_speedups)]
    if not values:
        raise ConfigError(f"sweep() got no points: give at least one {kind}")
    for v in values:
        ok = 0.0 <= v < 1.0 if kind == "target_sparsity" else v > 1.0
        if not ok:
            raise ConfigError(f"{kind} {v:g} is out of range: sparsities lie in [0, 1), speedups above 1")
    if len(set(values)) != len(values):
        raise ConfigError(f"sweep() got the same {kind} twice: {values}")
    return kind, sorted(values)
