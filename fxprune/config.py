"""Pruning configuration: INC-compatible keys, validated up front.

Accepts the keys of Intel Neural Compressor's pruner (``target_sparsity``,
``prune_type``, ``pattern``, ``start_step`` …) and the successor spellings
(``pruning_type``, ``op_names``, ``pruning_scope`` …) as aliases. An unknown key,
a bad value or an unknown pattern is a :class:`~fxprune.errors.ConfigError`, never
a warning: a typo in a pruning config silently prunes the wrong thing.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, replace

from fxprune.errors import ConfigError
from fxprune.registry import registered_names, unknown_pruner

__all__ = ["PruningConfig", "Pattern", "parse_pattern", "parse_config"]

ALIASES = {
    "prune_type": "pruning_type",
    "op_names": "names",
    "excluded_op_names": "excluded_names",
    "extra_excluded_names": "excluded_names",
    "pruning_scope": "prune_domain",
    "pruning_frequency": "update_frequency_on_step",
    "max_sparsity_ratio_per_op": "max_sparsity_ratio_per_layer",
    "pruning_op_types": "prune_layer_type",
    "target_sparsity_ratio": "target_sparsity",
}
DECAY_TYPES = ("exp", "cos", "linear", "cube")
COMPENSATIONS = ("none", "bias", "least_squares")


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: ``kind`` is "channel", "block" (NxM) or "n:m"."""

    text: str
    kind: str
    n: int = 0
    m: int = 0

    @property
    def is_channel(self) -> bool:
        return self.kind == "channel"


def parse_pattern(text: str) -> Pattern:
    """Parse ``channelx1``/``1xchannel`` (channel groups), ``NxM`` blocks or ``N:M``.

    >>> parse_pattern("2:4")
    Pattern(text='2:4', kind='n:m', n=2, m=4)
    """
    if not isinstance(text, str):
        raise ConfigError(f"pattern must be a string such as 'channelx1', '4x1' or '2:4', got {text!r}")
    t = text.strip().lower().rsplit("_", 1)[-1]  # INC's "tile_pattern_4x1"
    if t in ("channelx1", "1xchannel", "channel", "channelxchannel"):
        return Pattern(text, "channel")
    if m := re.fullmatch(r"(\d+)x(\d+)", t):
        n, k = int(m[1]), int(m[2])
        if n > 0 and k > 0:
            return Pattern(text, "block", n, k)
    if m := re.fullmatch(r"(\d+):(\d+)", t):
        n, k = int(m[1]), int(m[2])
        if 0 < n < k:
            return Pattern(text, "n:m", n, k)
    raise ConfigError(
        f"unknown pattern {text!r}: use 'channelx1' or '1xchannel' (whole channels, compactable), "
        "'NxM' blocks such as '4x1', or 'N:M' such as '2:4' (N < M)")


