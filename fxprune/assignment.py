"""Which pruner owns which channel group, settled once when pruning is set up.

Each config becomes one pruner; a channel group goes to the first config whose filters
(``names``, ``excluded_names``, ``frozen_names``, ``prune_layer_type``, ``prune_hidden_size``) select it, so
no group is pruned twice. NxM and N:M configs take weights instead of groups. A filter that
matches nothing is refused here, with what each filter matched: a config that selects
nothing would otherwise prune nothing, silently. (How many channels a group keeps is
:mod:`fxprune.selection`'s concern, at every pruning step.)
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import torch

from fxprune.config import PruningConfig
from fxprune.errors import ConfigError
from fxprune.passes.group import Group, Grouping
from fxprune.pruners import Pruner, get_pruner

__all__ = ["assign_pruners", "why_nothing_prunable"]


def assign_pruners(model: torch.nn.Module, grouping: Grouping,
                   configs: list[PruningConfig]) -> tuple[list[Pruner], set[int]]:
    """One pruner per config, and the indices of the channel groups they own."""
    params = dict(model.named_parameters(remove_duplicate=False))
    layers = {name.rpartition(".")[0] for name in params}
    claimed: set[int] = set()
    pruners = []
    for i, cfg in enumerate(configs):
        for key in ("names", "excluded_names", "frozen_names"):
            for pat in getattr(cfg, key):
                if not any(re.search(pat, layer) for layer in layers):
                    raise ConfigError(f"{key} pattern {pat!r} matches no layer of the model "
                                      f"(layers look like {sorted(layers)[:3]})")
        chosen, open_groups = [], []
        for g in grouping.groups:
            if g.index in claimed:
                continue
            if g.normalized and (not cfg.prune_hidden_size or not g.restrictable):
                continue  # LayerNorm/RMSNorm statistics span it: pruned only on request, and only if exact
            open_groups.append(g)
            if cfg.names and not _matches(g, cfg.names):
                continue
            if cfg.excluded_names and _writes(g, cfg.excluded_names, grouping.called):
                continue
            if cfg.frozen_names and _matches(g, cfg.frozen_names):
                continue
            if cfg.prune_layer_type and not _has_type(model, g, cfg.prune_layer_type):
                continue
            chosen.append(g)
        if cfg.parsed_pattern.is_channel and open_groups and not chosen:
            where = f"pruners[{i}]" if len(configs) > 1 else "the config"
            raise ConfigError(_why_nothing_selected(model, where, cfg, open_groups, grouping.called))
        if cfg.parsed_pattern.is_channel:
            claimed |= {g.index for g in chosen}
            modules = {m.name: params[m.name] for g in chosen for m in g.parameters if m.name in params}
        else:
            modules, chosen = _element_modules(model, cfg), []
        if cfg.prune_hidden_size and not any(g.normalized for g in grouping.groups):
            raise ConfigError(f"prune_hidden_size=True, but no channel group of this model is spanned by "
                              f"LayerNorm/RMSNorm statistics: {_why_no_hidden_size(model, grouping)}")
        pruners.append(get_pruner(modules, cfg, chosen))
    if not claimed and any(cfg.parsed_pattern.is_channel for cfg in configs):
        warnings.warn(f"{why_nothing_prunable(grouping, configs)}; prune() will remove nothing",
                      UserWarning, stacklevel=4)
    return pruners, claimed


def norm_spanned(grouping: Grouping) -> tuple[list[Group], str]:
    """The groups that norm statistics span and that prune on request (``prune_hidden_size``), and the
    first few norm modules that span them, as text."""
    spanned = [g for g in grouping.groups if g.normalized and g.restrictable]
    modules = sorted({site.module for g in spanned for site in g.norms})
    return spanned, f"{', '.join(modules[:3])}{', …' if len(modules) > 3 else ''}"


def why_nothing_prunable(grouping: Grouping, configs: list[PruningConfig]) -> str:
    """Why no channel group is open to any pruner: the groups that need a flag, or why every dim froze."""
    hidden = any(cfg.prune_hidden_size for cfg in configs)
    spanned, where = norm_spanned(grouping)
    stuck = [g for g in grouping.groups if not g.restrictable]
    reasons = []
    if spanned and not hidden:
        reasons.append(f"{len(spanned)} groups are spanned by statistics computed over their channels (in "
                       f"{where}), so they are pruned only with prune_hidden_size=True")
    if stuck:
        reasons.append(f"{len(stuck)} groups are spanned by statistics that cannot be restricted to kept channels "
                       f"({stuck[0].describe()})")
    if not grouping.groups:
        counts = Counter(reason.split(" [")[0].split(": ", 1)[-1] for reason in grouping.blocked.values())
        common = "; ".join(f"{reason} ({n} dims)" for reason, n in counts.most_common(3))
        reasons.append(f"no channel group is free: every parameter dim is frozen, most often by {common}"
                       if counts else "the model has no parameter the graph reads")
    return "no group was prunable with this config: " + "; ".join(reasons) + " (see fxprune.explain)"


def _matches(group: Group, patterns) -> bool:
    return any(re.search(p, m.name.rpartition(".")[0]) for m in group.parameters for p in patterns)


def _writes(group: Group, patterns, called: set[str]) -> bool:
    """The group holds the result of a matching module: excluding a layer keeps its own output width.

    A layer the graph never calls as a module (its weights read by another one) has no result to
    look at; for it, any group holding its parameters counts, as for ``frozen_names``.
    """
    if any(re.search(p, path) for path in group.writers for p in patterns):
        return True
    return any(re.search(p, layer) for m in group.parameters for p in patterns
               if (layer := m.name.rpartition(".")[0]) not in called)


def _has_type(model: torch.nn.Module, group: Group, types) -> bool:
    for m in group.parameters:
        layer = m.name.rpartition(".")[0]
        try:
            cls = type(model.get_submodule(layer)).__name__
        except AttributeError:
            continue
        if cls in types:
            return True
    return False


def _why_nothing_selected(model: torch.nn.Module, where: str, cfg: PruningConfig, open_groups: list[Group],
                          called: set[str]) -> str:
    """Why a config's filters leave it no channel group, filter by filter."""
    reasons = []
    if cfg.names:
        n = sum(_matches(g, cfg.names) for g in open_groups)
        reasons.append(f"names {list(cfg.names)} match {n} of them")
    if cfg.excluded_names:
        n = sum(_writes(g, cfg.excluded_names, called) for g in open_groups)
        reasons.append(f"excluded_names {list(cfg.excluded_names)} exclude {n} (the groups holding those layers' "
                       "outputs)")
    if cfg.frozen_names:
        n = sum(_matches(g, cfg.frozen_names) for g in open_groups)
        reasons.append(f"frozen_names {list(cfg.frozen_names)} exclude {n} (every group they are part of)")
    if cfg.prune_layer_type:
        classes = sorted({type(model.get_submodule(m.name.rpartition(".")[0])).__name__
                          for g in open_groups for m in g.parameters if "." in m.name})
        n = sum(_has_type(model, g, cfg.prune_layer_type) for g in open_groups)
        reasons.append(f"prune_layer_type {list(cfg.prune_layer_type)} matches {n} (the layers of these groups "
                       f"are {', '.join(classes)}; class names are case-sensitive)")
    return (f"{where} selects no channel group, so prune() would do nothing: {len(open_groups)} groups are "
            f"prunable, but {'; '.join(reasons)}. See pruning.groups or fxprune.explain for what they hold")


def _why_no_hidden_size(model: torch.nn.Module, grouping: Grouping) -> str:
    norms = grouping.norm_modules
    for layer in norms:
        reason = grouping.blocked.get((f"{layer}.weight", 0))
        if reason:
            return f"{layer}.weight is frozen ({reason})"
    if norms:
        return f"its norm layers ({', '.join(norms[:3])}) span no prunable channels; see fxprune.explain"
    return "it has no LayerNorm/RMSNorm modules"


def _element_modules(model: torch.nn.Module, cfg: PruningConfig) -> dict[str, torch.nn.Parameter]:
    """Weights that NxM / N:M patterns apply to: conv and linear weights (or prune_layer_type)."""
    types = set(cfg.prune_layer_type) or {"Linear", "Conv1d", "Conv2d", "Conv3d"}
    out = {}
    for layer, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.nn.Parameter) or w.dim() < 2 or type(module).__name__ not in types:
            continue
        if cfg.names and not any(re.search(p, layer) for p in cfg.names):
            continue
        if any(re.search(p, layer) for p in cfg.excluded_names + cfg.frozen_names):
            continue
        out[f"{layer}.weight" if layer else "weight"] = w
    return out
