"""Named tensors in a Flower message: one codec frame in a ConfigRecord (a reply may hold only
one ArrayRecord). Carries the client optimizer's state the sequential strategy hands on, and
each client's own state (``Client.local_state``) the strategy keeps for a model file."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord

from splitflower.codec import decode_reply, encode_reply
from splitflower.errors import CodecError, ConfigError
from splitflower.wire import RecordKey


def tensor_record(tensors: Mapping[str, torch.Tensor]) -> ConfigRecord:
    """``tensors`` as a message's record."""
    return ConfigRecord({RecordKey.VALUE: encode_reply(dict(tensors))})


def record_tensors(record: object, what: str) -> dict[str, torch.Tensor]:
    """The named tensors :func:`tensor_record` put in ``record``; :class:`ConfigError` names
    ``what`` the record should have held and says what else came."""
    frame = record.get(RecordKey.VALUE) if isinstance(record, ConfigRecord) else None
    if not isinstance(frame, bytes):
        raise ConfigError(
            f"{what} must be a ConfigRecord holding a tensor frame under {RecordKey.VALUE!r}, "
            f"got {type(record).__name__}"
        )
    try:
        value = decode_reply(frame).value
    except CodecError as err:
        raise ConfigError(f"{what} is not a valid tensor frame: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be named tensors, got {type(value).__name__}")
    return value
