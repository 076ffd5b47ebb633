"""Pictures of a pruning run: per-layer widths of a report, and the helpers every picture shares.

matplotlib is the optional ``plot`` extra, so it is imported only when a picture is drawn, and always
with the Agg backend: pictures are files, and a display backend fails on a server.
"""

from __future__ import annotations

import os
from itertools import groupby

__all__ = ["pyplot", "save_figure", "plot_report", "short_count"]

_BEFORE, _AFTER = "#c7c7c7", "#1f77b4"


def pyplot(what: str = "drawing"):
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError that says which extra to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"{what} needs matplotlib, which is not installed ({err}): pip install fxprune[plot] "
                          "(in a clone: pip install -e '.[plot]')") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, **kwargs) -> None:
    """Write ``fig`` to ``path`` (its folder created; or a file object) and free it, whatever happens."""
    plt = pyplot()
    if isinstance(path, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    try:
        fig.savefig(path, **kwargs)
    finally:
        plt.close(fig)


def short_count(n: float) -> str:
    """``8831296`` -> ``8.83M``: titles stay one line."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def plot_report(report, path, dpi: int = 100) -> None:
    """Widths of every layer before and after pruning (out and in dims), layers grouped by block in model order.

    The title carries the totals (params and MACs before/after), so the picture stands on its own.
    """
    plt = pyplot()
    rows = report.layers
    if not rows:
        raise ValueError("the report has no layers (no weight with 2 or more dims) to draw")
    blocks = [(block, list(run)) for block, run in groupby(rows, key=lambda r: r.block)]
    x, spans, i = [], [], 0.0
    for block, run in blocks:
        start = i
        for _ in run:
            x.append(i)
            i += 1
        spans.append((block, start - 0.5, i - 0.5))
        i += 0.6  # a gap between blocks
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(min(max(6.0, 0.3 * len(rows) + 2.0), 40.0), 5.6))
    for ax, side in zip(axes, ("out", "in")):
        before = [getattr(r, f"{side}_before") for r in rows]
        after = [getattr(r, f"{side}_after") for r in rows]
        ax.bar([v - 0.2 for v in x], before, 0.4, color=_BEFORE, label="before")
        ax.bar([v + 0.2 for v in x], after, 0.4, color=_AFTER, label="after")
        if max(before) > 50 * max(1, sorted(before)[len(before) // 2]):
            ax.set_yscale("log")  # a vocabulary-sized embedding would flatten every other bar
        ax.set_ylabel(f"{side}put width (dim {0 if side == 'out' else 1})")
        for k, (block, lo, hi) in enumerate(spans):
            if k % 2:
                ax.axvspan(lo, hi, color="#f2f2f2", zorder=0)
        ax.margins(x=0.01)
    for block, lo, hi in spans:
        if block:
            axes[0].annotate(block, ((lo + hi) / 2, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                             textcoords="offset points", ha="center", va="bottom", fontsize=7, color="#555555")
    axes[0].legend(loc="upper left", fontsize=8, frameon=False)
    axes[1].set_xticks(x, [_relative(r.name, r.block) for r in rows], rotation=90, fontsize=7)
    fig.suptitle(f"params {short_count(report.params_before)} → {short_count(report.params_after)} "
                 f"({report.params_ratio:.2f}x smaller), MACs {short_count(report.macs_before)} → "
                 f"{short_count(report.macs_after)} ({report.macs_ratio:.2f}x fewer)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)


def _relative(name: str, block: str) -> str:
    return name[len(block) + 1:] if block and name.startswith(block + ".") else name