@dataclass(frozen=True)
class PruningConfig:
    """One pruner's settings (see the README's config table for each key's meaning)."""

    target_sparsity: float = 0.5
    pruning_type: str = "magnitude"
    pattern: str = "channelx1"
    start_step: int = 0
    end_step: int = 0
    update_frequency_on_step: int = 1
    prune_domain: str = "global"
    max_sparsity_ratio_per_layer: float = 0.98
    min_sparsity_ratio_per_op: float = 0.0
    sparsity_decay_type: str = "exp"
    names: tuple = ()
    excluded_names: tuple = ()  # these layers keep their output width; their inputs follow their producers
    frozen_names: tuple = ()  # nothing of these layers is pruned (every group they are part of is left alone)
    prune_layer_type: tuple = ()
    round_to: int | str = "auto"  # "auto": kept widths aligned to 16 elements where a group is wide enough
    magnitude_norm: str = "l2"
    prune_hidden_size: bool = False  # also prune groups spanned by LayerNorm/RMSNorm statistics
    uniform_layers: bool = False  # the same role in every repeated block keeps the same width
    target_speedup: float | None = None  # instead of a sparsity: onnxruntime speedup of the compact model
    target_latency_ms: float | None = None  # instead of a sparsity: onnxruntime latency of the compact model
    latency_threads: int = 1  # intra-op threads the latency targets are measured with
    latency_batch: int | None = None  # batch they are measured at (default: the example's)
    latency_verify: bool = True  # time the compact model after the last pruning step and correct a miss
    latency_cache: str | None = None  # folder of the per-layer latency tables (default ~/.cache/fxprune)
    compensation: str = "none"  # re-fit consumers of removed channels from calibration data (fxprune.compensation)
    compensation_inputs: str = "pruned"  # fit each layer on the inputs pruning leaves it, or on the dense ones

    @property
    def latency_target(self) -> bool:
        """Pruned to a latency (``target_speedup`` or ``target_latency_ms``) rather than a sparsity."""
        return self.target_speedup is not None or self.target_latency_ms is not None

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    def validate(self) -> "PruningConfig":
        s = self.target_sparsity
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= s < 1.0:
            raise ConfigError(f"target_sparsity must be a number in [0, 1), got {s!r}")
        for key in ("max_sparsity_ratio_per_layer", "min_sparsity_ratio_per_op"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"{key} must be a number in [0, 1), got {v!r}")
        if self.min_sparsity_ratio_per_op > self.max_sparsity_ratio_per_layer:
            raise ConfigError(
                f"min_sparsity_ratio_per_op ({self.min_sparsity_ratio_per_op}) exceeds "
                f"max_sparsity_ratio_per_layer ({self.max_sparsity_ratio_per_layer})")
        for key in ("start_step", "end_step"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{key} must be an integer >= 0, got {v!r}")
        if self.end_step < self.start_step:
            raise ConfigError(f"end_step ({self.end_step}) is before start_step ({self.start_step})")
        if not isinstance(self.update_frequency_on_step, int) or self.update_frequency_on_step < 1:
            raise ConfigError(f"update_frequency_on_step must be an integer >= 1, got {self.update_frequency_on_step!r}")
        if self.prune_domain not in ("global", "local"):
            raise ConfigError(f"prune_domain must be 'global' or 'local', got {self.prune_domain!r}")
        if self.sparsity_decay_type not in DECAY_TYPES:
            raise ConfigError(f"sparsity_decay_type must be one of {DECAY_TYPES}, got {self.sparsity_decay_type!r}")
        if self.round_to != "auto" and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                        or self.round_to < 1):
            raise ConfigError(f"round_to must be an integer >= 1 or 'auto', got {self.round_to!r}")
        if self.magnitude_norm not in ("l1", "l2"):
            raise ConfigError(f"magnitude_norm must be 'l1' or 'l2', got {self.magnitude_norm!r}")
        for key in ("prune_hidden_size", "uniform_layers"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be True or False, got {getattr(self, key)!r}")
        pattern = self.parsed_pattern
        self._validate_latency(pattern)
        if self.compensation not in COMPENSATIONS:
            raise ConfigError(f"compensation must be one of {', '.join(map(repr, COMPENSATIONS))}, got "
                              f"{self.compensation!r}")
        if self.compensation_inputs not in ("pruned", "dense"):
            raise ConfigError(f"compensation_inputs must be 'pruned' or 'dense', got {self.compensation_inputs!r}")
        if self.compensation != "none" and (not pattern.is_channel or self.latency_target):
            why = (f"pattern {self.pattern!r} only zeroes weights" if not pattern.is_channel else
                   "a latency target may re-plan after measuring, and compensation cannot be undone")
            raise ConfigError(f"compensation {self.compensation!r} re-fits the layers that lose whole input channels: "
                              f"{why}; use compensation 'none' here")
        if pattern.kind == "n:m" and s > pattern.n / pattern.m:
            raise ConfigError(f"target_sparsity {s} is above what pattern {self.pattern} allows ({pattern.n / pattern.m})")
        if self.pruning_type not in registered_names():  # a list, unhashable, is refused too
            raise unknown_pruner(self.pruning_type)
        for key in ("names", "excluded_names", "frozen_names"):
            for pat in getattr(self, key):
                try:
                    re.compile(pat)
                except (re.error, TypeError) as err:
                    raise ConfigError(f"{key} entry {pat!r} is not a valid regular expression: {err}") from err
        return self

    def _validate_latency(self, pattern: Pattern) -> None:
        for key, low in (("target_speedup", 1.0), ("target_latency_ms", 0.0)):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > low):
                raise ConfigError(f"{key} must be a number above {low:g}, got {v!r}")
        if self.target_speedup is not None and self.target_latency_ms is not None:
            raise ConfigError("give target_speedup or target_latency_ms, not both")
        for key in ("latency_threads", "latency_batch"):
            v = getattr(self, key)
            if not (v is None and key == "latency_batch") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{key} must be an integer >= 1, got {v!r}")
        if not isinstance(self.latency_verify, bool):
            raise ConfigError(f"latency_verify must be True or False, got {self.latency_verify!r}")
        if self.latency_target and not pattern.is_channel:
            raise ConfigError(f"target_speedup and target_latency_ms remove whole channels; pattern {self.pattern!r} "
                              "only zeroes weights, which onnxruntime does not run faster: use 'channelx1'")
        if self.latency_target and self.uniform_layers:
            raise ConfigError("uniform_layers=True cannot be combined with a latency target yet: the latency "
                              "allocation gives each group its own width")


