"""The same config and seed give the same weights, run after run: Flower draws new node ids
in each run, and clients are ordered, batched and averaged by their partition instead.

Strategies that serve one client at a time, or give each client its own server model, are
exact; where clients share a server model at once (parallel, batched), it steps in the order
their requests arrive, which differs between runs, as it does in deployment.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ThreadBackend
from splitflower.experiment import ExperimentConfig, run_experiment
from splitflower.strategy import SplitResult


def _train(config: ExperimentConfig) -> tuple[SplitResult, dict[str, object]]:
    kept: list[SplitResult] = []
    results = run_experiment(config, say=lambda _: None, keep_model=lambda _, result: kept.append(result))
    return kept[0], results


@pytest.mark.parametrize(
    ("algorithm", "strategy"), [("csl", "sequential"), ("csl", "splitfed-v1"), ("dsl", "splitfed-v2")]
)
def test_the_same_seed_gives_the_same_weights(algorithm: str, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(
        algorithm=algorithm, strategy=strategy, dataset="synthetic", clients=4, rounds=2, train_size=384, test_size=128
    )
    (first, first_results), (second, second_results) = _train(config), _train(config)
    for part in ("arrays", "server_arrays"):
        torch.testing.assert_close(
            getattr(first, part).to_torch_state_dict(), getattr(second, part).to_torch_state_dict(), rtol=0, atol=0
        )
    assert first_results["final"] == second_results["final"]
