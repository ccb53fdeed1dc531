"""A client's malformed train reply is left out with a warning; the run goes on without it.

The strategies run against a scripted grid that answers each train message with the reply
its node's script builds, so each reply can be made malformed in one precise way.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any
from uuid import uuid4

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from splitflower._client_states import own_state_record
from splitflower._tensor_record import record_tensors, tensor_record
from splitflower.algorithms.csl import CSLServerModel
from splitflower.errors import ConfigError
from splitflower.results import summarise_round
from splitflower.scheduling import ImmediateScheduler
from splitflower.service import SplitService
from splitflower.strategies import ParallelStrategy, SequentialStrategy
from splitflower.strategy import RoundPlan, SplitResult, SplitStrategy
from splitflower.wire import ConfigKey, RecordKey

NODES = [1, 2, 3]
Script = Callable[[int, Message], RecordDict]


@pytest.fixture(autouse=True)
def _flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Messages are built outside a Flower run here: give them the identity a run would.
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    yield


class ScriptedGrid:
    """A grid whose nodes answer train messages by script, and which keeps what it was sent.
    Each node answers the strategy's identification query with its entry in ``identities``
    (a client id; None: no id; an Error: the query failed there)."""

    def __init__(
        self,
        script: Script,
        identities: Mapping[int, int | str | Error | None] | None = None,
        *,
        silent: Collection[int] = (),
        reverse: bool = False,
    ) -> None:
        self.script = script
        self.identities = dict(identities or {})
        self.silent = set(silent)  # nodes that never answer the query
        self.reverse = reverse  # replies come back in the reverse order of the messages
        self.received: dict[int, list[Message]] = {node: [] for node in NODES}  # train messages
        self.trained: list[int] = []  # nodes in the order their train messages were sent
        self.asked: list[int] = []  # nodes in the order they were asked who they are
        self.query_timeouts: list[float | None] = []  # how long each query waited at most
        self._replies: list[Message] = []  # pushed messages' replies, not pulled yet

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if any(m.metadata.message_type == MessageType.QUERY for m in messages):
            self.query_timeouts.append(timeout)
        return self.pull_messages(self.push_messages(messages))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        sent = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids number what they send
            sent.append(message.metadata.message_id)
            reply = self._answer(message)
            if reply is not None:
                self._replies.append(reply)
        return sent

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        came = [reply for reply in self._replies if reply.metadata.reply_to_message_id in wanted]
        self._replies = [reply for reply in self._replies if reply.metadata.reply_to_message_id not in wanted]
        return came[::-1] if self.reverse else came

    def _answer(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.QUERY:
            self.asked.append(node)
            return None if node in self.silent else self._identify(node, message)
        self.received[node].append(message)
        self.trained.append(node)
        return Message(content=self.script(node, message), reply_to=message)

    def _identify(self, node: int, message: Message) -> Message:
        identity = self.identities.get(node)
        if isinstance(identity, Error):
            return Message(identity, reply_to=message)
        content = RecordDict()
        if identity is not None:
            content[RecordKey.CLIENT_ID] = ConfigRecord({RecordKey.VALUE: identity})
        return Message(content=content, reply_to=message)


def good_reply(node: int, message: Message) -> RecordDict:
    """Weights all equal to the node id, 10 examples, and the optimizer state if asked."""
    content = RecordDict(
        {
            RecordKey.ARRAYS: ArrayRecord({"w": torch.full((2,), float(node))}),
            RecordKey.METRICS: MetricRecord({RecordKey.NUM_EXAMPLES: 10}),
            RecordKey.WIRE_MANIFEST: ConfigRecord({RecordKey.VALUE: "{}"}),
        }
    )
    if message.content.config_records[RecordKey.CONFIG].get(ConfigKey.HAND_OVER_OPTIMIZER):
        content[RecordKey.OPTIMIZER] = tensor_record({"from": torch.tensor(node)})
    return content


def breaking(node: int, edit: Callable[[RecordDict], object]) -> Script:
    """Good replies from every node but ``node``, whose reply ``edit`` spoils."""

    def script(sender: int, message: Message) -> RecordDict:
        content = good_reply(sender, message)
        if sender == node:
            edit(content)
        return content

    return script


def run(
    strategy: SplitStrategy,
    script: Script,
    service: SplitService,
    identities: Mapping[int, int | str | Error | None] | None = None,
    rounds: int = 1,
    train_config: ConfigRecord | None = None,
    **grid_options: Any,
) -> tuple[SplitResult, ScriptedGrid]:
    grid = ScriptedGrid(script, identities, **grid_options)
    result = strategy.start(
        grid,  # type: ignore[arg-type]
        ArrayRecord({"w": torch.zeros(2)}),
        num_rounds=rounds,
        train_config=train_config,
        service=service,
        server_model_factory=lambda: CSLServerModel(nn.Linear(2, 2)),
    )
    return result, grid


def test_parallel_averages_the_usable_replies_and_records_the_left_out_one(
    service: SplitService, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result, _ = run(ParallelStrategy(), breaking(2, lambda c: c.pop(RecordKey.ARRAYS)), service)
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], torch.full((2,), 2.0))  # mean of 1 and 3
    problem = f"expected one ArrayRecord named {RecordKey.ARRAYS!r}, got none"
    assert f"left out client 2's reply: {problem}" in caplog.text
    clients = {c["node_id"]: c for c in result.rounds[1]["clients"]}
    assert sorted(clients) == NODES and clients[2]["left_out"] == problem and "metrics" not in clients[2]
    assert summarise_round(result.rounds[1])["failed_clients"] == [2]


def test_sequential_hands_on_past_a_reply_without_the_optimizer_state(
    service: SplitService, caplog: pytest.LogCaptureFixture
) -> None:
    script = breaking(2, lambda c: c.pop(RecordKey.OPTIMIZER))
    with caplog.at_level(logging.WARNING):
        result, grid = run(SequentialStrategy(hand_over_optimizer=True), script, service)
    third = grid.received[3][0].content
    torch.testing.assert_close(third.array_records[RecordKey.ARRAYS].to_torch_state_dict()["w"], torch.ones(2))
    handed = record_tensors(third.config_records[RecordKey.OPTIMIZER], "handed")
    assert handed["from"].item() == 1, "client 1's state skips the left-out reply"
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], torch.full((2,), 3.0))
    expected = f"left out client 2's reply: hand_over_optimizer expects a ConfigRecord named {RecordKey.OPTIMIZER!r}"
    assert expected in caplog.text


def _metrics(record: MetricRecord | None) -> Callable[[RecordDict], None]:
    def replace(content: RecordDict) -> None:
        del content[RecordKey.METRICS]
        if record is not None:
            content[RecordKey.METRICS] = record

    return replace


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (_metrics(None), f"expected one MetricRecord holding {RecordKey.NUM_EXAMPLES!r}, got none"),
        (_metrics(MetricRecord({"loss": 1.0})), f"holding {RecordKey.NUM_EXAMPLES!r}, got {{'metrics': ['loss']}}"),
        (_metrics(MetricRecord({RecordKey.NUM_EXAMPLES: [10, 10]})), "to be a number >= 0, got [10, 10]"),
        (_metrics(MetricRecord({RecordKey.NUM_EXAMPLES: -10})), "to be a number >= 0, got -10"),
        (
            lambda c: c.__setitem__(RecordKey.ARRAYS, ArrayRecord({"w": torch.ones(2), "extra": torch.ones(1)})),
            "its names differ from the round's first reply's (weights missing none, unexpected ['extra'])",
        ),
        (
            _metrics(MetricRecord({RecordKey.NUM_EXAMPLES: 10, "loss": 0.5})),
            "(metrics missing none, unexpected ['loss'])",
        ),
    ],
    ids=["no-metrics", "no-example-count", "count-is-a-list", "negative-count", "other-weights", "other-metrics"],
)
def test_a_reply_that_cannot_be_averaged_with_the_others_is_left_out(
    service: SplitService, caplog: pytest.LogCaptureFixture, spoil: Callable[[RecordDict], object], expected: str
) -> None:
    with caplog.at_level(logging.WARNING):
        result, _ = run(ParallelStrategy(), breaking(3, spoil), service)
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], torch.full((2,), 1.5))  # mean of 1 and 2
    assert expected in caplog.text


def test_an_unreadable_wire_manifest_is_dropped_from_the_round_record(
    service: SplitService, caplog: pytest.LogCaptureFixture
) -> None:
    def spoil_manifest(content: RecordDict) -> None:
        content[RecordKey.WIRE_MANIFEST] = ConfigRecord({RecordKey.VALUE: "{not json"})

    with caplog.at_level(logging.WARNING):
        result, _ = run(ParallelStrategy(), breaking(3, spoil_manifest), service)
    clients = result.rounds[1]["clients"]
    assert ["wire" in c for c in clients] == [True, True, False]
    assert "client 3's wire manifest is unreadable" in caplog.text


def test_clients_are_visited_in_the_order_of_their_client_ids(service: SplitService) -> None:
    # Node ids are drawn anew in each run; client ids (partitions) are what make a run repeatable.
    identities: dict[int, int | str | Error | None] = {1: 2, 2: 0, 3: 1}
    result, grid = run(SequentialStrategy(), good_reply, service, identities, rounds=2)
    assert grid.trained == [2, 3, 1, 2, 3, 1]
    assert sorted(grid.asked) == NODES, "each node is asked once"
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], torch.ones(2), msg="node 1 (client 2) last")
    assert [c["node_id"] for c in result.rounds[1]["clients"]] == [2, 3, 1]


def test_replies_are_averaged_and_recorded_in_the_order_of_their_client_ids(service: SplitService) -> None:
    # Floating-point sums depend on their order: replies are taken in the round's order, not as they came.
    identities: dict[int, int | str | Error | None] = {1: 2, 2: 0, 3: 1}
    for reverse in (False, True):
        result, _ = run(ParallelStrategy(), good_reply, service, identities, reverse=reverse)
        assert [c["node_id"] for c in result.rounds[1]["clients"]] == [2, 3, 1], f"replies reversed: {reverse}"


def test_a_node_that_does_not_say_which_client_it_is_comes_last_and_is_named(
    service: SplitService, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="splitflower.strategy"):
        strategy = SequentialStrategy(node_wait_timeout=5)
        _, grid = run(strategy, good_reply, service, {1: 1, 2: 0, 3: 2}, silent=[2], rounds=2)
    assert grid.query_timeouts == [5, 5], "a silent node holds the round up no longer than a lost one would"
    assert grid.trained == [1, 3, 2] * 2
    assert sorted(grid.asked[:3]) == NODES and grid.asked[3:] == [2], "a node that did not answer is asked again"
    assert "nodes [2] did not say which client they are; ordered by node id" in caplog.text


def test_numbered_clients_come_before_named_ones_and_unknown_ones_last(service: SplitService) -> None:
    failed = Error(0, "no query handler")
    cases: list[tuple[dict[int, int | str | Error | None], list[int]]] = [
        ({1: "b", 2: None, 3: 7}, [3, 1, 2]),
        ({1: failed, 2: "a", 3: None}, [2, 1, 3]),
    ]
    for identities, order in cases:
        _, grid = run(SequentialStrategy(), good_reply, service, identities)
        assert grid.trained == order, identities


def test_two_nodes_that_are_one_client_stop_the_run_before_it_trains(service: SplitService) -> None:
    grid = ScriptedGrid(good_reply, {1: 0, 2: 5, 3: 0})
    with pytest.raises(
        ConfigError,
        match=re.escape("round 1, before it trains: several nodes are the same client (client 0 from nodes [1, 3])"),
    ):
        ParallelStrategy().start(
            grid,  # type: ignore[arg-type]
            ArrayRecord({"w": torch.zeros(2)}),
            num_rounds=1,
            service=service,
            server_model_factory=lambda: CSLServerModel(nn.Linear(2, 2)),
        )
    assert grid.trained == []


def test_nodes_that_cannot_say_who_they_are_but_reply_as_one_client_stop_the_run(service: SplitService) -> None:
    # A ClientApp of the user's own may answer no query, yet name its client in its replies.
    def as_client_0(node: int, message: Message) -> RecordDict:
        content = good_reply(node, message)
        content[RecordKey.CLIENT_ID] = ConfigRecord({RecordKey.VALUE: 0 if node != 2 else 1})
        return content

    unanswered = {node: Error(0, "no query handler") for node in NODES}
    with pytest.raises(
        ConfigError, match=re.escape("round 1: several nodes replied as the same client (client 0 from nodes [1, 3])")
    ):
        run(ParallelStrategy(), as_client_0, service, unanswered, rounds=2)


def test_a_client_id_learnt_from_a_train_reply_replaces_the_node_s_earlier_answer(service: SplitService) -> None:
    # A SuperNode that reconnects under its node id may come back as another partition.
    def as_reversed_clients(node: int, message: Message) -> RecordDict:
        content = good_reply(node, message)
        content[RecordKey.CLIENT_ID] = ConfigRecord({RecordKey.VALUE: -node})
        return content

    _, grid = run(SequentialStrategy(), as_reversed_clients, service, {1: 0, 2: 1, 3: 2}, rounds=2)
    assert grid.trained == [1, 2, 3, 3, 2, 1]
    assert sorted(grid.asked) == NODES


def test_a_sample_of_the_clients_is_the_same_whatever_node_ids_they_have(service: SplitService) -> None:
    # Flower's own sampling is random.sample over node ids: a run would train other clients each time.
    def sampled_clients(identities: dict[int, int | str | Error | None], seed: int) -> list[int | str | Error | None]:
        """The client trained in each of 6 rounds (fraction 0.5 of 3 nodes: one a round)."""
        strategy = ParallelStrategy(fraction_train=0.5, min_train_nodes=1)
        config = ConfigRecord({ConfigKey.SEED: seed})
        _, grid = run(strategy, good_reply, service, identities, rounds=6, train_config=config)
        return [identities[node] for node in grid.trained]

    one_run = sampled_clients({1: 0, 2: 1, 3: 2}, seed=0)
    assert len(one_run) == 6 and len(set(one_run)) > 1, "one client a round, not always the same"
    assert sampled_clients({1: 2, 2: 0, 3: 1}, seed=0) == one_run
    assert sampled_clients({1: 0, 2: 1, 3: 2}, seed=1) != one_run, "another seed, another sample"
    with pytest.raises(ConfigError, match="train config's 'seed' must be an int"):
        run(ParallelStrategy(fraction_train=0.5), good_reply, service, train_config=ConfigRecord({ConfigKey.SEED: "0"}))


def test_a_reply_whose_optimizer_state_is_no_tensor_frame_is_left_out() -> None:
    strategy = SequentialStrategy(hand_over_optimizer=True)
    content = RecordDict(
        {
            RecordKey.ARRAYS: ArrayRecord({"segment.w": torch.ones(1)}),
            RecordKey.METRICS: MetricRecord({RecordKey.NUM_EXAMPLES: 8}),
            RecordKey.OPTIMIZER: ConfigRecord({RecordKey.VALUE: b"not a frame"}),
        }
    )
    reply = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
    assert "the handed-on optimizer state is not a valid tensor frame" in str(strategy.reply_problem(reply))


def _reply_with_own_state(node: int, message: Message) -> RecordDict:
    """A good reply whose client keeps state of its own: its weights ("w", sent once), and "n":
    what it was given back plus 1, else the node id."""
    content = good_reply(node, message)
    given = message.content.config_records.get(RecordKey.LOCAL_STATE)
    state = record_tensors(given, "given")["n"] + 1 if given is not None else torch.tensor(float(node))
    weights = content[RecordKey.ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
    content[RecordKey.LOCAL_STATE] = own_state_record({"n": state, "w": weights["w"]}, weights)
    assert sorted(record_tensors(content[RecordKey.LOCAL_STATE], "sent")) == ["n"], "w goes by name only"
    return content


def test_clients_own_states_are_carried_and_given_back_once_after_a_resume(service: SplitService) -> None:
    identities: dict[int, int | str | Error | None] = {1: 0, 2: 1, 3: "c"}
    saved, _ = run(ParallelStrategy(), _reply_with_own_state, service, identities, rounds=2)
    assert saved.strategy_state is not None
    own = {name: float(t) for name, t in saved.strategy_state.items() if name.endswith(":n")}
    assert own == {"client:0:n": 1.0, "client:1:n": 2.0, 'client:"c":n': 3.0}
    torch.testing.assert_close(saved.strategy_state['client:"c":w'], torch.full((2,), 3.0))  # node 3's weights
    resumed = ParallelStrategy()
    resumed.load_carried_state({**saved.strategy_state, "client:7:n": torch.tensor(70.0)})  # 7: not connected now
    # Other node ids this time: the state goes by client id.
    result, grid = run(resumed, _reply_with_own_state, service, {3: 0, 1: 1, 2: "c"}, rounds=2)
    given = {
        node: [m.content.config_records.get(RecordKey.LOCAL_STATE) for m in sent]
        for node, sent in grid.received.items()
    }
    assert {node: [record is not None for record in records] for node, records in given.items()} == {
        node: [True, False] for node in NODES
    }, "given back in the first round only: the reply then holds the newer state"
    assert float(record_tensors(given[3][0], "given")["n"]) == 1.0, "client 0's own, now on node 3"
    # The second round's replies (the script's node ids: nothing given) are what a file would hold now.
    assert {name: float(t) for name, t in (result.strategy_state or {}).items() if name.endswith(":n")} == {
        "client:0:n": 3.0,
        "client:1:n": 1.0,
        'client:"c":n': 2.0,
        "client:7:n": 70.0,
    }


def test_a_reply_whose_own_state_is_no_tensor_frame_is_left_out() -> None:
    content = RecordDict(
        {
            RecordKey.ARRAYS: ArrayRecord({"segment.w": torch.ones(1)}),
            RecordKey.METRICS: MetricRecord({RecordKey.NUM_EXAMPLES: 8}),
            RecordKey.LOCAL_STATE: ConfigRecord({RecordKey.VALUE: "text"}),
        }
    )
    reply = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
    assert "a reply's own state ('sf-local-state') must be a ConfigRecord holding a tensor frame" in str(
        ParallelStrategy().reply_problem(reply)
    )
    wrong = own_state_record({}, {})
    wrong[RecordKey.SAME_AS_WEIGHTS] = ["segment.w", "nope"]
    content[RecordKey.LOCAL_STATE] = wrong
    assert "'same-as-weights' must list names of the reply's weights ['segment.w'], got ['segment.w', 'nope']" in str(
        ParallelStrategy().reply_problem(reply)
    )


def test_a_loaded_state_is_not_given_again_once_the_client_has_replied(service: SplitService) -> None:
    # A client whose reply holds no state of its own (it keeps none now) trained from what it was given.
    strategy = ParallelStrategy()
    strategy.load_carried_state({"client:0:n": torch.tensor(1.0)})
    _, grid = run(strategy, good_reply, service, {1: 0, 2: 1, 3: 2}, rounds=2)
    given = [RecordKey.LOCAL_STATE in m.content.config_records for m in grid.received[1]]
    assert given == [True, False]


class _TricklingGrid:
    """A grid whose nodes reply on the pull ``reply_on`` gives them (never, if absent), and
    which cannot send to ``offline`` nodes; before each pull it notes the clients whose
    sessions have ended."""

    pull_interval = 0.01

    def __init__(self, reply_on: Mapping[int, int], offline: Collection[int], sessions: Mapping[int, Any]) -> None:
        self.reply_on, self.offline, self.sessions = dict(reply_on), set(offline), sessions
        self.sent: dict[str, Message] = {}
        self.ended_before_pull: list[set[int]] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids number what they send
            self.sent[message.metadata.message_id] = message
        return [i for i, m in self.sent.items() if m.metadata.dst_node_id not in self.offline]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.ended_before_pull.append({node for node, session in self.sessions.items() if session.finished})
        pull = len(self.ended_before_pull)
        wanted = [self.sent[i] for i in message_ids]
        return [Message(RecordDict(), reply_to=m) for m in wanted if self.reply_on.get(m.metadata.dst_node_id) == pull]


def test_each_client_s_session_ends_as_its_reply_comes_or_at_once_if_it_could_not_be_sent(
    service: SplitService,
) -> None:
    strategy = ParallelStrategy()
    strategy._service = service
    nodes = [1, 2, 3, 4]
    opened = {node: service.open_session(node, ImmediateScheduler(CSLServerModel(nn.Identity()))) for node in nodes}
    plan = RoundPlan(1, nodes, [], [], {}, tokens={node: token for node, (token, _) in opened.items()})
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
    plan.sent.extend(messages)
    # 1 replies on the first pull, 2 on the third, 3 never; 4 could not be sent to.
    grid = _TricklingGrid({1: 1, 2: 3}, offline={4}, sessions={node: session for node, (_, session) in opened.items()})
    started = time.monotonic()
    replies = strategy.send_and_receive(grid, plan, messages, timeout=0.3)  # type: ignore[arg-type]
    waited = time.monotonic() - started
    assert [plan.sender(reply) for reply in replies] == [1, 2]
    assert grid.ended_before_pull[:4] == [{4}, {1, 4}, {1, 4}, {1, 2, 4}]
    assert not opened[3][1].finished, "no reply: its session ends with the round (collect), not here"
    assert 0.3 <= waited < 2, "it waits the timeout for the client that never replies, then gives up"
