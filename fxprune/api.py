"""``fxprune.compile``: capture → group → prune (masks) → compact.

The object it returns owns a masked copy of the user's model (``.model``), the
channel groups (``.groups``), the pruners and their schedules, and the training
loop hooks. Masks live on the eager model while it trains; ``compact()`` does the
surgery once, on the captured graph, and checks it against the masked model.
"""

from __future__ import annotations

import copy
import numbers
import re
import types
import warnings

import numpy as np
import torch
import torch.utils._pytree as pytree

from fxprune.config import PruningConfig, parse_config
from fxprune.errors import CompactionError, ConfigError, PruningError
from fxprune.norms import sync_norms
from fxprune.passes.compact import check_shapes, compact_graph, space_keep
from fxprune.passes.couplings import is_norm_class
from fxprune.passes.group import Group, Grouping, group_channels
from fxprune.passes.macs import count_macs, count_params
from fxprune.passes.shapes import flat_inputs, grown_inputs
from fxprune.passes.trace import Captured, capture
from fxprune.pruners import Pruner, get_pruner
from fxprune.report import Report, build_report

__all__ = ["compile", "Pruning"]


def compile(model: torch.nn.Module, example_inputs: tuple, config: dict | PruningConfig | None = None, *,
            example_kwargs: dict | None = None, dynamic_shapes=None, inplace: bool = False) -> "Pruning":
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
    configs = parse_config(config)
    work = model if inplace else copy.deepcopy(model)
    captured = capture(work, example_inputs, example_kwargs, dynamic_shapes)
    grouping = group_channels(captured.graph_module)
    _warn_dynamic_freezes(grouping, {n for n, _ in work.named_parameters(remove_duplicate=False)})
    return Pruning(work, captured, grouping, configs)


def _warn_dynamic_freezes(grouping: Grouping, parameters: set[str]) -> None:
    """Channels a static capture could prune but a dynamic dim blocks (heads merged with the batch): say so."""
    lost = sorted((k, v) for k, v in grouping.blocked.items() if "dynamic" in v and k[0] in parameters)
    if lost:
        (name, dim), reason = lost[0]
        warnings.warn(f"{len(lost)} parameter dims cannot be pruned because a dynamic input dim reaches them "
                      f"(e.g. {name}[{dim}]: {reason}); pass dynamic_shapes={{}} to capture at the example's "
                      "shapes and prune them, at the cost of a compact model fixed to those shapes",
                      UserWarning, stacklevel=3)


