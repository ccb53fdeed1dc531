"""Every algorithm and strategy of the library through the example Flower app under `flwr run` (simulation).

One local SuperLink serves all the runs of this module (each run still starts its own
simulation runtime); the processes are cleaned up as in test_flower_apps.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_flower_apps import RUN_CONFIG, Flower, _check_results

from conftest import RAY_START_UP_FAILURES

# (algorithm, strategy ("" = its own), options). With test_flower_apps.py (dsl under parallel)
# every algorithm and every strategy runs under `flwr run`: batched is locfedmix's and
# splitavg's own; the others are chosen here.
CASES = [
    ("locfedmix", "", "n_s=1"),
    ("splitavg", "", ""),
    ("ushaped", "splitfed-v2", ""),
    ("streamsl", "splitfed-v1", ""),
    ("fedsl", "sequential", ""),
    ("csl", "", ""),
]


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    env = Flower(tmp_path_factory.mktemp("flwr"))
    env.use_local_superlink_ports()
    try:
        yield env
    finally:
        survivors = env.cleanup()
        assert not survivors, f"processes survived cleanup: {survivors}"


def _runs(flower: Flower) -> dict[str, str]:
    """Status of every run the local SuperLink has seen, by run id."""
    return {run["run-id"]: run["status"] for run in flower.runs("local")}


def _run_once(flower: Flower, name: str, run_config: str) -> str:
    """Start one `flwr run` and return the status of the run it created."""
    before = _runs(flower)
    rc = flower.flwr_run_local(name, run_config, timeout=240)
    assert rc == 0, flower.tail()
    new = {run: status for run, status in _runs(flower).items() if run not in before}
    assert len(new) == 1, f"expected one new run, got {new}\n{flower.tail()}"
    return next(iter(new.values()))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("algorithm", "strategy", "options"), CASES, ids=[f"{a}-{s or 'own'}" for a, s, _ in CASES])
def test_flwr_run_each_algorithm(flower: Flower, algorithm: str, strategy: str, options: str) -> None:
    out = flower.tmp / f"{algorithm}-{strategy}.json"
    run_config = f"{RUN_CONFIG} algorithm='{algorithm}' strategy='{strategy}' options='{options}' out='{out}'"
    status = _run_once(flower, f"flwr-run-{algorithm}-{strategy}", run_config)
    if status != "finished:completed" and any(sign in flower.tail(20_000) for sign in RAY_START_UP_FAILURES):
        # Ray's local node sometimes misses its start-up window on a loaded 2-core machine;
        # that says nothing about splitflower, so the run gets one more try.
        status = _run_once(flower, f"flwr-run-{algorithm}-{strategy}-retry", run_config)
    assert status == "finished:completed", f"{status}\n{flower.tail()}"
    results = _check_results(Path(out), flower.tail())
    assert results["config"]["algorithm"] == algorithm
    assert not strategy or results["config"]["strategy"] == strategy
