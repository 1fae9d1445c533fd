"""Progress bars for long jobs: live on a terminal, and at most one line a minute where stderr is a log or a pipe
(CI logs and redirected output would otherwise fill with a carriage-return update per step)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar", "LOG_INTERVAL_S"]

# Seconds between two updates when stderr is not a terminal.
LOG_INTERVAL_S = 60.0


def progress_bar(
    iterable: Iterable[Any] | None = None, *, enabled: bool = True, desc: str | None = None, total: int | None = None,
    unit: str = "it", leave: bool = False,
) -> Any:
    """A ``tqdm`` bar over ``iterable`` (or a manual one with ``total``): disabled when ``enabled`` is False."""
    from tqdm.auto import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, leave=leave if terminal else True, file=sys.stderr,
        disable=not enabled, dynamic_ncols=terminal, ncols=None if terminal else 100,
        mininterval=0.1 if terminal else LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S if not terminal else 10.0,
    )
