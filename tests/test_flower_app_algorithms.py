"""Every algorithm and strategy of the library through the example Flower app under `flwr run` (simulation).

One local SuperLink serves all the runs of this module (each run still starts its own
simulation runtime); the processes are cleaned up as in test_flower_apps.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_flower_apps import RUN_CONFIG, Flower, _check_results

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


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("algorithm", "strategy", "options"), CASES, ids=[f"{a}-{s or 'own'}" for a, s, _ in CASES])
def test_flwr_run_each_algorithm(flower: Flower, algorithm: str, strategy: str, options: str) -> None:
    out = flower.tmp / f"{algorithm}-{strategy}.json"
    run_config = f"{RUN_CONFIG} algorithm='{algorithm}' strategy='{strategy}' options='{options}' out='{out}'"
    status = flower.flwr_run_local_status(f"flwr-run-{algorithm}-{strategy}", run_config, timeout=240)
    assert status.startswith("finished:completed"), f"{status}\n{flower.tail()}"
    results = _check_results(Path(out), flower.tail())
    assert results["config"]["algorithm"] == algorithm
    assert not strategy or results["config"]["strategy"] == strategy
