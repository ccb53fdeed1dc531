"""Checks shared by the modules that take values across a boundary (a call's argument, a
config value; each caller raises its own error, naming the value) and by the base classes
that check an algorithm's class when it is defined."""

from __future__ import annotations

import inspect
import math
import numbers

import torch

from splitflower.errors import AlgorithmError, ConfigError

__all__ = [
    "all_finite",
    "checked_count",
    "checked_seconds",
    "positive_seconds",
    "refuse_options_the_base_cannot_read",
    "refuse_shadowed_methods",
]


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


def checked_seconds(value: object, what: str, hint: str = "") -> float:
    """``value`` as seconds, or ConfigError naming ``what`` unless positive and finite."""
    seconds = positive_seconds(value)
    if seconds is None:
        raise ConfigError(f"{what} must be a positive, finite number of seconds, got {value!r}{hint}")
    return seconds


def checked_count(value: object, what: str) -> int:
    """``value`` as a whole number >= 1 (a bool is not), or ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


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


def refuse_shadowed_methods(cls: type, attributes: frozenset[str], base: str) -> None:
    """Refuse a method of ``cls`` (or of a base) that ``base.__init__`` would hide behind an
    attribute of the same name, so that it would never be called."""
    for name in sorted(attributes):
        if any(_is_method(vars(klass).get(name)) for klass in cls.__mro__):
            hint = (
                f"pass loss_fn= to {base}.__init__ instead (e.g. super().__init__(..., loss_fn=my_loss))"
                if name == "loss_fn"
                else "rename it"
            )
            raise AlgorithmError(
                f"{cls.__name__}.{name}: {base}.__init__ sets self.{name}, so this method would never be called; {hint}"
            )


def refuse_options_the_base_cannot_read(cls: type) -> None:
    """Refuse a subclass's own ``Options`` that is not a subclass of the ``Options`` of the
    class it extends: that class's code reads its fields from ``self.options``."""
    if "Options" not in vars(cls):
        return
    own = vars(cls)["Options"]
    for base in cls.__mro__[1:]:
        inherited = vars(base).get("Options")
        if inherited is None:
            continue
        if not (isinstance(own, type) and issubclass(own, inherited)):
            raise AlgorithmError(
                f"{cls.__name__}.Options must subclass {base.__name__}.Options ({inherited.__name__}), whose "
                f"fields {base.__name__}'s code reads; got {own!r}. Write "
                f"@dataclass class MyOptions({inherited.__name__}): ... and set Options = MyOptions"
            )
        return


def _is_method(member: object) -> bool:
    return inspect.isfunction(member) or isinstance(member, staticmethod | classmethod | property)
