"""Exceptions raised by fxprune.

Every error names what was wrong and, where there is one, what to try next.
They all derive from :class:`FxPruneError` so callers can catch one type.
"""

__all__ = [
    "FxPruneError",
    "CaptureError",
    "ConfigError",
    "ExampleInputsError",
    "PruningError",
    "CompactionError",
]


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class ConfigError(FxPruneError, ValueError):
    """The pruning configuration is invalid (unknown key, bad value, unmatched name)."""


class ExampleInputsError(FxPruneError, ValueError):
    """The example inputs do not run through the model."""


class CaptureError(FxPruneError, RuntimeError):
    """torch.export could not capture the model as a graph."""


class PruningError(FxPruneError, RuntimeError):
    """A pruning request cannot be carried out (e.g. it would remove a whole group)."""


class CompactionError(FxPruneError, RuntimeError):
    """Physical removal of channels failed or changed the model's outputs."""
