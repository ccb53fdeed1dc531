"""How the command line's runs log: Flower's lines once, and its noise only when asked for."""

from __future__ import annotations

import logging
import warnings

__all__ = ["configure_logging"]


def configure_logging(verbose: bool) -> None:
    """Log at INFO with ``verbose``, else at WARNING with Flower's logger kept to CRITICAL."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # Flower's logger prints through a handler of its own: passed on to the root handler too,
    # every Flower message would appear twice.
    logging.getLogger("flwr").propagate = False
    if not verbose:
        # Flower logs a failed client's whole Ray traceback, twice, at ERROR: each round's own
        # line names every failed client and the error it raised (experiment._failure_lines).
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        # Ray's advice on a future default for GPU visibility: nothing a user of this CLI can act on.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
