"""Strategies under Flower's simulation runtime (clients on threads, see conftest.ThreadBackend):
sequential hand-over, parallel averaging, client state."""

from __future__ import annotations

import copy
import itertools
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from conftest import connect, simulate
from splitflower.algorithms import ALGORITHMS, Algorithm, find_algorithm
from splitflower.algorithms.csl import CSLClient, CSLOptions, CSLServerModel
from splitflower.algorithms.dsl import DSLClient, DSLOptions, DSLServerModel
from splitflower.data import synthetic
from splitflower.errors import ConfigError, IncompatibleStrategyError, NotEnoughNodesError
from splitflower.experiment import Experiment, ExperimentConfig
from splitflower.server_model import FitResult
from splitflower.service import SplitService
from splitflower.split import split_model
from splitflower.strategies import ParallelStrategy, SequentialStrategy, find_strategy
from splitflower.strategy import RoundPlan, _round_record
from splitflower.wire import ConfigKey


def _checksum(weights: Mapping[str, torch.Tensor]) -> float:
    return float(sum(v.double().sum() for k, v in weights.items() if v.is_floating_point()))


class Recording(CSLClient):
    """Reports what it received and returned, and how many rounds it has seen (kept in context)."""

    rounds_seen = 0

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        received = _checksum(weights)
        result = super().fit(weights, config)
        self.rounds_seen += 1
        metrics = {**result.metrics, "received": received, "returned": _checksum(result.weights)}
        metrics["rounds_seen"] = float(self.rounds_seen)
        metrics["index"] = float(config[ConfigKey.CLIENT_INDEX])
        return FitResult(result.weights, result.num_examples, metrics)

    def local_state(self) -> dict[str, torch.Tensor]:
        return {"rounds_seen": torch.tensor(self.rounds_seen)}

    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.rounds_seen = int(state["rounds_seen"])


class RecordingOptimizer(Recording):
    """Also reports the optimizer state it was handed and the one it finished with."""

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        handed = self.handed_optimizer_state
        result = super().fit(weights, config)
        metrics = {**result.metrics, "handed_entries": float(len(handed)), "handed": _checksum(handed)}
        metrics["optimizer_returned"] = _checksum(self.optimizer_state())
        return FitResult(result.weights, result.num_examples, metrics)


def _simulate(
    strategy_name: str, rounds: int, client: type[Recording] = Recording, **extra: Any
) -> list[dict[str, Any]]:
    config = ExperimentConfig(
        algorithm="csl",
        strategy=strategy_name,
        dataset="synthetic",
        clients=3,
        rounds=rounds,
        synthetic_size=384,
        **extra,
    )
    return simulate(config, client)


@pytest.fixture(scope="module")
def sequential_records() -> list[dict[str, Any]]:
    """Two sequential rounds of three clients that hand their optimizer state on (one simulation
    serves both tests below)."""
    return _simulate("sequential", rounds=2, client=RecordingOptimizer, hand_over_optimizer=True)


def test_sequential_hands_each_client_the_previous_segment_and_keeps_client_state(
    sequential_records: list[dict[str, Any]],
) -> None:
    records = sequential_records
    assert len(records) == 2
    for record in records:
        clients = [c["metrics"] for c in record["clients"]]
        assert [c["index"] for c in clients] == [0.0, 1.0, 2.0], "visited in order"
        assert [c["client_id"] for c in record["clients"]] == [0, 1, 2], "in the order of their partitions"
        for before, after in itertools.pairwise(clients):
            assert after["received"] == pytest.approx(before["returned"], rel=1e-9)
    last_of_first = records[0]["clients"][-1]["metrics"]["returned"]
    assert records[1]["clients"][0]["metrics"]["received"] == pytest.approx(last_of_first, rel=1e-9)
    assert all(c["metrics"]["rounds_seen"] == 2.0 for c in records[1]["clients"]), "state kept in context.state"


