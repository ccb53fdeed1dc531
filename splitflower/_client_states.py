"""Each client's own state (``Client.local_state``: e.g. LocFedMix's segment between two
averagings) as the strategy keeps it from the clients' replies, so that a model file holds it
and a run resumed from that file gives each client its own back."""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Message

from splitflower._tensor_record import record_tensors, tensor_record
from splitflower.errors import ConfigError
from splitflower.wire import RecordKey

__all__ = ["CLIENT_STATE_PREFIX", "ClientStates"]

CLIENT_STATE_PREFIX = "client:"
"""A carried state's names: ``client:<client id as JSON>:<tensor name>`` (tensor names hold no ':')."""

ClientId = int | str


def _what(client_id: object) -> str:
    return f"client {client_id!r}'s own state ({RecordKey.LOCAL_STATE!r})"


class ClientStates:
    """The last own state each client replied with, by client id; after :meth:`load`, each
    client is given its state back in its next message until it replies with a newer one.

    Example
    -------
    >>> states = ClientStates()
    >>> states.load({'client:3:w': torch.ones(2)})
    >>> sorted(states.tensors()), states.to_deliver(3) is not None, states.to_deliver(4)
    (['client:3:w'], True, None)
    """

    def __init__(self) -> None:
        self._records: dict[ClientId, ConfigRecord] = {}
        self._undelivered: set[ClientId] = set()

    @staticmethod
    def problem(reply: Message) -> str | None:
        """What is wrong with the own state a reply carries, or None (also when it carries none)."""
        record = reply.content.config_records.get(RecordKey.LOCAL_STATE)
        if record is None:
            return None
        try:
            record_tensors(record, f"a reply's own state ({RecordKey.LOCAL_STATE!r})")
        except ConfigError as err:
            return str(err)
        return None

    def keep(self, client_id: ClientId | None, reply: Message) -> None:
        """Keep the own state of an accepted reply (a client without an id cannot be given it back)."""
        record = reply.content.config_records.get(RecordKey.LOCAL_STATE)
        if record is not None and client_id is not None:
            self._records[client_id] = record
            self._undelivered.discard(client_id)

    def to_deliver(self, client_id: ClientId | None) -> ConfigRecord | None:
        """The state to put in this client's message: one loaded that it has not replied past."""
        return self._records[client_id] if client_id in self._undelivered else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every kept state, as a model file holds it."""
        return {
            f"{CLIENT_STATE_PREFIX}{json.dumps(client_id)}:{name}": tensor
            for client_id, record in self._records.items()
            for name, tensor in record_tensors(record, _what(client_id)).items()
        }

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take states :meth:`tensors` gave (a run resumes): each goes back to its client."""
        by_client: dict[ClientId, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            client_id, name = _parse(key)
            by_client.setdefault(client_id, {})[name] = tensor
        self._records.update({client_id: tensor_record(state) for client_id, state in by_client.items()})
        self._undelivered.update(by_client)


def _parse(key: str) -> tuple[ClientId, str]:
    encoded, _, name = key.removeprefix(CLIENT_STATE_PREFIX).rpartition(":")
    try:
        client_id = json.loads(encoded)
    except ValueError:
        client_id = None
    if not key.startswith(CLIENT_STATE_PREFIX) or not name or isinstance(client_id, bool):
        client_id = None
    if not isinstance(client_id, int | str):
        raise ConfigError(
            f"a client's carried state is named {CLIENT_STATE_PREFIX}<client id as JSON>:<tensor name>, got {key!r}"
        )
    return client_id, name
