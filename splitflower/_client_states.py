"""Each client's own state (``Client.local_state``: e.g. LocFedMix's segment between two
averagings) as the strategy keeps it from the clients' replies, so that a model file holds it
and a run resumed from that file gives each client its own back."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from splitflower._tensor_record import record_tensors, tensor_record
from splitflower.errors import ConfigError
from splitflower.wire import RecordKey

__all__ = ["CLIENT_STATE_PREFIX", "ClientStates", "own_state_record"]

logger = logging.getLogger(__name__)

CLIENT_STATE_PREFIX = "client:"
"""A carried state's names: ``client:<client id as JSON>:<tensor name>``."""

ClientId = int | str
_REPLY_STATE = f"a reply's own state ({RecordKey.LOCAL_STATE!r})"


def own_state_record(state: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> ConfigRecord:
    """A client's own state for its reply: the tensors equal to the reply's ``weights`` of the
    same name go by name only (:data:`RecordKey.SAME_AS_WEIGHTS`)."""
    same = [name for name, tensor in state.items() if name in weights and torch.equal(tensor, weights[name])]
    record = tensor_record({name: tensor for name, tensor in state.items() if name not in same})
    if same:
        record[RecordKey.SAME_AS_WEIGHTS] = same
    return record


def _reply_state(reply: Message) -> dict[str, torch.Tensor] | None:
    """The whole own state a reply carries (None: none); :class:`ConfigError` if malformed."""
    record = reply.content.config_records.get(RecordKey.LOCAL_STATE)
    if record is None:
        return None
    state = record_tensors(record, _REPLY_STATE)
    same = record.get(RecordKey.SAME_AS_WEIGHTS, [])
    arrays = next(iter(reply.content.array_records.values()), ArrayRecord())
    if not isinstance(same, list) or not all(isinstance(name, str) and name in arrays for name in same):
        raise ConfigError(
            f"{_REPLY_STATE}'s {RecordKey.SAME_AS_WEIGHTS!r} must list names of the reply's weights "
            f"{sorted(arrays)[:8]}, got {same!r}"
        )
    weights = arrays.to_torch_state_dict() if same else {}
    return {**state, **{str(name): weights[str(name)] for name in same}}


class ClientStates:
    """The last own state each client replied with, by client id; after :meth:`load`, each
    client is given its state back in its next message until a reply of its is accepted.

    Example
    -------
    >>> states = ClientStates()
    >>> states.load({'client:3:w': torch.ones(2)})
    >>> sorted(states.tensors()), states.to_deliver(3) is not None, states.to_deliver(4)
    (['client:3:w'], True, None)
    """

    def __init__(self) -> None:
        self._states: dict[ClientId, dict[str, torch.Tensor]] = {}
        self._undelivered: set[ClientId] = set()
        self._warned_anonymous = False

    @staticmethod
    def problem(reply: Message) -> str | None:
        """What is wrong with the own state a reply carries, or None (also when it carries none)."""
        try:
            _reply_state(reply)
        except ConfigError as err:
            return str(err)
        return None

    def keep(self, client_id: ClientId | None, reply: Message) -> None:
        """Keep the own state of an accepted reply; the client's context holds it now, so a
        loaded state is not given again."""
        state = _reply_state(reply)
        if client_id is None:
            if state and not self._warned_anonymous:
                self._warned_anonymous = True
                logger.warning("[server] a client without a client_id keeps state of its own: no file can hold it")
            return
        self._undelivered.discard(client_id)
        if state is not None:
            self._states[client_id] = state

    def to_deliver(self, client_id: ClientId | None) -> ConfigRecord | None:
        """The state to put in this client's message: one loaded that it has not replied past."""
        return tensor_record(self._states[client_id]) if client_id in self._undelivered else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every kept state, as a model file holds it."""
        return {
            f"{CLIENT_STATE_PREFIX}{json.dumps(client_id)}:{name}": tensor
            for client_id, state in self._states.items()
            for name, tensor in state.items()
        }

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take states :meth:`tensors` gave (a run resumes): each goes back to its client."""
        by_client: dict[ClientId, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            client_id, name = _parse(key)
            by_client.setdefault(client_id, {})[name] = tensor
        self._states.update(by_client)
        self._undelivered.update(by_client)


def _parse(key: str) -> tuple[ClientId, str]:
    client_id: object = None
    name = ""
    if key.startswith(CLIENT_STATE_PREFIX):
        rest = key.removeprefix(CLIENT_STATE_PREFIX)
        try:
            client_id, end = json.JSONDecoder().raw_decode(rest)
            name = rest[end + 1 :] if rest[end : end + 1] == ":" else ""
        except ValueError:
            pass
    if isinstance(client_id, bool) or not isinstance(client_id, int | str) or not name:
        raise ConfigError(
            f"a client's carried state is named {CLIENT_STATE_PREFIX}<client id as JSON>:<tensor name>, got {key!r}"
        )
    return client_id, name
