"""A client's malformed train reply is left out with a warning; the run goes on without it.

The strategies run against a scripted grid that answers each train message with the reply
its node's script builds, so each reply can be made malformed in one precise way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from splitflower.algorithms.csl import CSLServerModel
from splitflower.experiment import summarise_round
from splitflower.service import SplitService
from splitflower.strategies import ParallelStrategy, SequentialStrategy
from splitflower.strategy import SplitResult, SplitStrategy
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
    """A grid whose nodes answer train messages by script, and which keeps what it was sent."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: dict[int, list[Message]] = {node: [] for node in NODES}

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.received[node].append(message)
            replies.append(Message(content=self.script(node, message), reply_to=message))
        return replies


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
        content[RecordKey.OPTIMIZER] = ConfigRecord({"from": node})
    return content


def breaking(node: int, edit: Callable[[RecordDict], object]) -> Script:
    """Good replies from every node but ``node``, whose reply ``edit`` spoils."""

    def script(sender: int, message: Message) -> RecordDict:
        content = good_reply(sender, message)
        if sender == node:
            edit(content)
        return content

    return script


def run(strategy: SplitStrategy, script: Script, service: SplitService) -> tuple[SplitResult, ScriptedGrid]:
    grid = ScriptedGrid(script)
    result = strategy.start(
        grid,  # type: ignore[arg-type]
        ArrayRecord({"w": torch.zeros(2)}),
        num_rounds=1,
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
    assert third.config_records[RecordKey.OPTIMIZER]["from"] == 1, "client 1's state skips the left-out reply"
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
