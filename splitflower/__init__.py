"""splitflower: split learning on Flower, with a real gRPC channel between the parties.

Core abstractions: :class:`Client`, :class:`ServerModel`, :class:`SplitStrategy`, and the
:class:`ServerModelProxy` a client uses to offload computation. Strategies live in
:mod:`splitflower.strategies`, algorithms in :mod:`splitflower.algorithms`.
"""

import importlib
import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from splitflower._fork import turn_off_grpc_fork_handlers

# Before anything imports grpc: a child of a gRPC process may abort before it execs (see _fork).
turn_off_grpc_fork_handlers()
# gRPC core logs INFO lines about its own housekeeping (forks among them); unless the user
# chose a verbosity, keep those out of the console.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

if TYPE_CHECKING:
    from splitflower.app import build_client_app, build_server_app
    from splitflower.client import Client
    from splitflower.proxy import ProxyFuture, ServerModelProxy
    from splitflower.scheduling import BatchingScheduler, ImmediateScheduler, OrderedScheduler, Scheduler
    from splitflower.server_model import (
        FLOATING,
        CallContext,
        FitResult,
        PerCaller,
        ServerModel,
        TensorSpec,
        remote,
        sgd,
    )
    from splitflower.service import SplitService, TlsConfig
    from splitflower.strategy import SplitResult, SplitStrategy
    from splitflower.supervised import SupervisedServerModel

# The public names and the modules that define them. They are imported on first use, so that
# a process needing none of them (the supervisor of `splitflower run`, which only starts
# attempts) does not pay for torch and Flower.
_EXPORTS = {
    "build_client_app": "app",
    "build_server_app": "app",
    "Client": "client",
    "ProxyFuture": "proxy",
    "ServerModelProxy": "proxy",
    "BatchingScheduler": "scheduling",
    "ImmediateScheduler": "scheduling",
    "OrderedScheduler": "scheduling",
    "Scheduler": "scheduling",
    "FLOATING": "server_model",
    "CallContext": "server_model",
    "PerCaller": "server_model",
    "FitResult": "server_model",
    "ServerModel": "server_model",
    "TensorSpec": "server_model",
    "remote": "server_model",
    "sgd": "server_model",
    "SplitService": "service",
    "TlsConfig": "service",
    "SplitResult": "strategy",
    "SplitStrategy": "strategy",
    "SupervisedServerModel": "supervised",
}


# Its public modules, reachable as attributes after ``import splitflower`` (imported on first use).
_SUBMODULES = frozenset(
    {
        "algorithms", "app", "checkpoint", "cli", "client", "codec", "compute", "data", "errors", "experiment",
        "linkemu", "metering", "models", "options", "paper_report", "proxy", "report", "reproduce", "results",
        "scheduling", "server_model", "service", "simulation", "split", "strategies", "strategy", "supervised",
        "wire",
    }
)  # fmt: skip

if not TYPE_CHECKING:  # to type checkers, a name missing here stays an error

    def __getattr__(name: str) -> Any:
        if name in _SUBMODULES:
            return importlib.import_module(f"splitflower.{name}")
        if name not in _EXPORTS:
            raise AttributeError(f"module 'splitflower' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"splitflower.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


try:
    __version__ = version("splitflower")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BatchingScheduler",
    "CallContext",
    "PerCaller",
    "Client",
    "FLOATING",
    "FitResult",
    "ImmediateScheduler",
    "OrderedScheduler",
    "ProxyFuture",
    "Scheduler",
    "ServerModel",
    "ServerModelProxy",
    "SplitResult",
    "SplitService",
    "SplitStrategy",
    "SupervisedServerModel",
    "TensorSpec",
    "TlsConfig",
    "build_client_app",
    "build_server_app",
    "remote",
    "sgd",
    "__version__",
]
