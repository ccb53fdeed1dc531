"""Exception classes of splitflower.

Every error the framework raises derives from :class:`SplitflowerError` and from the
builtin that best describes it, so callers can catch either ``ValueError`` or the
framework-specific class.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEFAULT_ATTEMPTS",
    "STALLED_EXIT_CODE",
    "CRASHED_EXIT_CODE",
    "INTERRUPTED_EXIT_CODE",
    "SplitflowerError",
    "SplitError",
    "DatasetError",
    "ConfigError",
    "CodecError",
    "RemoteCallError",
    "UnknownMethodError",
    "InvalidArgumentsError",
    "AuthenticationError",
    "MessageTooLargeError",
    "RemoteComputationError",
    "ServerModelTimeoutError",
    "ServerUnavailableError",
    "IncompatibleStrategyError",
    "NotEnoughNodesError",
    "ExperimentFailedError",
    "RunInterruptedError",
    "ResultsFileError",
    "SimulationStartError",
    "CellFailedError",
    "AlgorithmError",
    "StaleGraphError",
    "DivergedError",
]


class SplitflowerError(Exception):
    """Base class of every error raised by splitflower."""


class SplitError(SplitflowerError, ValueError):
    """A model cannot be split as requested (bad index, path or cut name)."""


class DatasetError(SplitflowerError, ValueError):
    """A dataset is missing, malformed or asked for with bad parameters."""


class ConfigError(SplitflowerError, ValueError):
    """A configuration value (CLI, run config, round config) is invalid."""


class CodecError(SplitflowerError, ValueError):
    """Bytes on the wire do not decode into the tensors they claim to hold."""


class RemoteCallError(SplitflowerError, RuntimeError):
    """A call through the server-model proxy failed; subclasses say why."""


class UnknownMethodError(RemoteCallError, AttributeError):
    """The server model has no remotely callable method of that name."""


class InvalidArgumentsError(RemoteCallError, TypeError):
    """Argument names, dtypes, shapes or values do not match what the method expects."""


class AuthenticationError(RemoteCallError, PermissionError):
    """The request carried no token, or one the server did not issue for this round."""


class MessageTooLargeError(RemoteCallError, ValueError):
    """A request or reply exceeds the configured message size limit."""


class RemoteComputationError(RemoteCallError):
    """The server-model method itself raised; the message carries the server's error."""


class ServerModelTimeoutError(RemoteCallError, TimeoutError):
    """A proxy call did not complete within its timeout."""


class ServerUnavailableError(RemoteCallError, ConnectionError):
    """The split-learning service cannot be reached."""


class IncompatibleStrategyError(ConfigError):
    """An algorithm was paired with a strategy it cannot run under."""


class NotEnoughNodesError(SplitflowerError, TimeoutError):
    """Fewer clients connected than the round needs, within the strategy's node wait."""


class ExperimentFailedError(SplitflowerError, RuntimeError):
    """A run stopped before its last round, or a round trained on no client.

    ``partial_results``: the results document of the rounds that did finish (marked
    ``incomplete``), when there are any, so that a caller can keep them; else None.
    """

    def __init__(self, message: str, partial_results: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial_results = partial_results


class RunInterruptedError(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C) before its last round; ``partial_results`` as in
    :class:`ExperimentFailedError`. A ``KeyboardInterrupt``, so that ``except Exception``
    around a run does not swallow the user's Ctrl-C."""

    def __init__(self, message: str, partial_results: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial_results = partial_results


class ResultsFileError(SplitflowerError, OSError):
    """The results file cannot be written where it was asked for."""


class SimulationStartError(SplitflowerError, RuntimeError):
    """The simulation ended, or hung, before any client reached a server model: Ray's local
    node most likely failed to start. Running it again, in a fresh process, usually works.
    A process that runs one experiment ends with :data:`STALLED_EXIT_CODE` on it."""


# Exit codes of a process that runs one experiment and ends itself (see
# splitflower.simulation.run_experiment_owning_the_process): no client ever started, or the
# simulation failed, or it was interrupted (128 + SIGINT, as a shell reports Ctrl-C). Here, not
# there, so that `splitflower run`'s supervisor needs no torch.
STALLED_EXIT_CODE = 3
CRASHED_EXIT_CODE = 1
INTERRUPTED_EXIT_CODE = 130
# Times such a process is started while its simulation fails to start (Ray's local node missed
# its 30 s start-up window about one start in ten here, its raylet or GCS most likely aborted by
# gRPC's fork handlers, which splitflower now turns off (see _fork); retries stay for other causes).
DEFAULT_ATTEMPTS = 3


class CellFailedError(SplitflowerError, RuntimeError):
    """A cell of ``splitflower reproduce`` failed after its simulation started (its process
    crashed, or ran past ``--cell-timeout``): unlike a start that failed, it is not tried again."""


class AlgorithmError(SplitflowerError, TypeError):
    """An algorithm's client or server model breaks a contract of its base class (a remote
    method no client could call, a ``train_step`` returning the wrong thing, ...)."""


class StaleGraphError(SplitflowerError, RuntimeError):
    """Backward read a tensor that was modified in place after autograd saved it (torch's
    "modified by an inplace operation"): the gradients would be wrong."""


class DivergedError(SplitflowerError, FloatingPointError):
    """A gradient is NaN or infinite: the step it feeds would turn the weights into NaN."""
