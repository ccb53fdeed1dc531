"""Names shared by both ends of the wire.

Every string or key that one side writes and the other reads is defined here once, so the
server, the proxy and the Flower apps can never drift apart.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "GRPC_SERVICE",
    "GRPC_CALL_METHOD",
    "GRPC_CALL_PATH",
    "ERROR_KIND_METADATA_KEY",
    "FINISH_METHOD",
    "ErrorKind",
    "ConfigKey",
    "RecordKey",
    "DEFAULT_MAX_MESSAGE_BYTES",
]

GRPC_SERVICE: Final = "splitflower.v1.ServerModel"
GRPC_CALL_METHOD: Final = "Call"
GRPC_CALL_PATH: Final = f"/{GRPC_SERVICE}/{GRPC_CALL_METHOD}"

# Trailing-metadata key naming which check failed, so the proxy raises the matching class.
ERROR_KIND_METADATA_KEY: Final = "sf-error-kind"

# A reserved method a client calls once when its round is over: batching schedulers stop
# waiting for it. Not a valid Python identifier, so no server model can define it.
FINISH_METHOD: Final = "<finish>"

DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024


class ErrorKind:
    """Values of :data:`ERROR_KIND_METADATA_KEY`."""

    UNKNOWN_METHOD: Final = "unknown-method"
    INVALID_ARGUMENTS: Final = "invalid-arguments"
    CORRUPT: Final = "corrupt"
    AUTH: Final = "auth"
    TOO_LARGE: Final = "too-large"
    COMPUTATION: Final = "computation"
    TIMEOUT: Final = "timeout"


class ConfigKey:
    """Keys of the per-round ConfigRecord the strategy sends to each client."""

    SERVER_ROUND: Final = "server-round"
    PROXY_ADDRESS: Final = "sf-proxy-address"
    TOKEN: Final = "sf-token"
    ROOT_CERTIFICATES: Final = "sf-root-certificates"
    MAX_MESSAGE_BYTES: Final = "sf-max-message-bytes"
    LOCAL_EPOCHS: Final = "local-epochs"
    BATCH_SIZE: Final = "batch-size"
    LR: Final = "lr"
    SEED: Final = "seed"
    CLIENT_INDEX: Final = "sf-client-index"
    CALL_TIMEOUT: Final = "sf-call-timeout"
    HAND_OVER_OPTIMIZER: Final = "sf-hand-over-optimizer"


class RecordKey:
    """Keys of the records inside Flower messages."""

    ARRAYS: Final = "arrays"
    CONFIG: Final = "config"
    METRICS: Final = "metrics"
    WIRE_MANIFEST: Final = "sf-wire-manifest"
    NUM_EXAMPLES: Final = "num-examples"
    OPTIMIZER: Final = "sf-optimizer"
    # A ConfigRecord carrying one encoded value (the wire manifest's JSON, the optimizer
    # state's codec frame: a reply may hold only one ArrayRecord) keeps it under this key.
    VALUE: Final = "value"
