"""``fxprune.compile``: capture → group → prune (masks) → compact.

The object it returns owns a masked copy of the user's model (``.model``), the
channel groups (``.groups``), the pruners and their schedules, and the training
loop hooks. Masks live on the eager model while it trains; ``compact()`` does the
surgery once, on the captured graph, and checks it against the masked model.
"""

from __future__ import annotations

import copy
import warnings

import torch

from fxprune.assignment import assign_pruners
from fxprune.calibration import Calibration
from fxprune.compaction import Compaction
from fxprune.config import PruningConfig, parse_config
from fxprune.masking import Masking
from fxprune.passes.group import Group, Grouping, group_channels
from fxprune.passes.trace import Captured, capture, random_advice
from fxprune.progress import stages

__all__ = ["compile", "Pruning"]


def compile(model: torch.nn.Module, example_inputs: tuple, config: dict | PruningConfig | None = None, *,
            example_kwargs: dict | None = None, dynamic_shapes=None, inplace: bool = False,
            progress: bool | None = None) -> "Pruning":
    """Prepare ``model`` for structured pruning.

    Parameters
    ----------
    model : the model to prune. It is copied unless ``inplace=True``.
    example_inputs : a tuple of positional arguments the model runs on; capture
        and the compaction check use them.
    example_kwargs : keyword arguments to pass as well (``attention_mask=...``); each
        tensor becomes an input of the compact graph, its ``.pt2`` and its ONNX file.
    dynamic_shapes : which input dims may vary, as ``torch.export.export`` takes it
        (``{"input_ids": {0: Dim("batch"), 1: Dim("seq")}}``). Default: the batch
        (dim 0 of the tensor inputs) where the model allows it, else static with a warning.
    config : INC-style pruning config (see :class:`fxprune.config.PruningConfig`);
        keys given at top level apply to every entry of ``pruners``.
    inplace : prune the user's own model instead of a copy.
    progress : a progress bar over capture and grouping; default: when stderr is a terminal.

    Returns
    -------
    Pruning

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> p = fxprune.compile(net, (torch.randn(1, 8),), {"target_sparsity": 0.5, "pattern": "channelx1"})
    >>> small = p.prune().compact()
    >>> small.get_parameter("0.weight").shape
    torch.Size([8, 8])
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxprune.compile takes a torch.nn.Module, got {type(model).__name__}; pass the model "
                        "object itself (e.g. the result of MyNet() or from_pretrained)")
    _refuse_meta(model)
    configs = parse_config(config)
    work = model if inplace else copy.deepcopy(model)
    with stages("compile", ["capture (torch.export)", "group channels"], progress) as next_stage:
        next_stage()
        captured = capture(work, example_inputs, example_kwargs, dynamic_shapes)
        next_stage()
        grouping = group_channels(captured.graph_module)
    _warn_dynamic_freezes(grouping, {n for n, _ in work.named_parameters(remove_duplicate=False)})
    _warn_random(captured.graph_module)
    return Pruning(work, captured, grouping, configs)


def _refuse_meta(model: torch.nn.Module) -> None:
    """A model built on the meta device (``with torch.device("meta")``) has shapes but no values: there is
    nothing to score, capture or compare, so it is refused before anything is copied."""
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{type(model).__name__} has {len(meta)} parameters or buffers on the meta device (e.g. "
                         f"{meta[0]}): they have shapes but no values, so there is nothing to prune by; load or "
                         "initialise the weights first, e.g. model.to_empty(device='cpu') then load a state dict")


def _warn_dynamic_freezes(grouping: Grouping, parameters: set[str]) -> None:
    """Channels a static capture could prune but a dynamic dim blocks (heads merged with the batch): say so."""
    lost = sorted((k, v) for k, v in grouping.blocked.items() if "dynamic" in v and k[0] in parameters)
    if lost:
        (name, dim), reason = lost[0]
        warnings.warn(f"{len(lost)} parameter dims cannot be pruned because a dynamic input dim reaches them "
                      f"(e.g. {name}[{dim}]: {reason}); pass dynamic_shapes={{}} to capture at the example's "
                      "shapes and prune them, at the cost of a compact model fixed to those shapes",
                      UserWarning, stacklevel=3)


def _warn_random(graph_module) -> None:
    """A forward that draws random numbers cannot be checked: compact() compares two runs on the example."""
    advice = random_advice(graph_module)
    if advice:
        warnings.warn(f"{advice}; compact() compares the compact model with the masked one on the example, which "
                      "fails until then", UserWarning, stacklevel=3)


class Pruning(Masking, Compaction, Calibration):
    """A model being pruned: masks, pruners, hooks, and the compact pass.

    Built from parts that each hold one concern: :func:`~fxprune.assignment.assign_pruners`
    decides once which pruner owns which group; :class:`~fxprune.masking.Masking` holds the
    kept channels and masks and the steps and hooks that change them;
    :class:`~fxprune.compaction.Compaction` turns them into a checked compact model, the
    report and plans.
    """

    def __init__(self, model: torch.nn.Module, captured: Captured, grouping: Grouping, configs: list[PruningConfig]):
        self.model = model
        self.captured = captured
        self.grouping = grouping
        self.configs = configs
        self.groups: list[Group] = grouping.groups
        self.example_inputs = captured.example_inputs
        self.example_kwargs = captured.example_kwargs
        self.pruners, self._claimed = assign_pruners(model, grouping, configs)
        self._init_masks()
        self.compact_error: float | None = None  # max abs error of the last checked compact()
