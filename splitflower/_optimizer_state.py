"""The client optimizer's state in a Flower message: one codec frame of named tensors in a
ConfigRecord (a reply may hold only one ArrayRecord). The client app writes and reads it; the
sequential strategy hands it on and checks what clients send."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord

from splitflower.codec import decode_reply, encode_reply
from splitflower.errors import CodecError, ConfigError
from splitflower.wire import RecordKey


def optimizer_record(state: Mapping[str, torch.Tensor]) -> ConfigRecord:
    """``state`` (an optimizer's named tensors) as a message's record."""
    return ConfigRecord({RecordKey.VALUE: encode_reply(dict(state))})


def optimizer_tensors(record: object) -> dict[str, torch.Tensor]:
    """The named tensors :func:`optimizer_record` put in ``record``; :class:`ConfigError` says
    what else came."""
    frame = record.get(RecordKey.VALUE) if isinstance(record, ConfigRecord) else None
    if not isinstance(frame, bytes):
        raise ConfigError(
            f"the handed-on optimizer state must be a ConfigRecord holding a tensor frame under "
            f"{RecordKey.VALUE!r}, got {type(record).__name__}"
        )
    try:
        value = decode_reply(frame).value
    except CodecError as err:
        raise ConfigError(f"the handed-on optimizer state is not a valid tensor frame: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"the handed-on optimizer state must be named tensors, got {type(value).__name__}")
    return value
