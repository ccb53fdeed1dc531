"""Things a user names by ``MODULE:ATTRIBUTE`` (their own algorithm or strategy), imported
with errors that say what went wrong and where to put the module."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from splitflower.errors import ConfigError

__all__ = ["lookup"]


def lookup(kind: str, name: str, registered: Mapping[str, Any]) -> Any:
    """``registered[name]``, or the attribute ``MODULE:ATTRIBUTE`` names (not yet type-checked)."""
    if name in registered:
        return registered[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"{kind} must be one of {sorted(registered)}, or MODULE:ATTRIBUTE naming one of your own, got {name!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if err.name != module_name:  # the module was found; something it imports was not
            raise ConfigError(f"{kind} {name!r}: importing module {module_name!r} failed: {err}") from err
        raise ConfigError(
            f"{kind} {name!r}: no module {module_name!r} ({err}); run from the folder holding it or add "
            "that folder to PYTHONPATH (under `flwr run`, put it in the Flower app's folder)"
        ) from err
    except Exception as err:  # the user's module failed as it ran: say which, and how
        raise ConfigError(
            f"{kind} {name!r}: importing module {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    if not hasattr(module, attribute):
        raise ConfigError(f"{kind} {name!r}: module {module_name!r} has nothing named {attribute!r}")
    return getattr(module, attribute)
