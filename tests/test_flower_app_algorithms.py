"""Every algorithm of the library through the example Flower app under `flwr run` (simulation).

One local SuperLink serves all the runs of this module (each run still starts its own
simulation runtime); the processes are cleaned up as in test_flower_apps.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_flower_apps import BIN, RUN_CONFIG, Flower, _check_results

CASES = [("locfedmix", "n_s=1"), ("ushaped", ""), ("streamsl", ""), ("fedsl", ""), ("splitavg", "")]


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    env = Flower(tmp_path_factory.mktemp("flwr"))
    env.use_local_superlink_ports()
    try:
        yield env
    finally:
        survivors = env.cleanup()
        assert not survivors, f"processes survived cleanup: {survivors}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("algorithm", "options"), CASES, ids=[a for a, _ in CASES])
def test_flwr_run_each_algorithm(flower: Flower, algorithm: str, options: str) -> None:
    out = flower.tmp / f"{algorithm}.json"
    run_config = f"{RUN_CONFIG} algorithm='{algorithm}' strategy='' options='{options}' out='{out}'"
    rc = flower.flwr_run_local(f"flwr-run-{algorithm}", run_config, timeout=240)
    assert rc == 0, flower.tail()
    listed = subprocess.run(
        [str(BIN / "flwr"), "ls", "local", "--format", "json"], env=flower.env, capture_output=True, timeout=60
    )
    statuses = {run["status"] for run in json.loads(listed.stdout)["runs"]}
    assert statuses == {"finished:completed"}, f"{statuses}\n{flower.tail()}"
    results = _check_results(Path(out), flower.tail())
    assert results["config"]["algorithm"] == algorithm
