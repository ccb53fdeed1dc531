"""Checks of values that cross a boundary (a call's argument, a config value), shared by the
modules that take them; each caller raises its own error, naming the value."""

from __future__ import annotations

import math
import numbers

__all__ = ["positive_seconds"]


def positive_seconds(value: object) -> float | None:
    """``value`` as seconds if it is a positive, finite real number (a bool is not), else None.

    Example
    -------
    >>> positive_seconds(2), positive_seconds(0), positive_seconds(float("inf")), positive_seconds(True)
    (2.0, None, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    seconds = float(value)
    return seconds if 0 < seconds < math.inf else None