def test_sequential_hands_the_optimizer_state_on_when_asked(sequential_records: list[dict[str, Any]]) -> None:
    clients = [c["metrics"] for record in sequential_records for c in record["clients"]]
    assert clients[0]["handed_entries"] == 0, "the very first client starts a fresh optimizer"
    for before, after in itertools.pairwise(clients):  # within a round and across rounds
        assert after["handed_entries"] > 0
        assert after["handed"] == pytest.approx(before["optimizer_returned"], rel=1e-9)


def test_parallel_starts_every_client_from_the_same_weights() -> None:
    (record,) = _simulate("parallel", rounds=1)
    received = {c["metrics"]["received"] for c in record["clients"]}
    assert len(received) == 1
    assert len({c["metrics"]["returned"] for c in record["clients"]}) == 3
    assert sorted(c["client_id"] for c in record["clients"]) == [0, 1, 2], "each reports its partition"


class OnePartitionForAll(Recording):
    """Every node trains partition 0, as SuperNodes all started with partition-id=0 would."""

    def __init__(self, *args: Any, client_id: int | str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, client_id=0, **kwargs)


def test_two_nodes_that_are_one_client_stop_the_run_before_it_trains() -> None:
    with pytest.raises(RuntimeError) as raised:
        _simulate("parallel", rounds=2, client=OnePartitionForAll)
    error = raised.value.__cause__
    assert isinstance(error, ConfigError), raised.value
    assert re.match(
        r"round 1, before it trains: several nodes are the same client \(client 0 from nodes \[\d+, \d+, \d+\]\)",
        str(error),
    )
    assert 'give each SuperNode its own partition (flower-supernode --node-config "partition-id=I' in str(error)


def test_strategy_defaults() -> None:
    assert ParallelStrategy().num_server_models(5) == 1
    assert SequentialStrategy().order_clients([9, 2, 4]) == [2, 4, 9]


def test_dsl_sends_nothing_back_and_half_of_csl(service: SplitService) -> None:
    """Same data and batches: DSL's activation payload is exactly half of CSL's, none downstream."""
    train, _ = synthetic(96, 8, num_classes=3, input_shape=(1, 8, 8), seed=2)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72, 3))
    bottom, top = split_model(model, 2)
    config = {ConfigKey.LR: 0.01, ConfigKey.BATCH_SIZE: 16, ConfigKey.LOCAL_EPOCHS: 1}
    traffic = {}
    for name, client_cls, server_cls in (("dsl", DSLClient, DSLServerModel), ("csl", CSLClient, None)):
        server = (server_cls or CSLServerModel)(copy.deepcopy(top))
        server.configure_fit(None, config)
        client = client_cls(copy.deepcopy(bottom), train)
        client.server_model_proxy = connect(service, server, client=name)
        client.fit({}, config)
        client.server_model_proxy.close()
        traffic[name] = client.server_model_proxy.traffic
    dsl, csl = traffic["dsl"].by_method()["train_batch"], traffic["csl"].by_method()["forward_backward"]
    assert dsl["down_payload_bytes"] == 0
    labels = 96 * 8  # int64 labels, sent by both
    assert 2 * (dsl["up_payload_bytes"] - labels) == csl["up_payload_bytes"] - labels + csl["down_payload_bytes"]


class _GatedDSLServer(DSLServerModel):
    gate = threading.Event()

    def train_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        self.gate.wait(10)
        super().train_batch(embeddings=embeddings, labels=labels)


class _CountingDSLClient(DSLClient):
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        metrics = super().train_step(x, y)
        self.steps_done = getattr(self, "steps_done", 0) + 1
        return metrics


