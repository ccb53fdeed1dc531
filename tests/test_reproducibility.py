"""The same config and seed give the same weights, run after run: Flower draws new node ids
in each run, and clients are ordered, batched and averaged by their partition instead.

Strategies that serve one client at a time, or give each client its own server model, are
exact. Where clients training at once share a server model, it steps in the clients' order
(a request of each in turn, or one batch of them concatenated in that order), so those runs
are exact while every turn or batch holds a request of each client (none ran on the flush
timeout). With ``request_order="arrival"`` it steps in the order requests arrive, which
differs between runs.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from conftest import ThreadBackend
from splitflower.compute import ComputeThread
from splitflower.experiment import ExperimentConfig
from splitflower.scheduling import ImmediateScheduler
from splitflower.server_model import ServerModel
from splitflower.simulation import run_experiment
from splitflower.strategy import SplitResult
from splitflower.wire import ConfigKey


def _train(config: ExperimentConfig) -> tuple[SplitResult, dict[str, object]]:
    kept: list[SplitResult] = []
    results = run_experiment(config, say=lambda _: None, keep_model=lambda _, result: kept.append(result))
    return kept[0], results


@pytest.mark.parametrize(
    ("algorithm", "strategy"),
    # LocFedMix-SL as the paper runs it: mixup (the server model's draws), decoders, averaging every round.
    [
        ("csl", "sequential"),
        ("csl", "splitfed-v1"),
        ("dsl", "splitfed-v2"),
        ("locfedmix", "batched"),
        ("csl", "parallel"),
        ("dsl", "parallel"),
    ],
)
def test_the_same_seed_gives_the_same_weights(algorithm: str, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(
        algorithm=algorithm,
        strategy=strategy,
        dataset="synthetic",
        clients=4,
        rounds=2,
        train_size=384,
        test_size=128,
        flush_timeout=30.0,  # a client thread that starts late on a loaded machine must not cost a whole batch
    )
    (first, first_results), (second, second_results) = _train(config), _train(config)
    servers = [s for run in (first, second) for r in run.rounds.values() for s in r["server_models"]]
    batched = [s["batching"] for s in servers if "batching" in s]
    in_turn = [s["in_client_order"] for s in servers if "in_client_order" in s]
    assert len(batched) == (4 if strategy == "batched" else 0)
    assert len(in_turn) == (4 if strategy == "parallel" else 0)
    assert all(b["requests"] == 4 * b["calls"] > 0 for b in batched), f"every batch whole: {batched}"
    assert all(t["requests"] == 4 * t["cycles"] > 0 for t in in_turn), f"every cycle whole: {in_turn}"
    for part in ("arrays", "server_arrays"):
        torch.testing.assert_close(
            getattr(first, part).to_torch_state_dict(), getattr(second, part).to_torch_state_dict(), rtol=0, atol=0
        )
    assert first_results["final"] == second_results["final"]


class _Noisy(ServerModel):
    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand(x.shape)  # the global RNG, as dropout and torch.distributions draw


def _draws(model: _Noisy, config: dict[str, int], calls: int = 3) -> list[torch.Tensor]:
    model.configure_fit(None, config)
    scheduler = ImmediateScheduler(model)
    drawn = []
    for _ in range(calls):
        torch.rand(7)  # the process draws between calls (a client of this process, say)
        drawn.append(scheduler.run("client-0", "noise", {"x": torch.zeros(4)}).value)
    return drawn


def test_a_server_model_draws_its_own_seeded_stream_each_round_and_leaves_the_process_s_alone() -> None:
    round_2 = {ConfigKey.SEED: 3, ConfigKey.SERVER_ROUND: 2, ConfigKey.SERVER_MODEL_INDEX: 0}
    first = _draws(_Noisy(nn.Identity()), round_2)
    torch.manual_seed(12345)  # what the process's RNG holds does not matter
    again = _draws(_Noisy(nn.Identity()), round_2)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(first[0], first[1]), "one stream through the round, not reseeded per call"
    for other in ({ConfigKey.SERVER_ROUND: 3}, {ConfigKey.SERVER_MODEL_INDEX: 1}, {ConfigKey.SEED: 4}):
        assert not torch.equal(_draws(_Noisy(nn.Identity()), {**round_2, **other})[0], first[0]), other
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    model = _Noisy(nn.Identity())
    model.configure_fit(None, round_2)
    ImmediateScheduler(model).run("client-0", "noise", {"x": torch.zeros(4)})
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_calls_that_overlap_on_compute_threads_of_their_own_do_not_wait_for_each_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first_is_running, let_it_finish = threading.Event(), threading.Event()

    class Waits(ServerModel):
        def wait(self, x: torch.Tensor) -> torch.Tensor:
            first_is_running.set()
            let_it_finish.wait(10)
            return x + torch.rand(x.shape)

    round_1 = {ConfigKey.SEED: 0, ConfigKey.SERVER_ROUND: 1}
    waits, noisy = Waits(nn.Identity()), _Noisy(nn.Identity())
    waits.configure_fit(None, round_1)
    noisy.configure_fit(None, round_1)
    first = threading.Thread(
        target=ImmediateScheduler(waits, compute=ComputeThread()).run, args=("a", "wait", {"x": torch.zeros(1)})
    )
    first.start()
    assert first_is_running.wait(10)
    outcome = ImmediateScheduler(noisy, compute=ComputeThread()).run("b", "noise", {"x": torch.zeros(4)})
    let_it_finish.set()
    first.join(10)
    assert outcome.error is None and not first.is_alive()
    assert "overlapping calls share it, so their draws do not repeat with the seed" in caplog.text