class Pruning:
    """A model being pruned: masks, pruners, hooks, and the compact pass."""

    def __init__(self, model: torch.nn.Module, captured: Captured, grouping: Grouping, configs: list[PruningConfig]):
        self.model = model
        self.captured = captured
        self.grouping = grouping
        self.configs = configs
        self.groups: list[Group] = grouping.groups
        self.example_inputs = captured.example_inputs
        self.example_kwargs = captured.example_kwargs
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._kept = {g.index: np.ones(g.size, dtype=bool) for g in self.groups}
        self.pruners: list[Pruner] = self._make_pruners()
        self.masks: dict[str, torch.Tensor] = {}
        self._pruned: dict[str, torch.Tensor] = {}
        self._element_masks: dict[str, torch.Tensor] = {}
        self.global_step = 0
        self._training = False
        self.compact_error: float | None = None  # max abs error of the last checked compact()

    # -- set-up -------------------------------------------------------------------------
    def _layer_names(self) -> set[str]:
        return {name.rpartition(".")[0] for name in self._params}

    def _matches(self, group: Group, patterns) -> bool:
        return any(re.search(p, m.name.rpartition(".")[0]) for m in group.parameters for p in patterns)

    def _make_pruners(self) -> list[Pruner]:
        layers = self._layer_names()
        claimed: set[int] = set()
        pruners = []
        for i, cfg in enumerate(self.configs):
            for key in ("names", "excluded_names"):
                for pat in getattr(cfg, key):
                    if not any(re.search(pat, layer) for layer in layers):
                        raise ConfigError(f"{key} pattern {pat!r} matches no layer of the model "
                                          f"(layers look like {sorted(layers)[:3]})")
            chosen, open_groups = [], []
            for g in self.groups:
                if g.index in claimed:
                    continue
                if g.normalized and not cfg.prune_hidden_size:
                    continue  # LayerNorm/RMSNorm statistics span it: pruned only on request
                open_groups.append(g)
                if cfg.names and not self._matches(g, cfg.names):
                    continue
                if cfg.excluded_names and self._matches(g, cfg.excluded_names):
                    continue
                if cfg.prune_layer_type and not self._has_type(g, cfg.prune_layer_type):
                    continue
                chosen.append(g)
            if cfg.parsed_pattern.is_channel and open_groups and not chosen:
                raise ConfigError(self._why_nothing_selected(i, cfg, open_groups))
            if cfg.parsed_pattern.is_channel:
                claimed |= {g.index for g in chosen}
                modules = {m.name: self._params[m.name] for g in chosen for m in g.parameters if m.name in self._params}
            else:
                modules, chosen = self._element_modules(cfg), []
            if cfg.prune_hidden_size and not any(g.normalized for g in self.groups):
                raise ConfigError(f"prune_hidden_size=True, but no channel group of this model is spanned by "
                                  f"LayerNorm/RMSNorm statistics: {self._why_no_hidden_size()}")
            pruners.append(get_pruner(modules, cfg, chosen))
        self._claimed = claimed
        return pruners

    def _why_nothing_selected(self, i: int, cfg: PruningConfig, open_groups: list[Group]) -> str:
        """Why pruner ``i``'s filters leave it no channel group, filter by filter."""
        where = f"pruners[{i}]" if len(self.configs) > 1 else "the config"
        reasons = []
        if cfg.names:
            n = sum(self._matches(g, cfg.names) for g in open_groups)
            reasons.append(f"names {list(cfg.names)} match {n} of them")
        if cfg.excluded_names:
            n = sum(self._matches(g, cfg.excluded_names) for g in open_groups)
            reasons.append(f"excluded_names {list(cfg.excluded_names)} exclude {n}")
        if cfg.prune_layer_type:
            classes = sorted({type(self.model.get_submodule(m.name.rpartition(".")[0])).__name__
                              for g in open_groups for m in g.parameters if "." in m.name})
            n = sum(self._has_type(g, cfg.prune_layer_type) for g in open_groups)
            reasons.append(f"prune_layer_type {list(cfg.prune_layer_type)} matches {n} (the layers of these groups "
                           f"are {', '.join(classes)}; class names are case-sensitive)")
        return (f"{where} selects no channel group, so prune() would do nothing: {len(open_groups)} groups are "
                f"prunable, but {'; '.join(reasons)}. See pruning.groups or fxprune.explain for what they hold")

    def _why_no_hidden_size(self) -> str:
        norms = [n for n, m in self.model.named_modules() if n and is_norm_class(type(m).__name__)]
        for layer in norms:
            reason = self.grouping.blocked.get((f"{layer}.weight", 0))
            if reason:
                return f"{layer}.weight is frozen ({reason})"
        if norms:
            return f"its norm layers ({', '.join(norms[:3])}) span no prunable channels; see fxprune.explain"
        return "it has no LayerNorm/RMSNorm modules"

    def _element_modules(self, cfg: PruningConfig) -> dict[str, torch.nn.Parameter]:
        """Weights that NxM / N:M patterns apply to: conv and linear weights (or prune_layer_type)."""
        types = set(cfg.prune_layer_type) or {"Linear", "Conv1d", "Conv2d", "Conv3d"}
        out = {}
        for layer, module in self.model.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.nn.Parameter) or w.dim() < 2 or type(module).__name__ not in types:
                continue
            if cfg.names and not any(re.search(p, layer) for p in cfg.names):
                continue
            if cfg.excluded_names and any(re.search(p, layer) for p in cfg.excluded_names):
                continue
            out[f"{layer}.weight" if layer else "weight"] = w
        return out

    def _has_type(self, group: Group, types) -> bool:
        for m in group.parameters:
            layer = m.name.rpartition(".")[0]
            try:
                cls = type(self.model.get_submodule(layer)).__name__
            except AttributeError:
                continue
            if cls in types:
                return True
        return False

    # -- masks --------------------------------------------------------------------------
    @property
    def kept_channels(self) -> dict[int, np.ndarray]:
        """Group index -> indices of the channels kept."""
        return {g: np.flatnonzero(k) for g, k in self._kept.items()}

    def set_kept(self, kept: dict[int, np.ndarray]) -> None:
        """Replace the kept channels of some groups (boolean masks) and re-mask the model."""
        for g, mask in kept.items():
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != self._kept[g].shape:
                raise PruningError(f"group {g} has {self._kept[g].size} channels, got a mask of shape {mask.shape}")
            if not mask.any():
                raise PruningError(f"{self.groups[g].describe()} would lose all its channels; keep at least one")
            for part in self.groups[g].parts:
                if not mask[part].any():
                    raise PruningError(f"{self.groups[g].describe()}: channels {part.tolist()} form one tensor "
                                       "(e.g. a concat branch) and would all be removed; keep at least one")
        for g, mask in kept.items():
            self._kept[g] = np.asarray(mask, dtype=bool).copy()
        self._build_masks()
        self.apply_masks()

    def _build_masks(self) -> None:
        masks: dict[str, torch.Tensor] = {}
        for g in self.groups:
            keep = self._kept[g.index]
            if keep.all():
                continue
            for m in g.parameters:
                p = self._params.get(m.name)
                if p is None:
                    continue
                along = torch.from_numpy(np.where(m.atoms >= 0, keep[np.maximum(m.atoms, 0)], True))
                shape = [1] * p.dim()
                shape[m.dim] = -1
                mask = along.view(shape).expand_as(p)
                masks[m.name] = mask if m.name not in masks else masks[m.name] & mask
        for name, mask in self._element_masks.items():
            masks[name] = mask if name not in masks else masks[name] & mask
        self.masks = {k: v.contiguous().to(self._params[k].device) for k, v in masks.items()}
        # masked_fill_ with a stored inverse is ~2.7x faster than mul_ by a bool mask (no float copy of
        # the mask per call) and leaves pruned weights exactly zero even if they went NaN
        self._pruned = {k: ~v for k, v in self.masks.items()}
        for pruner in self.pruners:
            pruner.masks = {k: self.masks.get(k, torch.ones_like(v, dtype=torch.bool)) for k, v in pruner.modules.items()}
        if any(g.normalized for g in self.groups):
            sync_norms(self.model, self.grouping, space_keep(self.grouping, self._atom_kept()))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned channels of every member parameter."""
        for name, pruned in self._pruned.items():
            self._params[name].masked_fill_(pruned, 0)

    @property
    def sparsity(self) -> float:
        """Fraction of channels removed, over the groups the pruners work on and any group pruned by hand."""
        kept = [k for g, k in self._kept.items() if g in self._claimed or not k.all()]
        total = sum(k.size for k in kept)
        return float(sum((~k).sum() for k in kept) / total) if total else 0.0

    @property
    def weight_sparsity(self) -> float:
        """Fraction of zeroed elements over the masked parameters (what NxM / N:M patterns are measured by)."""
        total = sum(self._params[k].numel() for k in self.masks)
        return float(sum((~m).sum() for m in self.masks.values()) / total) if total else 0.0

    def _atom_kept(self) -> np.ndarray:
        kept = np.ones(len(self.grouping.atom_group), dtype=bool)
        valid = self.grouping.atom_group >= 0
        idx = np.flatnonzero(valid)
        kept[idx] = [self._kept[g][c] for g, c in zip(self.grouping.atom_group[idx], self.grouping.atom_local[idx])]
        return kept

    # -- one-shot -----------------------------------------------------------------------
    def prune(self, sparsity: float | None = None) -> "Pruning":
        """One-shot pruning: every pruner prunes up to its target now (or to ``sparsity``, in [0, 1))."""
        if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real)
                                     or not 0.0 <= sparsity < 1.0):
            raise ValueError(f"prune(sparsity) takes a number in [0, 1), got {sparsity!r}; 0.5 removes half "
                             "the channels")
        for pruner in self.pruners:
            target = pruner.target_sparsity_ratio if sparsity is None else sparsity
            self._step_pruner(pruner, target)
        return self

    def _step_pruner(self, pruner: Pruner, target: float) -> None:
        if pruner.pattern.is_channel:
            self.set_kept(pruner.select(target))
        else:
            self._element_masks.update({k: v.to(torch.bool) for k, v in pruner.element_masks(target).items()})
            self._build_masks()
            self.apply_masks()
        pruner.current_sparsity_ratio = target
        pruner.on_pruning_step()

    def _require_channel(self, what: str) -> None:
        for cfg in self.configs:
            if not cfg.parsed_pattern.is_channel:
                raise ConfigError(f"{what}() cannot shrink pattern {cfg.pattern!r}: NxM and N:M patterns zero "
                                  "weights inside layers (masks only, see pruning.masks); use 'channelx1' "
                                  "to remove whole channels")

    # -- training-loop hooks --------------------------------------------------------------
    def on_train_begin(self) -> None:
        """Start of fine-tuning: masks are applied so training starts from the masked model."""
        self._training = True
        self.apply_masks()

    def _require_training(self, hook: str) -> None:
        if not self._training:
            raise PruningError(f"{hook}() was called before on_train_begin(); call on_train_begin() (or "
                               "attach(optimizer)) once before the training loop")

    def on_epoch_begin(self, epoch: int | None = None) -> None:
        """Nothing to do; present so every hook of the reference exists."""

    def on_step_begin(self, step: int | None = None) -> None:
        """Prune if ``step`` is one of a pruner's pruning steps (then masks change)."""
        self._require_training("on_step_begin")
        if step is not None:
            self.global_step = step
        for pruner in self.pruners:
            pruner.global_step = self.global_step
            if pruner.scheduler.is_pruning_step(self.global_step):
                self._step_pruner(pruner, pruner.scheduler.sparsity(self.global_step))

    def on_before_optimizer_step(self) -> None:
        """Scores from this step's gradients, then gradients of pruned weights are zeroed."""
        self._require_training("on_before_optimizer_step")
        for pruner in self.pruners:
            pruner.on_before_optimizer_step()
        for name, pruned in self._pruned.items():
            grad = self._params[name].grad
            if grad is not None:
                grad.masked_fill_(pruned, 0)

    def on_after_optimizer_step(self) -> None:
        """Re-zero pruned weights (momentum or weight decay may have moved them); count the step."""
        self._require_training("on_after_optimizer_step")
        self.apply_masks()
        self.global_step += 1

    def on_step_end(self) -> None:
        """Nothing to do; present so every hook of the reference exists."""

    def on_epoch_end(self) -> None:
        """Nothing to do; present so every hook of the reference exists."""

    def on_train_end(self) -> None:
        """End of fine-tuning: masks applied once more."""
        self._require_training("on_train_end")
        self._training = False
        self.apply_masks()

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Wire every hook into a plain loop through ``optimizer.step``.

        After ``attach``, each ``optimizer.step()`` runs ``on_before_optimizer_step``,
        the real step, ``on_after_optimizer_step`` and the next ``on_step_begin``.
        """
        if getattr(optimizer, "_fxprune_attached", None) is not None:
            raise PruningError("this optimizer is already attached: a second attach() would run every hook twice "
                               "per step (the schedule twice as fast)")
        own = {id(p) for p in self.model.parameters()}
        theirs = [p for group in optimizer.param_groups for p in group["params"]]
        if theirs and not any(id(p) in own for p in theirs):
            raise PruningError("the optimizer holds none of pruning.model's parameters, so the masked model would "
                               "never train; build it from pruning.model.parameters()")
        step = optimizer.step
        pruning = self

        def hooked_step(opt, *args, **kwargs):
            pruning.on_before_optimizer_step()
            out = step(*args, **kwargs)
            pruning.on_after_optimizer_step()
            pruning.on_step_end()
            pruning.on_step_begin()
            return out

        # a bound method, as LR schedulers expect (they wrap optimizer.step.__func__); keep the mark a
        # scheduler created earlier left on step, or it warns that step was overridden
        if getattr(step, "_wrapped_by_lr_sched", False):
            hooked_step._wrapped_by_lr_sched = True
        optimizer.step = types.MethodType(hooked_step, optimizer)
        optimizer._fxprune_attached = self
        self.on_train_begin()
        self.on_step_begin()
        return optimizer

    # -- compaction ---------------------------------------------------------------------
    def compact(self, check: bool = True, atol: float = 1e-4) -> torch.fx.GraphModule:
        """Physically remove the pruned channels; returns a smaller graph module.

        The result is checked node by node (shapes) and against the masked model's
        outputs on the example inputs: max abs error <= ``atol * max(1, max|y|)``.
        """
        self._require_channel("compact")
        if all(k.all() for k in self._kept.values()):
            raise PruningError("nothing is pruned yet: call prune(), set_kept() or fine-tune with the hooks "
                               "before compact()")
        self.apply_masks()  # weights changed outside the hooks (own loop, loaded checkpoint) are masked again
        state = dict(self.model.state_dict(keep_vars=False))
        small = compact_graph(self.captured.graph_module, self.grouping, self._atom_kept(), state)
        if check:
            check_shapes(small, flat_inputs(self.example_inputs, self.example_kwargs))
            self.compact_error = self._compare(small, atol)
            grown = grown_inputs(self.captured.graph_module, self.example_inputs, self.example_kwargs)
            if grown is not None:  # sizes that follow dynamic dims are checked at a second shape
                try:
                    self.compact_error = max(self.compact_error, self._compare(small, atol, *grown))
                except CompactionError as err:
                    raise CompactionError(f"{err} (at the example grown by one along its dynamic dims: "
                                          f"{[tuple(t.shape) for t in flat_inputs(*grown) if isinstance(t, torch.Tensor)]})"
                                          ) from err
        return small

    def compact_eager(self, atol: float = 1e-4) -> torch.nn.Module:
        """Remove pruned channels from a copy of the model's own class (see :mod:`fxprune.eager`).

        Sizes in module attributes (and a Hugging Face config, when pruning kept layers
        uniform) are updated; outputs are checked against the masked model.
        """
        from fxprune.eager import compact_eager

        self._require_channel("compact_eager")
        self.apply_masks()
        return compact_eager(self, atol)

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
                    raise CompactionError(f"output {i}: compact model differs from the masked model by {err:.3g} "
                                          f"(tolerance {atol * scale:.3g})")
                worst = max(worst, err)
        return worst

    # -- reporting ----------------------------------------------------------------------
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
        from fxprune.plan import plan_of

        return plan_of(self)

    def save_plan(self, path) -> None:
        from fxprune.plan import save_plan

        save_plan(self, path)

    def apply_plan(self, plan) -> "Pruning":
        """Apply a plan (dict or JSON path) made on another copy of the same model."""
        from fxprune.plan import apply_plan, load_plan

        apply_plan(self, load_plan(plan) if not isinstance(plan, dict) else plan)
        return self

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks' source (kept channels per group), pruner scores and the step."""
        return {"kept": {g: torch.from_numpy(k.copy()) for g, k in self._kept.items()},
                "element_masks": {k: v.clone() for k, v in self._element_masks.items()},
                "global_step": self.global_step, "pruners": [p.state_dict() for p in self.pruners]}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("kept", "global_step", "pruners") if not isinstance(state, dict) or k not in state]
        if missing:
            raise PruningError(f"not a pruning state: {', '.join(missing)} missing (expected what "
                               "Pruning.state_dict() returns)")
        if set(state["kept"]) != set(self._kept):
            raise PruningError("state was saved for a model with different groups")
        self.global_step = state["global_step"]
        for pruner, ps in zip(self.pruners, state["pruners"]):
            pruner.load_state_dict(ps)
        self._element_masks = {k: v.clone() for k, v in state.get("element_masks", {}).items()}
        self.set_kept({g: np.asarray(k, dtype=bool) for g, k in state["kept"].items()})


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
