"""Progress bars for the steps that take seconds on a large model (capture, grouping, compaction, export).

On when stderr is a terminal, off with ``progress=False`` (on with ``progress=True`` even when it is not).
A bar names the stage running now, so a user waiting a minute on a big model sees where the time goes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

__all__ = ["stages", "quiet"]


def quiet(progress: bool | None) -> bool:
    """Whether bars are off: ``progress=None`` follows stderr being a terminal."""
    return not sys.stderr.isatty() if progress is None else not progress


@contextmanager
def stages(what: str, names: list[str], progress: bool | None) -> Iterator[Callable[[], None]]:
    """A bar over ``names``; each call of the function it yields starts the next stage."""
    with tqdm(total=len(names), desc=what, unit="stage", disable=quiet(progress), leave=False, file=sys.stderr,
              bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]") as bar:
        started = []

        def next_stage() -> None:
            if started:
                bar.update()
            bar.set_description_str(f"{what}: {names[len(started)]}")
            started.append(True)

        yield next_stage
        bar.update(len(names) - bar.n)
