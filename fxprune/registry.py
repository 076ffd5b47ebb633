"""The pruner registry: name -> :class:`~fxprune.pruners.Pruner` class.

A module of its own so that :mod:`fxprune.config`, which refuses a ``pruning_type`` that is
not registered, and :mod:`fxprune.pruners`, which registers and builds pruners (and parses
dict configs), both import it rather than each other.
"""

from __future__ import annotations

from fxprune.errors import ConfigError

__all__ = ["PRUNERS", "registered_names", "unknown_pruner"]

PRUNERS: dict[str, type] = {}


def registered_names() -> list[str]:
    return sorted(PRUNERS)


def unknown_pruner(name) -> ConfigError:
    """The error for a ``pruning_type`` that is not registered: it lists the names that are."""
    return ConfigError(f"unknown pruning_type {name!r}; registered pruners: {', '.join(registered_names())}")
