"""The CLI prints each of Flower's log lines once (Flower's own handler, not the root's too),
and without --verbose only its critical ones (a failed client's traceback is an ERROR line)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from conftest import simulate
from splitflower._logs import FLOWER_LEVEL_ENV
from splitflower.experiment import ExperimentConfig

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


WORKER = """
import logging
from splitflower._logs import take_flower_level_from_the_command
take_flower_level_from_the_command()
print(logging.getLevelName(logging.getLogger("flwr").getEffectiveLevel()))
"""
COMMAND = """
import subprocess, sys
from splitflower._logs import configure_logging
configure_logging(verbose=sys.argv[1] == "verbose")
print(subprocess.run([sys.executable, "-c", sys.argv[2]], capture_output=True, text=True, check=True).stdout)
"""


@pytest.mark.parametrize("verbose", ["verbose", "quiet"])
def test_a_simulation_worker_started_by_the_command_logs_at_its_flower_level(verbose: str) -> None:
    # Ray's actors are processes the command's process starts: they inherit its environment.
    command = [sys.executable, "-c", COMMAND, verbose, WORKER]
    quiet_parent = {**os.environ, FLOWER_LEVEL_ENV: "CRITICAL"}  # a verbose command overrides it
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=quiet_parent, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITFLOWER_")}
    alone = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == (["CRITICAL"] if verbose == "quiet" else alone.stdout.split()), done.stdout
    assert alone.stdout.split() != ["CRITICAL"], "Flower's own level, where no command chose one"


def test_the_experiment_s_clients_take_flower_s_level_from_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a Ray actor does on its first message (here on a thread, in this process).
    monkeypatch.setenv(FLOWER_LEVEL_ENV, "CRITICAL")
    logging.getLogger("flwr").setLevel(logging.NOTSET)
    simulate(ExperimentConfig(dataset="synthetic", clients=1, rounds=1, synthetic_size=64).validate())
    assert logging.getLogger("flwr").level == logging.CRITICAL
