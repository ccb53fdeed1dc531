"""Checks of values that cross a boundary (a call's argument, a config value), shared by the
modules that take them; each caller raises its own error, naming the value."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["all_finite", "positive_seconds"]


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


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a floating tensor is finite (no NaN, no infinity).

    A sum is finite when every value is (an overflow aside): one pass that allocates nothing,
    against isfinite's mask of the whole tensor, which runs only when the sum is not finite.

    Example
    -------
    >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
    (True, False)
    """
    wide = torch.float64 if tensor.dtype is torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=wide))) or bool(torch.isfinite(tensor).all())
