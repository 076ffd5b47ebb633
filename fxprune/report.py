"""The pruning report: per-layer widths and sparsity, params and MACs before/after."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Report", "LayerRow", "build_report"]


@dataclass
class LayerRow:
    name: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int

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
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def build_report(pruning, params_before, params_after, macs_before, macs_after) -> Report:
    keep_len = {}
    for g in pruning.groups:
        keep = pruning._kept[g.index]
        for m in g.parameters:
            import numpy as np

            kept = int(np.where(m.atoms >= 0, keep[np.maximum(m.atoms, 0)], True).sum())
            keep_len[(m.name, m.dim)] = kept
    rows = []
    for name, p in pruning.model.named_parameters():
        if p.dim() < 2:
            continue
        rows.append(LayerRow(name.rpartition(".")[0] or name, p.shape[0], keep_len.get((name, 0), p.shape[0]),
                             p.shape[1], keep_len.get((name, 1), p.shape[1])))
    return Report(rows, params_before, params_after, macs_before, macs_after, pruning.sparsity, len(pruning.groups),
                  dict(pruning.grouping.blocked), [n for p in pruning.pruners for n in p.notes])
