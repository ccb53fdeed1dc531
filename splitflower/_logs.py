"""How the command line's runs log: Flower's lines once, and its noise only when asked for."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Final

__all__ = ["FLOWER_LEVEL_ENV", "configure_logging", "take_flower_level_from_the_command"]

# Flower's log level the command chose, for the simulation's worker processes: Ray's actors
# inherit this process's environment, not its logging setup ("Manually terminating
# ClientAppActor", as each ends, would show without it).
FLOWER_LEVEL_ENV: Final = "SPLITFLOWER_FLOWER_LOG_LEVEL"


def configure_logging(verbose: bool) -> None:
    """Log at INFO with ``verbose``, else at WARNING with Flower's logger kept to CRITICAL."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # Flower's logger prints through a handler of its own: passed on to the root handler too,
    # every Flower message would appear twice.
    logging.getLogger("flwr").propagate = False
    os.environ.pop(FLOWER_LEVEL_ENV, None)  # set by a quiet command that started this one
    if not verbose:
        # Flower logs a failed client's whole Ray traceback, twice, at ERROR: each round's own
        # line names every failed client and the error it raised (simulation._failure_lines).
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        os.environ[FLOWER_LEVEL_ENV] = logging.getLevelName(logging.CRITICAL)
        # Ray's advice on a future default for GPU visibility: nothing a user of this CLI can act on.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")


def take_flower_level_from_the_command() -> None:
    """In a simulation's worker process: keep Flower's logger to the level the command that
    started the simulation chose (none chosen: leave it)."""
    level = os.environ.get(FLOWER_LEVEL_ENV)
    if level in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
        logging.getLogger("flwr").setLevel(level)
