"""Vanilla (sequential) split learning: one client at a time, the segment handed along."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from splitflower._tensor_record import record_tensors, tensor_record
from splitflower.errors import ConfigError
from splitflower.strategy import RoundPlan, SplitStrategy
from splitflower.wire import ConfigKey, RecordKey

__all__ = ["SequentialStrategy"]

_OPTIMIZER = "optimizer."  # carried_state's names of the handed-on optimizer state
_HANDED_ON = "the handed-on optimizer state"


class SequentialStrategy(SplitStrategy):
    """Clients train one after another on one server model; each starts from the
    client segment the previous client returned (LocFedMix-SL, eq. 3). The round's
    client weights are those of the last client that finished. A subclass that sets
    ``hands_on = False`` starts every client from the round's weights instead and
    averages the returned segments (FedAvg).

    ``hand_over_optimizer=True`` also hands the client optimizer's state (e.g. momentum
    buffers) from each client to the next, across rounds too, as if one optimizer trained
    the segment throughout (the DSL paper's single-process code does so); by default every
    client starts a fresh optimizer.

    Example
    -------
    >>> SequentialStrategy().order_clients([7, 3, 5])
    [3, 5, 7]
    """

    hands_on = True
    clients_at_once = False
    carried_names: ClassVar[Mapping[str, str]] = {_OPTIMIZER: "the optimizer state it hands on"}

    def __init__(self, *, hand_over_optimizer: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if hand_over_optimizer and not self.hands_on:
            raise ConfigError(f"{type(self).__name__} does not hand segments on, so it cannot hand optimizers on")
        self.hand_over_optimizer = hand_over_optimizer
        self._optimizer_state: ConfigRecord | None = None

    def train_round(
        self, grid: Grid, plan: RoundPlan, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> list[Message]:
        if self.hand_over_optimizer:
            config = ConfigRecord({**config, ConfigKey.HAND_OVER_OPTIMIZER: True})
        replies: list[Message] = []
        for node in plan.node_ids:
            message = self.client_message(plan, node, arrays, config)
            if self.hand_over_optimizer and self._optimizer_state is not None:
                message.content[RecordKey.OPTIMIZER] = self._optimizer_state
            reply = self.collect(plan, self.send_and_receive(grid, plan, [message], timeout), [node])
            replies += reply
            for answer in reply:
                # A failed or left-out client hands on the segment it was given.
                if self.hands_on and not answer.has_error():
                    arrays = answer.content.array_records[self.arrayrecord_key]
                    if self.hand_over_optimizer:
                        self._optimizer_state = answer.content.config_records[RecordKey.OPTIMIZER]
        return replies

    def reply_problem(self, reply: Message) -> str | None:
        """Also the optimizer state, when ``hand_over_optimizer`` asks clients for it."""
        problem = super().reply_problem(reply)
        if problem is None and self.hand_over_optimizer:
            record = reply.content.config_records.get(RecordKey.OPTIMIZER)
            if record is None:
                return f"hand_over_optimizer expects a ConfigRecord named {RecordKey.OPTIMIZER!r}, and none came"
            try:
                record_tensors(record, _HANDED_ON)
            except ConfigError as err:
                return str(err)
        return problem

    def carried_state(self) -> dict[str, torch.Tensor]:
        """Also the optimizer state to hand to the next round's first client, if any."""
        if self._optimizer_state is None:
            return super().carried_state()
        handed = record_tensors(self._optimizer_state, _HANDED_ON)
        return {**super().carried_state(), **{_OPTIMIZER + name: t for name, t in handed.items()}}

    def load_carried_state(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_carried_state(state)
        optimizer = {name.removeprefix(_OPTIMIZER): t for name, t in state.items() if name.startswith(_OPTIMIZER)}
        if optimizer and not self.hand_over_optimizer:
            raise ConfigError(
                f"{type(self).__name__} carries the optimizer state it hands on (names {_OPTIMIZER}*) only with "
                f"hand_over_optimizer=True, and it is False; got {sorted(optimizer)[:5]}"
            )
        self._optimizer_state = tensor_record(optimizer) if optimizer else None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.hands_on:
            return super().aggregate_train(server_round, replies)
        # No averaging: the segment the last client handed on is the round's result.
        handed_on, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not handed_on:
            return None, None
        metrics = self.train_metrics_aggr_fn([r.content for r in handed_on], self.weighted_by_key)
        return handed_on[-1].content[self.arrayrecord_key], metrics  # type: ignore[return-value]
