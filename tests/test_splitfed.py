"""SplitFed v1 / v2 and the batched strategy under Flower's simulation runtime (clients on threads,
see conftest.ThreadBackend)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from conftest import simulate
from splitflower.algorithms.csl import CSLClient
from splitflower.experiment import ExperimentConfig
from splitflower.server_model import FitResult
from splitflower.split import cut_shape
from splitflower.strategies import STRATEGIES, BatchedStrategy, SplitFedV1Strategy, SplitFedV2Strategy
from splitflower.wire import ConfigKey


def _checksum(weights: Mapping[str, torch.Tensor]) -> float:
    return float(sum(v.double().sum() for v in weights.values() if v.is_floating_point()))


class Probing(CSLClient):
    """Reports when it trained, what it received and returned, and what its server model
    answers for a fixed probe input before and after the client's training."""

    def _probe(self) -> float:
        shape = cut_shape(self.segment, self.train_data.input_shape)
        probe = torch.randn((4, *shape), generator=torch.Generator().manual_seed(0))
        logits = self.server_model_proxy.predict(embeddings=probe)
        assert isinstance(logits, torch.Tensor)
        return float(logits.double().sum())

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        started, probe_before = time.time(), self._probe()
        result = super().fit(weights, config)
        metrics = {**result.metrics, "started": started, "ended": time.time()}
        metrics |= {"probe_before": probe_before, "probe_after": self._probe()}
        metrics |= {"received": _checksum(weights), "returned": _checksum(result.weights)}
        metrics["index"] = float(config[ConfigKey.CLIENT_INDEX])
        return FitResult(result.weights, result.num_examples, metrics)


def _run(strategy: str, rounds: int) -> list[dict[str, Any]]:
    config = ExperimentConfig(
        algorithm="csl", strategy=strategy, dataset="synthetic", clients=3, rounds=rounds, synthetic_size=384
    )
    return simulate(config, Probing)


def _clients(record: Mapping[str, Any]) -> list[dict[str, float]]:
    return sorted((c["metrics"] for c in record["clients"]), key=lambda m: m["index"])


def _assert_client_segments_averaged(first: Mapping[str, Any], second: Mapping[str, Any]) -> None:
    total = sum(c["num-examples"] for c in _clients(first))
    averaged = sum(c["returned"] * c["num-examples"] for c in _clients(first)) / total
    assert _clients(second)[0]["received"] == pytest.approx(averaged, rel=1e-6), "client segments FedAvg-ed"


def test_registered_under_their_cli_names() -> None:
    assert STRATEGIES["splitfed-v1"] is SplitFedV1Strategy
    assert STRATEGIES["splitfed-v2"] is SplitFedV2Strategy
    assert STRATEGIES["batched"] is BatchedStrategy and BatchedStrategy().batching


def test_splitfed_v1_one_server_model_per_client_averaged_each_round() -> None:
    first, second = _run("splitfed-v1", rounds=2)
    for record in (first, second):
        clients = _clients(record)
        served = sorted(s["num_examples"] for s in record["server_models"])
        assert served == sorted(c["num-examples"] for c in clients), "each server model trained one client"
        assert len({c["probe_before"] for c in clients}) == 1, "every server model starts from the same weights"
        assert len({c["received"] for c in clients}) == 1, "and every client segment too"
    # After round 1 the three server models differ; round 2 starts them all from their average:
    # neither round 1's start (no aggregation) nor any one of round 1's ends (one model kept).
    assert len({c["probe_after"] for c in _clients(first)}) == 3
    round_two_start = _clients(second)[0]["probe_before"]
    assert round_two_start != _clients(first)[0]["probe_before"], "the server models' training was kept"
    assert round_two_start not in {c["probe_after"] for c in _clients(first)}
    _assert_client_segments_averaged(first, second)


def test_splitfed_v2_one_server_model_serves_clients_in_turn() -> None:
    first, second = _run("splitfed-v2", rounds=2)
    for record in (first, second):
        clients = _clients(record)
        (server,) = record["server_models"]
        assert server["num_examples"] == sum(c["num-examples"] for c in clients), "one server model for all"
        assert len({c["received"] for c in clients}) == 1, "each client starts from the round's weights"
        for before, after in itertools.pairwise(clients):
            assert before["ended"] <= after["started"], "served in turn, in order"
            assert after["probe_before"] == pytest.approx(before["probe_after"], rel=1e-9), "the same model goes on"
    _assert_client_segments_averaged(first, second)
