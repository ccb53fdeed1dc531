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
            RecordKey.METRICS: MetricRecord({"num-examples": 10}),
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


def test_parallel_averages_the_usable_replies_and_skips_one_without_weights(
    service: SplitService, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result, _ = run(ParallelStrategy(), breaking(2, lambda c: c.pop(RecordKey.ARRAYS)), service)
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], torch.full((2,), 2.0))  # mean of 1 and 3
    assert [c["node_id"] for c in result.rounds[1]["clients"]] == [1, 3]
    assert f"left out client 2's reply: expected one ArrayRecord named {RecordKey.ARRAYS!r}, got none" in caplog.text


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


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [({}, "got none"), ({"metrics": MetricRecord({"loss": 1.0})}, "got {'metrics': ['loss']}")],
)
def test_a_reply_without_its_example_count_is_left_out(
    service: SplitService, caplog: pytest.LogCaptureFixture, metrics: dict[str, MetricRecord], expected: str
) -> None:
    def replace_metrics(content: RecordDict) -> None:
        del content[RecordKey.METRICS]
        content.update(metrics)

    with caplog.at_level(logging.WARNING):
        result, _ = run(ParallelStrategy(), breaking(1, replace_metrics), service)
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], torch.full((2,), 2.5))  # mean of 2 and 3
    assert f"expected one MetricRecord holding 'num-examples', {expected}" in caplog.text


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
