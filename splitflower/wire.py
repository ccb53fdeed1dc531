"""Names shared by both ends of the wire.

Every string or key that one side writes and the other reads is defined here once, so the
server, the proxy and the Flower apps can never drift apart.
"""

from __future__ import annotations

from typing import Final

from splitflower.errors import ConfigError

__all__ = [
    "GRPC_SERVICE",
    "GRPC_CALL_PREFIX",
    "GRPC_NOTICE_PREFIX",
    "TOKEN_BYTES",
    "call_path",
    "ERROR_KIND_METADATA_KEY",
    "FINISH_METHOD",
    "ABANDONED_METHOD",
    "ErrorKind",
    "ConfigKey",
    "RecordKey",
    "MetricKey",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_IN_FLIGHT",
    "MAX_NOTICES_IN_PROGRESS",
    "PROXY_ATTRIBUTES",
]

GRPC_SERVICE: Final = "splitflower.v1.ServerModel"
GRPC_CALL_PREFIX: Final = f"/{GRPC_SERVICE}/"
# Notices (ABANDONED_METHOD) go to a path of their own, outside the client's share of the
# service's threads: the calls that fill it may be waiting for exactly that notice.
GRPC_NOTICE_PREFIX: Final = "/splitflower.v1.Notices/"
TOKEN_BYTES: Final = 16


def call_path(token: bytes, *, notice: bool = False) -> str:
    """The gRPC method path of every call a client holding ``token`` makes (of its notices
    that a request will not come, with ``notice``).

    The token is the path's method name, so the service finds the client's session as soon
    as a call's headers arrive, before gRPC waits for its body on one of the service's
    threads: a caller without a token of the current round holds no thread at all. HTTP/2
    header compression sends a path it has sent on the connection before in a byte or two.

    Example
    -------
    >>> call_path(bytes(range(16)))
    '/splitflower.v1.ServerModel/000102030405060708090a0b0c0d0e0f'
    """
    if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
        got = f"{len(token)} bytes" if isinstance(token, bytes) else type(token).__name__
        raise ConfigError(f"a token is {TOKEN_BYTES} bytes (from the round config's sf-token), got {got}")
    return (GRPC_NOTICE_PREFIX if notice else GRPC_CALL_PREFIX) + token.hex()


# Trailing-metadata key naming which check failed, so the proxy raises the matching class.
ERROR_KIND_METADATA_KEY: Final = "sf-error-kind"

# A reserved method a client calls once when its round is over: batching schedulers stop
# waiting for it. Not a valid Python identifier, so no server model can define it.
FINISH_METHOD: Final = "<finish>"

# A reserved notice a client sends (to call_path(token, notice=True)) when a request failed
# without the server answering it (e.g. its deadline passed while it waited for a sender
# thread) and later requests are on their way: it names the request (in the frame's request
# number), so that the server runs the later ones instead of waiting for it. It takes no
# turn in the client's order.
ABANDONED_METHOD: Final = "<abandoned>"

DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

# Most requests one proxy keeps in flight; the service lets a client have this many (plus
# a blocking call) in progress however few threads it has.
MAX_IN_FLIGHT: Final = 32

# A client's notices (ABANDONED_METHOD) the service serves at once, outside its share of calls;
# a proxy sends one refused for room again.
MAX_NOTICES_IN_PROGRESS: Final = 4

# The public attributes of a client's ServerModelProxy: ``proxy.<name>`` finds these, not
# a remote method, so no server model may define a method of one of these names.
PROXY_ATTRIBUTES: Final = frozenset(
    {
        "address",
        "call",
        "close",
        "default_timeout",
        "log_prefix",
        "max_message_bytes",
        "memory",
        "times",
        "traffic",
        "wait_all",
    }
)


class ErrorKind:
    """Values of :data:`ERROR_KIND_METADATA_KEY`."""

    UNKNOWN_METHOD: Final = "unknown-method"
    INVALID_ARGUMENTS: Final = "invalid-arguments"
    CORRUPT: Final = "corrupt"
    AUTH: Final = "auth"
    TOO_LARGE: Final = "too-large"
    COMPUTATION: Final = "computation"
    TIMEOUT: Final = "timeout"
    INTERNAL: Final = "internal"
    # Refused before its body was read (so it never ran): the client's share of the service's
    # threads was waiting for request bodies. The proxy sends it again after a pause.
    BUSY: Final = "busy"


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
    # Given to each server model's configure_fit (not to clients): which of the round's models it is.
    SERVER_MODEL_INDEX: Final = "sf-server-model-index"


class RecordKey:
    """Keys of the records inside Flower messages."""

    ARRAYS: Final = "arrays"
    CONFIG: Final = "config"
    METRICS: Final = "metrics"
    WIRE_MANIFEST: Final = "sf-wire-manifest"
    NUM_EXAMPLES: Final = "num-examples"
    OPTIMIZER: Final = "sf-optimizer"
    CLIENT_ID: Final = "sf-client-id"  # the replying Client's client_id, if it has one
    # A reply's Client.local_state, kept by the strategy for a model file; a resumed run's first
    # message to the client gives it back (a ConfigRecord holding a tensor frame under VALUE).
    LOCAL_STATE: Final = "sf-local-state"
    # In a reply's LOCAL_STATE: the names whose tensors are the reply's weights of that name,
    # left out of the frame (a state that is the client's weights is not sent twice).
    SAME_AS_WEIGHTS: Final = "same-as-weights"
    # A query message holding a ConfigRecord under this key asks a node which client it is:
    # the reply carries CLIENT_ID (nothing if the client has no client_id).
    IDENTIFY: Final = "sf-identify"
    # A ConfigRecord carrying one encoded value (the wire manifest's JSON, the optimizer
    # state's codec frame: a reply may hold only one ArrayRecord) keeps it under this key.
    VALUE: Final = "value"


class MetricKey:
    """Metrics a client reports with its fit reply that the experiment runner reads back.

    Memory figures are named ``{party}_{figure}`` (``client_peak_tally_bytes``); the
    figures are :attr:`MEMORY_FIGURES`.
    """

    CLIENT_COMPUTE_S: Final = "client_compute_s"
    SERVER_COMPUTE_S: Final = "server_compute_s"
    COMMUNICATION_WAIT_S: Final = "communication_wait_s"
    TIME_SPLIT: Final = (CLIENT_COMPUTE_S, SERVER_COMPUTE_S, COMMUNICATION_WAIT_S)
    PEAK_TALLY: Final = "peak_tally_bytes"
    PEAK_SAVED_ACTIVATIONS: Final = "peak_saved_activation_bytes"
    PEAK_STATE: Final = "peak_state_bytes"
    PEAK_IN_FLIGHT: Final = "peak_in_flight_bytes"
    PEAK_RSS: Final = "peak_rss_bytes"
    MEMORY_FIGURES: Final = (PEAK_TALLY, PEAK_SAVED_ACTIVATIONS, PEAK_STATE, PEAK_IN_FLIGHT, PEAK_RSS)
