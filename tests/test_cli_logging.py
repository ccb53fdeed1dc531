"""The CLI prints each of Flower's log lines once (Flower's own handler, not the root's too),
and without --verbose only its critical ones (a failed client's traceback is an ERROR line)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
from flwr.common.logger import log
from splitflower._logs import configure_logging
configure_logging(verbose=sys.argv[1] == "verbose")
log(logging.ERROR, "a flower error line")
log(logging.CRITICAL, "a flower critical line")
"""


@pytest.mark.parametrize(("verbose", "errors"), [("verbose", 1), ("quiet", 0)])
def test_flower_lines_are_printed_once_and_its_errors_only_when_verbose(verbose: str, errors: int) -> None:
    # A fresh interpreter: the logging setup is process-wide.
    command = [sys.executable, "-c", SCRIPT, verbose]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    output = done.stdout + done.stderr
    assert output.count("a flower error line") == errors and output.count("a flower critical line") == 1, output
