"""Every algorithm under Flower's simulation runtime, and the strategies whose server models
differ through the example Flower app under `flwr run` (simulation, on Ray).

Each algorithm runs under its own strategy on conftest.ThreadBackend (about a second each);
`flwr run` costs about 27 s a run here, so only the cases below run under it. One local SuperLink
serves all the `flwr run` runs of this module (each run still starts its own simulation
runtime); the processes are cleaned up as in test_flower_apps.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_flower_apps import RUN_CONFIG, Flower, _check_results

from conftest import simulate
from splitflower.algorithms import ALGORITHMS
from splitflower.experiment import ExperimentConfig
from splitflower.results import summarise_round

# (algorithm, strategy ("" = its own), options). With test_flower_apps.py (dsl under parallel)
# these run the strategies whose server models differ under `flwr run`: batched (locfedmix's own:
# requests of concurrent Ray actors batched on one model) and splitfed-v1 (one model per client).
# Sequential runs on Ray in test_flower_apps.py (`flwr run`, dsl); splitfed-v2 and
# sequential run under Flower's runtime on threads (above, test_strategies.py,
# test_reproducibility.py). Each `flwr run` costs CI about 27 s.
CASES = [
    ("locfedmix", "", "n_s=1"),
    ("streamsl", "splitfed-v1", ""),
]


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_each_algorithm_trains_every_client_under_its_own_strategy_in_flower(algorithm: str) -> None:
    config = ExperimentConfig(algorithm=algorithm, dataset="synthetic", clients=2, rounds=2, synthetic_size=256)
    rounds = [summarise_round(record) for record in simulate(config.validate())]
    for entry in rounds:
        assert entry["failed_clients"] == [] and entry["num_examples"] == 256
        assert sum(s["num_examples"] for s in entry["server_models"]) > 0
        assert 0.0 <= entry["test_accuracy"] <= 1.0


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
