"""What a pruning run produces: the compact model, checked; the report; plans.

Compaction happens once, at the end, from the kept channels (:mod:`fxprune.masking`):
``compact()`` on the captured graph, ``compact_eager()`` on the user's own class. Both
are checked against the masked model, because a compact model that computes something
else must fail loudly here rather than later, in deployment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.utils._pytree as pytree

from fxprune import eager
from fxprune import plan as plans
from fxprune.assignment import why_nothing_prunable
from fxprune.errors import CompactionError, ConfigError, PruningError
from fxprune.passes.compact import check_shapes, compact_graph, space_keep
from fxprune.passes.macs import count_macs, count_params
from fxprune.passes.shapes import flat_inputs, grown_inputs
from fxprune.passes.trace import random_advice
from fxprune.progress import stages
from fxprune.report import Report, build_report

if TYPE_CHECKING:
    from fxprune.api import Pruning

__all__ = ["Compaction"]


class Compaction:
    """Compact models, the report and plans; a part of :class:`fxprune.Pruning`.

    Reads ``model``, ``captured``, ``grouping``, ``configs``, the example inputs and the kept
    channels (``_kept``, ``_atom_kept()``, ``set_kept``) from the object it is part of.
    """

    def _require_channel(self, what: str) -> None:
        for cfg in self.configs:
            if not cfg.parsed_pattern.is_channel:
                raise ConfigError(f"{what}() cannot shrink pattern {cfg.pattern!r}: NxM and N:M patterns zero "
                                  "weights inside layers (masks only, see pruning.masks); use 'channelx1' "
                                  "to remove whole channels")

    def compact(self, check: bool = True, atol: float = 1e-4, progress: bool | None = None) -> torch.fx.GraphModule:
        """Physically remove the pruned channels; returns a smaller graph module.

        The result is checked node by node (shapes) and against the masked model's
        outputs on the example inputs: max abs error <= ``atol * max(1, max|y|)``.
        ``progress``: a bar over the surgery and the checks (default: when stderr is a terminal).
        """
        self._require_channel("compact")
        if all(k.all() for k in self._kept.values()):
            if not self._claimed:
                raise PruningError(why_nothing_prunable(self.grouping, self.configs))
            raise PruningError("nothing is pruned yet: call prune(), set_kept() or fine-tune with the hooks "
                               "before compact()")
        self.apply_masks()  # weights changed outside the hooks (own loop, loaded checkpoint) are masked again
        state = dict(self.model.state_dict(keep_vars=False))
        names = ["remove channels"] + (["check shapes", "compare with the masked model"] if check else [])
        with stages("compact", names, progress) as next_stage:
            next_stage()
            small = compact_graph(self.captured.graph_module, self.grouping, self._atom_kept(), state)
            if check:
                next_stage()
                check_shapes(small, flat_inputs(self.example_inputs, self.example_kwargs))
                next_stage()
                self.compact_error = self._compare(small, atol)
                grown = grown_inputs(self.captured.graph_module, self.example_inputs, self.example_kwargs)
                if grown is not None:  # sizes that follow dynamic dims are checked at a second shape
                    try:
                        self.compact_error = max(self.compact_error, self._compare(small, atol, *grown))
                    except CompactionError as err:
                        shapes = [tuple(t.shape) for t in flat_inputs(*grown) if isinstance(t, torch.Tensor)]
                        raise CompactionError(f"{err} (at the example grown by one along its dynamic dims: "
                                              f"{shapes})") from err
        return small

    def compact_eager(self, atol: float = 1e-4) -> torch.nn.Module:
        """Remove pruned channels from a copy of the model's own class (see :mod:`fxprune.eager`).

        Sizes in module attributes (and a Hugging Face config, when pruning kept layers
        uniform) are updated; outputs are checked against the masked model.
        """
        self._require_channel("compact_eager")
        self.apply_masks()
        keep = space_keep(self.grouping, self._atom_kept())
        return eager.compact_eager(self.model, keep, lambda module: self._compare(module, atol))

    def _compare(self, small: torch.nn.Module, atol: float, args: tuple | None = None,
                 kwargs: dict | None = None) -> float:
        if args is None:
            args, kwargs = self.example_inputs, self.example_kwargs
        with torch.no_grad(), _eval(self.model):
            ref = pytree.tree_leaves(self.model(*args, **kwargs))
        with torch.no_grad():
            out = pytree.tree_leaves(small(*args, **kwargs))
        ref = [r for r in ref if isinstance(r, torch.Tensor)]
        out = [o for o in out if isinstance(o, torch.Tensor)]
        if len(ref) != len(out):
            raise CompactionError(f"compact model returns {len(out)} tensors, the masked model {len(ref)}")
        worst = 0.0
        for i, (r, o) in enumerate(zip(ref, out)):
            if r.shape != o.shape:
                raise CompactionError(f"output {i}: compact shape {tuple(o.shape)} != masked shape {tuple(r.shape)}")
            if r.is_floating_point():
                err = float((r.double() - o.double()).abs().max()) if r.numel() else 0.0
                scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
                if not err <= atol * scale:
                    advice = random_advice(self.captured.graph_module)
                    raise CompactionError(f"output {i}: compact model differs from the masked model by {err:.3g} "
                                          f"(tolerance {atol * scale:.3g})" + (f"; {advice}" if advice else ""))
                worst = max(worst, err)
        return worst

    def report(self) -> Report:
        """Per-layer channels and sparsity, params and MACs before/after."""
        dense = self.captured.graph_module
        small = compact_graph(dense, self.grouping, self._atom_kept(), dict(self.model.state_dict()))
        inputs = flat_inputs(self.example_inputs, self.example_kwargs)
        return build_report(self, count_params(dense), count_params(small),
                            count_macs(dense, inputs), count_macs(small, inputs))

    # -- plans ----------------------------------------------------------------------------
    def plan(self) -> dict:
        """The kept channels of every group as JSON-ready data (see :mod:`fxprune.plan`)."""
        return plans.plan_of(self)

    def save_plan(self, path) -> None:
        plans.save_plan(self, path)

    def apply_plan(self, plan) -> "Pruning":
        """Apply a plan (dict or JSON path) made on another copy of the same model."""
        plans.apply_plan(self, plans.load_plan(plan) if not isinstance(plan, dict) else plan)
        return self


class _eval:
    """Context manager: eval mode inside, the original train/eval flags restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode
