"""onnxruntime CPU latency benchmark for comparing dense and compacted models.

Runs are interleaved model by model so that thermal drift, frequency scaling
and noisy neighbours affect every model alike instead of biasing whichever
model happened to run last.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["BenchmarkResult", "BenchmarkRow", "benchmark", "plot_benchmarks"]

_COLUMNS = ("model", "threads", "median ms", "p10 ms", "p90 ms", "speedup", "ideal", "speedup/ideal")

# ONNX tensor type string -> numpy dtype, for generating random inputs.
_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class BenchmarkRow:
    """Latency of one model at one thread count."""

    label: str
    threads: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    speedup: float
    ideal: float | None
    efficiency: float | None


@dataclass
class BenchmarkResult:
    """All rows of a benchmark, ordered by thread count then by model label."""

    rows: list[BenchmarkRow] = field(default_factory=list)
    baseline: str = ""
    inputs: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, dtype) timed

    @property
    def input_summary(self) -> str:
        """``x 1x3x224x224 float32``: what was timed, for titles and headings."""
        return ", ".join(f"{name} {'x'.join(map(str, shape))} {dtype}" for name, (shape, dtype) in self.inputs.items())

    def plot(self, path, title: str | None = None) -> None:
        """Median latency per model and thread count, and speedup over the baseline (needs ``fxprune[plot]``)."""
        plot_benchmarks([self], path, titles=None if title is None else [title])

    def as_dicts(self) -> list[dict[str, Any]]:
        """Rows as plain dicts, e.g. for JSON or pandas."""
        return [asdict(row) for row in self.rows]

    def to_markdown(self) -> str:
        """GitHub-flavoured markdown table."""
        lines = [
            "| " + " | ".join(_COLUMNS) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(cells) + " |" for cells in self._cells()]
        return "\n".join(lines)

    def __str__(self) -> str:
        table = [list(_COLUMNS)] + self._cells()
        widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
        out = []
        for n, cells in enumerate(table):
            parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            out.append("  ".join(parts))
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    def _cells(self) -> list[list[str]]:
        def opt(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        return [
            [
                row.label,
                str(row.threads),
                f"{row.median_ms:.3f}",
                f"{row.p10_ms:.3f}",
                f"{row.p90_ms:.3f}",
                f"{row.speedup:.2f}x",
                opt(row.ideal, ".2f"),
                opt(row.efficiency, ".2f"),
            ]
            for row in self.rows
        ]


def benchmark(
    models: dict[str, str],
    *,
    threads: Iterable[int] = (1, 2),
    warmup: int = 10,
    repeat: int = 50,
    inputs: dict[str, np.ndarray] | None = None,
    macs: dict[str, int] | None = None,
    baseline: str | None = None,
    seed: int = 0,
) -> BenchmarkResult:
    """Measure onnxruntime CPU latency of several models on identical inputs.

    Parameters
    ----------
    models : dict of str to str
        Label -> path of an ``.onnx`` file. All models must accept the same
        inputs. The first label is the baseline unless ``baseline`` is given.
    threads : iterable of int, default (1, 2)
        ``intra_op_num_threads`` values; fresh sessions are built for each.
    warmup : int, default 10
        Untimed runs per model and thread count before measuring.
    repeat : int, default 50
        Timed rounds; each round runs every model once, in label order.
    inputs : dict of str to numpy.ndarray, optional
        Feed shared by all models. If None, random inputs are generated from
        the baseline session's input metadata (float: standard normal;
        integer: small non-negative ints; bool: False; unknown dims: 1).
    macs : dict of str to int, optional
        Multiply-accumulate count per label; enables ``ideal`` (the baseline's
        MACs over the model's) and ``efficiency`` (speedup / ideal).
    baseline : str, optional
        Label that speedups are relative to.
    seed : int, default 0
        Seed of the generated inputs.

    Returns
    -------
    BenchmarkResult
        One row per (thread count, model) with median/p10/p90 in ms.

    Raises
    ------
    ValueError
        If ``models`` is empty, ``baseline`` is unknown, a path does not
        exist, ``macs`` lacks a label, or counts are not positive.
    """
    import onnxruntime as ort

    base = _validate(models, baseline, macs, warmup, repeat)
    thread_counts = [int(t) for t in threads]
    if not thread_counts or min(thread_counts) < 1:
        raise ValueError(f"threads must be a non-empty sequence of positive ints, got {thread_counts}")

    result = BenchmarkResult(baseline=base)
    feed = inputs
    for t in thread_counts:
        options = session_options(t)
        sessions = {
            label: ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
            for label, path in models.items()
        }
        if feed is None:
            feed = _random_inputs(sessions[base], seed)
        result.inputs = {name: (tuple(a.shape), str(a.dtype)) for name, a in feed.items()}
        for session in sessions.values():
            for _ in range(warmup):
                session.run(None, feed)

        times: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(repeat):
            for label, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[label].append((time.perf_counter() - start) * 1e3)

        base_median = float(np.median(times[base]))
        for label, samples in times.items():
            median = float(np.median(samples))
            speedup = 1.0 if label == base else base_median / median
            ideal = macs[base] / macs[label] if macs is not None else None
            result.rows.append(
                BenchmarkRow(
                    label=label,
                    threads=t,
                    median_ms=median,
                    p10_ms=float(np.percentile(samples, 10)),
                    p90_ms=float(np.percentile(samples, 90)),
                    speedup=speedup,
                    ideal=ideal,
                    efficiency=None if ideal is None else speedup / ideal,
                )
            )
    return result


def plot_benchmarks(results, path, titles=None) -> None:
    """One column per result (a batch size, say): median latency with p10-p90 bars on top, speedup below.

    Speedup is over each result's baseline; where MACs were given, the ideal speedup (baseline MACs
    over the model's) is marked on its bar, so the gap to ideal shows at a glance.
    """
    from fxprune.plots import pyplot, save_figure

    plt = pyplot()
    results = list(results)
    if not results or not all(r.rows for r in results):
        raise ValueError("nothing to plot: every result needs rows (run fxprune.benchmark first)")
    titles = [r.input_summary or f"run {i + 1}" for i, r in enumerate(results)] if titles is None else list(titles)
    if len(titles) != len(results):
        raise ValueError(f"{len(titles)} titles for {len(results)} results")
    fig, axes = plt.subplots(2, len(results), figsize=(4.5 * len(results), 6.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (title, result) in enumerate(zip(titles, results)):
        top, bottom = axes[0, col], axes[1, col]
        labels = list(dict.fromkeys(r.label for r in result.rows))
        threads = list(dict.fromkeys(r.threads for r in result.rows))
        by = {(r.label, r.threads): r for r in result.rows}
        width = 0.8 / len(labels)
        for k, label in enumerate(labels):
            rows = [by[label, t] for t in threads]
            x = np.arange(len(threads)) + (k - (len(labels) - 1) / 2) * width
            med = np.array([r.median_ms for r in rows])
            err = np.array([[r.median_ms - r.p10_ms for r in rows], [r.p90_ms - r.median_ms for r in rows]])
            color = colors[k % len(colors)]
            top.bar(x, med, width, yerr=err, capsize=3, label=label, color=color)
            bottom.bar(x, [r.speedup for r in rows], width, color=color)
            ideal = [(xi, r.ideal) for xi, r in zip(x, rows) if r.ideal is not None and label != result.baseline]
            if ideal:
                marked = bottom.get_legend_handles_labels()[1]
                bottom.scatter(*zip(*ideal), marker="_", s=400, color="black", zorder=3,
                               label=None if marked else "ideal speedup (MACs ratio)")
        ticks = [f"{t} thread{'s' * (t > 1)}" for t in threads]
        top.set_xticks(np.arange(len(threads)), ticks)
        bottom.set_xticks(np.arange(len(threads)), ticks)
        top.set_ylabel("median latency (ms)")
        bottom.set_ylabel(f"speedup over {result.baseline}")
        bottom.axhline(1.0, color="#888888", linewidth=0.8, zorder=0)
        top.set_ylim(0, 1.25 * max(r.p90_ms for r in result.rows))  # room for the legend above the bars
        bottom.set_ylim(0, 1.3 * max(max(r.speedup, r.ideal or 0.0) for r in result.rows))
        top.set_title(title, fontsize=10)
        top.legend(fontsize=8, ncol=len(labels), loc="upper left")
        if bottom.get_legend_handles_labels()[1]:
            bottom.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def session_options(threads: int):
    """The onnxruntime session options every fxprune timing uses (whole models and single layers alike)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # models run interleaved, so a session's worker threads would otherwise keep spinning after
    # its run and take a core from the next model's: on 2 cores that cost BERT-base 25% at 2
    # threads. Stopping them when a run returns leaves each run as fast as in a lone session.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def _validate(
    models: Mapping[str, str],
    baseline: str | None,
    macs: Mapping[str, int] | None,
    warmup: int,
    repeat: int,
) -> str:
    """Check arguments up front so a typo fails before minutes of timing."""
    if not models:
        raise ValueError("models is empty: pass at least one {label: path.onnx}")
    for label, path in models.items():
        if not os.path.isfile(path):
            raise ValueError(f"model {label!r}: ONNX file does not exist: {path}")
    base = next(iter(models)) if baseline is None else baseline
    if base not in models:
        raise ValueError(f"unknown baseline {base!r}; labels are {list(models)}")
    if macs is not None:
        missing = [label for label in models if label not in macs]
        if missing:
            raise ValueError(f"macs has no entry for {missing}; got labels {list(macs)}")
        bad = {label: macs[label] for label in models if macs[label] <= 0}
        if bad:
            raise ValueError(f"macs must be positive, got {bad}")
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    return base


def _random_inputs(session: Any, seed: int, size_of: Callable[[Any, int, Any], int] | None = None
                   ) -> dict[str, np.ndarray]:
    """Build a feed from the session's declared inputs; symbolic dims become 1, or ``size_of(input, index, dim)``."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for meta in session.get_inputs():
        shape = tuple(d if isinstance(d, int) and d > 0 else size_of(meta, i, d) if size_of else 1
                      for i, d in enumerate(meta.shape))
        dtype = _ORT_DTYPES.get(meta.type)
        if dtype is None:
            raise ValueError(f"input {meta.name!r}: cannot generate random data for type {meta.type}")
        if np.issubdtype(dtype, np.floating):
            feed[meta.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feed[meta.name] = np.zeros(shape, dtype=dtype)
        else:
            feed[meta.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feed
