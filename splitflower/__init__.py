"""splitflower: split learning on Flower, with a real gRPC channel between the parties.

Core abstractions: :class:`Client`, :class:`ServerModel`, :class:`SplitStrategy`, and the
:class:`ServerModelProxy` a client uses to offload computation. Strategies live in
:mod:`splitflower.strategies`, algorithms in :mod:`splitflower.algorithms`.
"""

import os
from importlib.metadata import PackageNotFoundError, version

# gRPC core logs an INFO line each time a process with open channels forks (Ray does, for
# every worker); unless the user chose a verbosity, keep those out of the console.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


from splitflower.app import build_client_app, build_server_app
from splitflower.client import Client
from splitflower.proxy import ProxyFuture, ServerModelProxy
from splitflower.scheduling import BatchingScheduler, ImmediateScheduler, Scheduler
from splitflower.server_model import FLOATING, CallContext, FitResult, ServerModel, TensorSpec, remote, sgd
from splitflower.service import SplitService, TlsConfig
from splitflower.strategy import SplitResult, SplitStrategy
from splitflower.supervised import SupervisedServerModel

try:
    __version__ = version("splitflower")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BatchingScheduler",
    "CallContext",
    "Client",
    "FLOATING",
    "FitResult",
    "ImmediateScheduler",
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
