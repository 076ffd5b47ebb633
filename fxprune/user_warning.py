"""Warnings attributed to the user's line, however deep in fxprune the call that raises them.

A fixed ``stacklevel`` is right for one call path only: a pruner's note is raised from
selection, from compensation (under ``torch.no_grad``'s wrapper) or from a latency check, each
at another depth. :func:`warn` counts the frames of fxprune (its ``passes`` and ``exporters``
included) and of torch above it, and attributes the warning to the first frame beyond them.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn"]


def _roots() -> tuple[str, ...]:
    """fxprune's folders (``passes`` and ``exporters`` install from beside it) and torch's."""
    import fxprune
    import fxprune.exporters
    import fxprune.passes

    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (fxprune, fxprune.passes, fxprune.exporters, torch))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message)`` at the first caller outside fxprune and torch."""
    roots, level, frame = _roots(), 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