_FIELDS = {f.name for f in fields(PruningConfig)}
_GLOBAL_ONLY = {"pruners", "pruning_configs"}


def _normalise(raw: dict, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a dict, got {type(raw).__name__}")
    out: dict = {}
    for key, value in raw.items():
        canon = ALIASES.get(key, key)
        if canon not in _FIELDS:
            known = sorted(_FIELDS | set(ALIASES) | _GLOBAL_ONLY)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(_FIELDS))}"
            raise ConfigError(f"unknown config key {key!r} in {where}{hint}")
        if canon in ("names", "excluded_names", "frozen_names", "prune_layer_type"):
            value = (value,) if isinstance(value, str) else tuple(value)
            if canon == "excluded_names" and canon in out:
                value = tuple(out[canon]) + value
        if canon == "pruning_type" and isinstance(value, str):
            value = value.lower()
        out[canon] = value
    return out


def parse_config(config: dict | PruningConfig | None) -> list[PruningConfig]:
    """Turn a user config into validated pruner configs (one per ``pruners`` entry).

    Global keys fill every pruner; a pruner's own keys win (local overrides global).
    """
    if config is None:
        return [PruningConfig().validate()]
    if isinstance(config, PruningConfig):
        return [config.validate()]
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a dict, got {type(config).__name__}")
    config = dict(config)
    local = config.pop("pruners", None)
    if "pruning_configs" in config:
        if local is not None:
            raise ConfigError("give either 'pruners' or 'pruning_configs', not both")
        local = config.pop("pruning_configs")
    top = _normalise(config, "config")
    _one_target(top, "config")
    base = replace(PruningConfig(), **top)
    if not local:
        return [base.validate()]
    if not isinstance(local, (list, tuple)):
        raise ConfigError(f"'pruners' must be a list of dicts, got {type(local).__name__}")
    own = [_normalise(p, f"pruners[{i}]") for i, p in enumerate(local)]
    for i, keys in enumerate(own):
        _one_target(keys, f"pruners[{i}]")
    configs = [replace(base, **keys).validate() for keys in own]
    if sum(c.latency_target for c in configs) > 1:
        raise ConfigError("a latency target (target_speedup / target_latency_ms) is the whole model's: give it to "
                          "one pruner only (the others then prune to their target_sparsity)")
    return configs


def _one_target(keys: dict, where: str) -> None:
    """A sparsity and a latency target at once would leave one of them unmet: refused."""
    given = [k for k in ("target_sparsity", "target_speedup", "target_latency_ms") if k in keys]
    if len(given) > 1:
        raise ConfigError(f"{where} gives {' and '.join(given)}: a pruner prunes to one target, a sparsity or "
                          "a latency; drop all but one")