@pytest.mark.parametrize("window", [0, 1, 3])
def test_dsl_window_bounds_the_batches_the_client_runs_ahead(service: SplitService, window: int) -> None:
    """While the server is stalled, the client completes exactly ``window`` steps (0: it waits every batch)."""
    train, _ = synthetic(80, 8, num_classes=3, input_shape=(1, 8, 8), seed=2)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72, 3))
    bottom, top = split_model(model, 2)
    config = {ConfigKey.LR: 0.01, ConfigKey.BATCH_SIZE: 8, ConfigKey.LOCAL_EPOCHS: 1}
    server = _GatedDSLServer(top)
    server.configure_fit(None, config)
    _GatedDSLServer.gate = threading.Event()
    client = _CountingDSLClient(bottom, train, options=DSLOptions(window=window))
    client.server_model_proxy = connect(service, server, max_in_flight=client.max_in_flight)
    runner = threading.Thread(target=client.fit, args=({}, config))
    runner.start()
    time.sleep(1.0)
    ahead = getattr(client, "steps_done", 0)
    _GatedDSLServer.gate.set()
    runner.join(30)
    client.server_model_proxy.close()
    assert ahead == window
    assert server.get_fit_result().num_examples == 80


def test_algorithm_options_are_parsed_by_type_and_refused_clearly() -> None:
    csl = ALGORITHMS["csl"]
    assert csl.parse_options(["window=4"]) == CSLOptions(window=4)
    assert csl.parse_options([]) == CSLOptions()
    with pytest.raises(ConfigError, match=r"unknown option 'widow' \(known: window\)"):
        csl.parse_options(["widow=4"])
    with pytest.raises(ConfigError, match="option 'window': expected int, got 'four'"):
        csl.parse_options(["window=four"])
    with pytest.raises(ConfigError, match="window must be at least 1, got 0"):
        csl.parse_options(["window=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE, got 'window'"):
        csl.parse_options(["window"])
    with pytest.raises(ConfigError, match="window must be at least 1"):
        ExperimentConfig(algorithm="csl", options=("window=0",)).validate()
    with pytest.raises(ConfigError, match="window must be 0 \\(blocking\\) to 32, got 33"):
        ALGORITHMS["dsl"].parse_options(["window=33"])  # more than a proxy keeps in flight
    with pytest.raises(ConfigError, match="options must be a tuple of strings"):
        ExperimentConfig(algorithm="csl", options=["window=2"]).validate()  # type: ignore[arg-type]
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match=f"option 'lam': expected a finite number, got '{value}'"):
            ALGORITHMS["dsl"].parse_options([f"lam={value}"])
    with pytest.raises(ConfigError, match=r"option 'window' given twice \(2, then '3'\); give it once"):
        csl.parse_options(["window=2", "window=3"])
    with pytest.raises(ConfigError, match=r"invalid options for 'locfedmix':\n  - alpha must be > 0, got 0.0$"):
        ALGORITHMS["locfedmix"].parse_options(["alpha=0"])
    # validate() names every problem at once, those of the algorithm's options and strategy too
    with pytest.raises(IncompatibleStrategyError) as caught:
        ExperimentConfig(algorithm="splitavg", strategy="parallel", lr=-1.0, options=("nope=1",)).validate()
    for problem in ("lr must be positive", "runs under batched, not 'parallel'", "unknown option 'nope'"):
        assert problem in str(caught.value)


def test_options_reach_both_parties_of_an_experiment() -> None:
    experiment = Experiment(
        ExperimentConfig(algorithm="dsl", dataset="synthetic", synthetic_size=64, options=("window=0",))
    )
    client = experiment.make_client(0)
    assert client.options == DSLOptions(window=0)
    assert client.max_in_flight == 1
    assert experiment.make_server_model().options == DSLOptions(window=0)


class _FrozenClient(CSLClient):
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            z = self.segment(x)
        self.server_model_proxy.forward_backward(embeddings=z, labels=y)
        return {}


