"""The pruning report: per-layer widths and sparsity, params and MACs before/after."""

from __future__ import annotations

from dataclasses import dataclass, field

from fxprune.assignment import norm_spanned
from fxprune.latency import setting
from fxprune.passes.compact import space_keep
from fxprune.passes.couplings import PARAM_PREFIX

__all__ = ["Report", "LayerRow", "build_report", "layer_of", "block_of"]


def layer_of(parameter: str) -> str:
    """The module that owns ``parameter`` (its own name for a top-level one): what a user calls a layer."""
    return parameter.rpartition(".")[0] or parameter


def block_of(layer: str) -> str:
    """The repeated block a layer is in: its path up to the first index that is not the layer itself.

    ``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``; ``layer1.0.conv1`` -> ``layer1.0``;
    without such an index, the top-level module (``features.3`` -> ``features``), or ``""`` for a
    top-level layer. Pictures group layers by it, so a block reads as one unit.
    """
    parts = layer.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0] if len(parts) > 1 else ""


@dataclass
class LayerRow:
    """Widths of one weight (2-D or more), before and after pruning: dim 0 (out) and dim 1 (in), or dims 1 and 2
    of a module's own 3-D tensor (stacked experts, ``[experts, out, in]``; GPT-OSS stores ``[experts, in, out]``,
    shown as stored), whose row is named by the tensor."""

    name: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int
    parameter: str = ""  # the weight these widths are of, e.g. ``conv1.weight``

    @property
    def block(self) -> str:
        return block_of(self.name)

    @property
    def sparsity(self) -> float:
        before = self.out_before * self.in_before
        return 1.0 - (self.out_after * self.in_after) / before if before else 0.0


@dataclass
class Report:
    layers: list[LayerRow]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channel_sparsity: float
    groups: int
    blocked: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # requests adjusted to be feasible (a target, round_to), per pruner
    latency: list = field(default_factory=list)  # measured compact latency under a latency target (latency_checks)

    @property
    def macs_ratio(self) -> float:
        """Dense MACs / compact MACs: the ideal speedup."""
        return self.macs_before / self.macs_after if self.macs_after else float("inf")

    @property
    def params_ratio(self) -> float:
        return self.params_before / self.params_after if self.params_after else float("inf")

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'out':>11}  {'in':>11}  {'sparsity':>8}"]
        for r in self.layers:
            lines.append(f"{r.name:<{w}}  {r.out_before:>5}→{r.out_after:<5}  {r.in_before:>5}→{r.in_after:<5}"
                         f"  {r.sparsity:>8.1%}")
        lines.append(f"groups: {self.groups}, channel sparsity: {self.channel_sparsity:.1%}")
        lines.append(f"params: {self.params_before:,} → {self.params_after:,} ({self.params_ratio:.2f}x smaller)")
        lines.append(f"MACs:   {self.macs_before:,} → {self.macs_after:,} ({self.macs_ratio:.2f}x fewer)")
        for c in (c for c in self.latency if c.get("kept")):
            lines.append(f"latency: {c['dense_ms']:.2f} ms → {c['compact_ms']:.2f} ms measured "
                         f"({c['measured_speedup']:.2f}x; target {c['target_speedup']:.2f}x, predicted "
                         f"{c['predicted_speedup']:.2f}x; {setting(c['threads'], c['batch'])})")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Draw the per-layer widths before/after, grouped by block (needs ``pip install fxprune[plot]``)."""
        from fxprune.plots import plot_report

        plot_report(self, path)


def build_report(pruning, params_before, params_after, macs_before, macs_after) -> Report:
    """Widths come from the same keep masks the compact graph is sliced with, so they are its shapes."""
    keep = space_keep(pruning.grouping, pruning._atom_kept())

    def width(name: str, dim: int, size: int) -> int:
        mask = keep.get((PARAM_PREFIX + name, dim))
        return size if mask is None else int(mask.sum())

    rows = []
    for name, p in pruning.model.named_parameters():
        if p.dim() < 2:
            continue
        label, out, into = layer_of(name), 0, 1
        if not name.endswith("weight"):  # a module's own tensors, e.g. stacked experts' gate_up_proj and down_proj
            label = name
            if p.dim() == 3:  # [experts, out, in]: the widths of each expert's matrix
                out, into = 1, 2
        rows.append(LayerRow(label, p.shape[out], width(name, out, p.shape[out]), p.shape[into],
                             width(name, into, p.shape[into]), name))
    notes = [n for p in pruning.pruners for n in p.notes]
    left_out = _hidden_size_left_out(pruning)
    if left_out:
        notes.append(left_out)
    return Report(rows, params_before, params_after, macs_before, macs_after, pruning.sparsity, len(pruning.groups),
                  dict(pruning.grouping.blocked), notes, [dict(c) for c in getattr(pruning, "latency_checks", [])])


def _hidden_size_left_out(pruning) -> str | None:
    """Say that groups a norm spans (the hidden size) were left out because no pruner asked for them:
    a user comparing with a tool that prunes them by default should know it is one key away."""
    if any(p.config.prune_hidden_size for p in pruning.pruners) or not any(
            p.config.parsed_pattern.is_channel for p in pruning.pruners):
        return None
    spanned, where = norm_spanned(pruning.grouping)
    if not spanned:
        return None
    return (f"{len(spanned)} group{'s' if len(spanned) > 1 else ''} of {', '.join(str(g.size) for g in spanned[:4])}"
            f"{', …' if len(spanned) > 4 else ''} channels spanned by norm statistics (a transformer's hidden "
            f"size; in {where}) "
            f"{'are' if len(spanned) > 1 else 'is'} not in the budget: prune_hidden_size=True adds "
            f"{'them' if len(spanned) > 1 else 'it'} (README, Pruning the hidden size)")
