"""A Hugging Face config that describes a compact model, found by rebuilding the class.

``from_pretrained`` builds the class from ``config.json`` and then loads the weights, so a
compact model reloads only if its config gives every layer its new width. Which config
field sets which weight dim is learnt from the class itself, not from names or widths:
the class is built on the meta device with one field changed at a time, and the weight
dims that move are that field's. New values are solved from the compact weights, and a
candidate config is accepted only if the class built from it, loaded with the compact
weights, computes what the compact model computes (two configs can give equal shapes, e.g.
``heads x head_dim``, and only the outputs tell them apart).
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from dataclasses import dataclass, field

import torch

from fxprune.adapters.hf_attention import head_attribute_values, head_attributes
from fxprune.errors import CompactionError

__all__ = ["ConfigFit", "fit_config", "attach_config", "refuse_save_pretrained"]

# fields that look like widths; others (dropout, eps, vocabulary, positions, image geometry) never change here
_WIDTH = re.compile(r"size|dim|head|embd|inner|ffn|channels|hidden|width|features|rank")
_NOT_WIDTH = re.compile(r"vocab|position|image_size|patch_size|num_channels|window|stride|labels|layers|id$|eps")


@dataclass
class ConfigFit:
    """The outcome: ``config`` describes the compact model (None if no config does); ``problems`` says why not."""

    config: object | None
    changed: dict = field(default_factory=dict)  # field -> (old, new)
    problems: list[str] = field(default_factory=list)


def _fields(config) -> list[tuple[str, int | None]]:
    keys = []
    for name, value in sorted(vars(config).items()):
        if name.startswith("_") or not _WIDTH.search(name) or _NOT_WIDTH.search(name):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            keys.append((name, None))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v > 0 for v in value):
            keys += [(name, i) for i in range(len(value))]
    return keys


def _get(config, key):
    name, i = key
    value = getattr(config, name)
    return value if i is None else value[i]


def _set(config, key, value) -> None:
    name, i = key
    if i is None:
        setattr(config, name, value)
    else:
        values = list(getattr(config, name))
        values[i] = value
        setattr(config, name, type(getattr(config, name))(values))


def _shapes(cls, config) -> dict[str, tuple] | None:
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception:  # this value does not build (e.g. heads that do not divide the hidden size)
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _name(key) -> str:
    return key[0] if key[1] is None else f"{key[0]}[{key[1]}]"


def fit_config(model: torch.nn.Module, original_config, agrees, hints: dict | None = None) -> ConfigFit:
    """Find a config of ``type(model)`` that gives ``model``'s weight shapes and outputs.

    ``original_config`` is the config of the dense model; ``agrees(candidate)`` says whether
    a model built from a candidate config and loaded with ``model``'s weights computes what
    ``model`` computes. ``hints`` (field -> value) are further candidate values, for fields
    whose effect on the weights is not linear (BERT's heads: ``hidden_size // heads`` each).
    """
    cls = type(model)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    base_config = copy.deepcopy(original_config)
    if getattr(base_config, "head_dim", None) is None and isinstance(getattr(base_config, "num_attention_heads", None),
                                                                     int) \
            and isinstance(getattr(base_config, "hidden_size", None), int):
        # read by some classes, and None in some configs (Mixtral): fewer heads must not shrink the head size
        base_config.head_dim = base_config.hidden_size // base_config.num_attention_heads
    base = _shapes(cls, base_config)
    if base is None or set(base) != set(target):
        return ConfigFit(None, problems=[f"{cls.__name__} does not rebuild from its config with the same weights"])
    moved = {(n, d) for n in base for d in range(len(base[n])) if base[n][d] != target[n][d]}
    if not moved:
        return ConfigFit(copy.deepcopy(original_config))
    solved, explains = {}, set()
    fields = _fields(base_config)
    for key in fields:
        v0 = _get(base_config, key)
        for v1 in (2 * v0, v0 + 1):
            probe = copy.deepcopy(base_config)
            _set(probe, key, v1)
            shapes = _shapes(cls, probe)
            if shapes is None or set(shapes) != set(base):
                continue
            dims = {(n, d): (base[n][d], shapes[n][d]) for n in base for d in range(len(base[n]))
                    if base[n][d] != shapes[n][d]}
            if not dims:
                break
            values = set()
            for (n, d), (s0, s1) in dims.items():
                num = (target[n][d] - s0) * (v1 - v0)
                values.add(v0 + num // (s1 - s0) if num % (s1 - s0) == 0 else None)
            if len(values) == 1 and None not in values and values != {v0} and min(values) > 0:
                solved[key] = values.pop()
                explains |= set(dims)
            break
    for name, value in (hints or {}).items():
        if (name, None) in fields and value != getattr(base_config, name):
            solved.setdefault((name, None), value)
    keys = sorted(solved, key=_name)
    for n in range(1, len(keys) + 1):  # fewest changed fields first; outputs decide between equal shapes
        for subset in itertools.combinations(keys, n):
            candidate = copy.deepcopy(base_config)
            for key in subset:
                _set(candidate, key, solved[key])
            if _shapes(cls, candidate) == target and agrees(candidate):
                return ConfigFit(candidate, {_name(k): (_get(base_config, k), solved[k]) for k in subset})
    unexplained = sorted(moved - explains)
    if unexplained:
        layers = ", ".join(f"{n}[{d}]={target[n][d]}" for n, d in unexplained[:4])
        return ConfigFit(None, problems=[
            f"no field of {type(original_config).__name__} gives these widths ({layers}"
            f"{', …' if len(unexplained) > 4 else ''}): layers that play one role now differ, or the class "
            "derives the width from other fields"])
    return ConfigFit(None, problems=[
        f"no combination of {', '.join(_name(k) for k in keys) or 'its width fields'} rebuilds {cls.__name__} "
        "with these weights and the same outputs"])


def attach_config(model: torch.nn.Module, original_config, compare) -> list[str]:
    """Give a compact Hugging Face model the config that rebuilds it; where none does, warn and make
    ``save_pretrained`` refuse, so no checkpoint is written that does not reload. Returns the warnings.

    ``compare(module)`` raises where ``module`` does not compute what the masked model computes.
    """
    if original_config is None or not hasattr(model, "save_pretrained"):
        return []

    def agrees(candidate) -> bool:
        try:
            fresh = type(model)(candidate).eval()
            fresh.load_state_dict(model.state_dict())
            compare(fresh)
        except Exception:
            return False
        # random-init attention is near uniform, so outputs alone can miss a wrong split into heads
        return head_attributes(fresh) == head_attributes(model)

    hints = {k: v.pop() for k, v in head_attribute_values(model).items() if len(v) == 1}
    fit = fit_config(model, original_config, agrees, hints)
    if fit.config is not None:
        model.config = fit.config
        return []
    message = (f"{type(model).__name__}'s config cannot describe the compact widths, so from_pretrained would not "
               f"rebuild it: {'; '.join(fit.problems)}. Prune with uniform_layers: true so that repeated layers keep "
               "one width, or save the model with fxprune.save_compact (or torch.save) instead of save_pretrained")
    warnings.warn(message, UserWarning, stacklevel=4)  # the caller of Pruning.compact_eager
    model.save_pretrained = refuse_save_pretrained(message)
    return [message]


class refuse_save_pretrained:
    """Installed as ``save_pretrained`` on a compact model its config cannot describe: a checkpoint that
    would not reload is refused with the reason, instead of written."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, *args, **kwargs):
        raise CompactionError(self.message)
