"""Algorithm options: ``key=value`` strings (CLI, run config) parsed into a frozen dataclass.

An algorithm that takes options declares them as a frozen dataclass with defaults; the
experiment parses ``--option KEY=VALUE`` strings into it by each field's type and passes
the instance as ``options=`` to the algorithm's client and server model. Range checks
belong in the dataclass's ``__post_init__`` (raise ``ValueError``).

Example
-------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Window:
...     window: int = 1
>>> parse_options(Window, ["window=4"], owner="csl")
Window(window=4)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

from splitflower.errors import ConfigError

__all__ = ["parse_options", "split_option_string"]

_T = TypeVar("_T")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def split_option_string(text: str) -> tuple[str, ...]:
    """``"a=1,b=2"`` (a Flower run-config value) -> ``("a=1", "b=2")``; blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_options(options_cls: type[_T], pairs: Iterable[str], *, owner: str) -> _T:
    """Build ``options_cls`` from ``key=value`` strings; ConfigError names every problem."""
    hints = typing.get_type_hints(options_cls)
    fields = {f.name for f in dataclasses.fields(options_cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            problems.append(f"expected KEY=VALUE, got {pair!r}")
        elif key not in fields:
            problems.append(f"unknown option {key!r} (known: {', '.join(sorted(fields))})")
        elif key in values:
            problems.append(f"option {key!r} given twice ({values[key]!r}, then {raw.strip()!r}); give it once")
        else:
            try:
                values[key] = _convert(hints[key], raw.strip())
            except ValueError as err:
                problems.append(f"option {key!r}: {err}")
    if not problems:
        try:
            return options_cls(**values)
        except ValueError as err:
            problems.append(str(err))
    raise ConfigError(f"invalid options for {owner!r}:\n  - " + "\n  - ".join(problems))


def _convert(hint: Any, raw: str) -> Any:
    # A bare Literal's args are its allowed values, not member types of a Union.
    members = (hint,) if typing.get_origin(hint) is typing.Literal else typing.get_args(hint) or (hint,)
    kinds = [k for k in members if k is not type(None)]
    if raw.lower() in ("", "none") and len(kinds) < len(members):
        return None
    kind = kinds[0]
    if kind is bool:
        if raw.lower() not in _TRUE | _FALSE:
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw.lower() in _TRUE
    if kind in (int, float):
        try:
            number = kind(raw)
        except ValueError:
            raise ValueError(f"expected {kind.__name__}, got {raw!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {raw!r}")
        return number
    if typing.get_origin(kind) is typing.Literal:
        allowed = typing.get_args(kind)
        if raw not in allowed:
            raise ValueError(f"expected one of {', '.join(map(str, allowed))}, got {raw!r}")
        return raw
    return kind(raw)