def test_a_client_whose_segment_has_no_trainable_parameters_trains_without_an_optimizer(
    service: SplitService,
) -> None:
    train, _ = synthetic(32, 8, num_classes=3, input_shape=(1, 8, 8), seed=2)
    bottom, top = split_model(
        torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 3)), 2
    )
    bottom.requires_grad_(False)
    before = copy.deepcopy(bottom.state_dict())
    server = CSLServerModel(top)
    server.configure_fit(None, {})
    client = _FrozenClient(bottom, train)
    client.server_model_proxy = connect(service, server)
    fit = client.fit({}, {ConfigKey.BATCH_SIZE: 8})
    client.server_model_proxy.close()
    assert client.optimizer is None
    assert fit.num_examples == 32 and server.get_fit_result().num_examples == 32
    torch.testing.assert_close({k.removeprefix("segment."): v for k, v in fit.weights.items()}, before)


class _Grid:
    """The Grid methods a round's start uses: the nodes connected so far, and the
    identification query (no node answers it here)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: object, *, timeout: float | None = None) -> list[object]:
        return []


def test_a_round_waiting_for_clients_says_how_many_have_connected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("splitflower.strategy._NODE_WAIT_REPORT_S", 0.1)
    strategy = ParallelStrategy(min_train_nodes=3, min_available_nodes=3, node_wait_timeout=1.5)
    with caplog.at_level("WARNING", logger="splitflower.strategy"), pytest.raises(NotEnoughNodesError):
        strategy._wait_for_nodes(_Grid([1, 2]))  # type: ignore[arg-type]
    assert "[server] waiting for clients: 2 of 3 connected" in caplog.text


def test_a_round_waiting_for_clients_that_never_connect_fails_saying_so() -> None:
    strategy = ParallelStrategy(min_train_nodes=3, min_available_nodes=3, node_wait_timeout=0.3)
    started = time.perf_counter()
    with pytest.raises(NotEnoughNodesError, match=r"needs 3 clients .* only 2 connected within 0.3s"):
        strategy._wait_for_nodes(_Grid([1, 2]))  # type: ignore[arg-type]
    assert time.perf_counter() - started < 2
    assert strategy._wait_for_nodes(_Grid([1, 2, 3])) == [1, 2, 3]  # type: ignore[arg-type]


def test_a_strategy_assigning_a_server_model_that_does_not_exist_is_told_so() -> None:
    class OffByOne(ParallelStrategy):
        def assign(self, index: int, num_clients: int) -> int:
            return 1

    strategy = OffByOne(node_wait_timeout=1)
    strategy._server_model_factory = lambda: CSLServerModel(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"OffByOne.assign\(0, 2\) returned 1, but num_server_models\(2\) is 1"):
        strategy._plan_round(1, _Grid([1, 2]), ArrayRecord(), ConfigRecord(), 1.0)  # type: ignore[arg-type]


def test_an_algorithm_of_one_s_own_is_found_by_module_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.py").write_text(
        "from splitflower.algorithms import Algorithm, CSLClient, CSLServerModel\n"
        "MINE = Algorithm('mine', CSLClient, CSLServerModel, 'sequential', ('sequential',))\n"
        "NOT_ONE = 3\n"
        "from splitflower.strategies import SequentialStrategy\n"
        "class Mine(SequentialStrategy):\n"
        "    pass\n"
    )
    (tmp_path / "needs_more.py").write_text("import not_installed_here\n")
    (tmp_path / "broken.py").write_text("def (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = find_algorithm("mine:MINE")
    assert isinstance(found, Algorithm) and found.name == "mine"
    config = ExperimentConfig(algorithm="mine:MINE", dataset="synthetic").validate()
    assert config.strategy == "sequential", "the algorithm's own default strategy"
    assert isinstance(Experiment(config).make_client(0), CSLClient)
    assert find_strategy("mine:Mine").__name__ == "Mine"
    strategy = Experiment(ExperimentConfig(algorithm="csl", strategy="mine:Mine", dataset="synthetic")).make_strategy()
    assert type(strategy).__name__ == "Mine"
    with pytest.raises(ConfigError, match=r"strategy 'mine:MINE' must be a SplitStrategy subclass"):
        ExperimentConfig(strategy="mine:MINE", dataset="synthetic").validate()
    for name, message in (
        ("mine:NOT_ONE", "must be an Algorithm, got int"),
        ("mine:MISSING", "module .mine. has nothing named .MISSING."),
        ("nowhere_to_be_found:X", "no module 'nowhere_to_be_found'.*PYTHONPATH"),
        ("needs_more:X", "importing module 'needs_more' failed: No module named 'not_installed_here'"),
        ("broken:X", "importing module 'broken' raised SyntaxError"),
        ("cls", r"algorithm must be one of \['csl', .*\], or MODULE:ATTRIBUTE"),
    ):
        with pytest.raises(ConfigError, match=message):
            ExperimentConfig(algorithm=name, dataset="synthetic").validate()


def test_the_superlink_s_error_reply_for_a_lost_node_is_recorded_under_that_node() -> None:
    # Flower's Messages need a run; these stand-ins carry what the strategy reads of them.
    sent = [SimpleNamespace(metadata=SimpleNamespace(message_id=f"sent-{n}", dst_node_id=n)) for n in (5, 6)]
    lost = SimpleNamespace(  # the SuperLink (node 1) answers for node 5, which it lost
        metadata=SimpleNamespace(reply_to_message_id="sent-5", src_node_id=1),
        has_error=lambda: True,
        error=SimpleNamespace(reason="Node Unavailable"),
    )
    with SplitService() as service:
        strategy = ParallelStrategy(min_train_nodes=2, min_available_nodes=2)
        strategy._service = service
        plan = RoundPlan(1, [5, 6], [], [], {}, sent=sent)  # type: ignore[arg-type]
        record = _round_record(plan, strategy.collect(plan, [lost], [5, 6]), [], 1.0)  # type: ignore[list-item]
    by_node = {entry["node_id"]: entry["error"] for entry in record["clients"]}
    assert by_node[5] == "Node Unavailable"
    assert 1 not in by_node, "the SuperLink's own id is no client"
    assert "no reply" in by_node[6]


def test_the_sequential_strategy_carries_its_optimizer_state_and_refuses_what_it_does_not_carry() -> None:
    state = {"optimizer.0.momentum_buffer": torch.arange(4.0), "optimizer.1.step": torch.tensor(3.0)}
    handing = SequentialStrategy(hand_over_optimizer=True)
    assert handing.carried_state() == {}
    handing.load_carried_state(state)
    torch.testing.assert_close(handing.carried_state(), state)
    refusals = {
        "(names optimizer.*) only with hand_over_optimizer=True, and it is False; got ['0.momentum_buffer'": (
            SequentialStrategy(),
            state,
        ),
        "(client:*) between rounds, but was given ['momentum']": (
            SequentialStrategy(hand_over_optimizer=True),
            {"momentum": torch.ones(1)},
        ),
        "ParallelStrategy carries only clients' own states (client:*) between rounds, but was given ['optimizer.0": (
            ParallelStrategy(),
            state,
        ),
        "named client:<client id as JSON>:<tensor name>, got 'client:[3]:w'": (
            ParallelStrategy(),
            {"client:[3]:w": torch.ones(1)},
        ),
    }
    for message, (strategy, given) in refusals.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            strategy.load_carried_state(given)


@pytest.mark.parametrize(
    ("option", "seconds"),
    [("call_timeout", 0), ("call_timeout", float("nan")), ("node_wait_timeout", -1.0), ("node_wait_timeout", None)],
)
def test_a_timeout_that_is_not_positive_finite_seconds_is_refused(option: str, seconds: object) -> None:
    with pytest.raises(ConfigError, match=f"{option} must be a positive, finite number of seconds"):
        ParallelStrategy(**{option: seconds})


def test_building_a_strategy_warns_of_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    for name in ("parallel", "sequential", "batched", "splitfed-v1", "splitfed-v2"):
        find_strategy(name)()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
