"""The error a client's code raised, read back from what Flower reports of a failed client."""

from __future__ import annotations

import re

__all__ = ["raised_by_client"]

_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit|Interrupt)): (.+)$", re.MULTILINE)
_WRAPPERS = frozenset({"ClientAppException", "RayTaskError"})
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# Flower reports an exception as "<class 'module.Name'>:<'message'>".
_FLOWER_WRAPPED = re.compile(r"\s*<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>\s*", re.DOTALL)
# Flower's ClientAppException keeps the message of the error it wraps, not its type.
_WRAPPER_MESSAGE = re.compile(r"Exception \w+ occurred\. Message: (.+)$", re.DOTALL)


def raised_by_client(report: str) -> str:
    """``Name: message`` of the error a failed client raised. Ray wraps it in a long,
    coloured traceback that prints a chain from its root cause out, then Flower's wrapper: the
    last exception before the wrapper is the one the client's code raised.

    Example
    -------
    >>> raised_by_client("<class 'splitflower.errors.ConfigError'>:<'lr must be positive'>")
    'ConfigError: lr must be positive'
    """
    text = _COLOUR.sub("", report)
    wrapped = _FLOWER_WRAPPED.fullmatch(text)
    inner = wrapped.group(2) if wrapped else text
    raised = [m for m in _RAISED.finditer(inner) if m.group(1) not in _WRAPPERS]
    if raised:
        return f"{raised[-1].group(1)}: {raised[-1].group(2).strip()}"
    if message := _WRAPPER_MESSAGE.search(inner):
        return message.group(1).strip()
    lines = [ln.strip() for ln in inner.splitlines() if ln.strip()]
    if wrapped and len(lines) == 1:  # the message itself, not a traceback ending in it
        return f"{wrapped.group(1)}: {lines[0]}"
    return lines[-1] if lines else "(empty)"
