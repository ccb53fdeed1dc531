"""The CLI prints each of Flower's log lines once: Flower's own handler, not the root's too."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
from flwr.common.logger import log
from splitflower.cli import _configure_logging
_configure_logging(verbose=False)
log(logging.ERROR, "a flower error line")
"""


def test_a_flower_error_is_printed_once() -> None:
    # A fresh interpreter: the logging setup is process-wide.
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    output = done.stdout + done.stderr
    assert output.count("a flower error line") == 1, output
