"""Keep gRPC's fork handlers out of the child processes splitflower's runs start.

gRPC core installs ``pthread_atfork`` handlers that try to quiesce its pollers around a
``fork()``. When another thread is inside gRPC at that moment (a server or channel is up,
as in every splitflower process), the handler gives up ("Other threads are currently
calling into gRPC, skipping fork() handlers") and the child can abort on gRPC's
inconsistent state before it reaches ``exec``. Ray starts its GCS, raylet and dashboard
that way, and ``ray.init`` then fails with "The current node timed out during startup": 8
of the 67 Ray sessions that one day's runs left in /tmp/ray here have no raylet log at all.
``benchmarks/ray_start.py`` counts the children that die before exec and the Ray start-ups
that fail, with the handlers on and off. splitflower's processes only ever fork to
``exec`` (Ray, Flower's subprocesses, ``spawn`` multiprocessing), the case gRPC documents
``GRPC_ENABLE_FORK_SUPPORT=0`` for. The setting is process-wide: a user's own fork that
goes on using gRPC in the child needs ``GRPC_ENABLE_FORK_SUPPORT=1`` set beforehand. Only a
real fork runs the handlers: Flower starts its own processes with a plain ``Popen``, which
Python runs as a vfork, so of Flower's processes only a simulation's, where Ray starts, is
at risk.

gRPC reads the variable when ``grpc`` is first imported, so ``splitflower`` sets it on
import, unless the user has set it: a process that imported ``grpc`` before ``splitflower``
(``flwr run``'s own processes do) needs it in its environment, as the README says.
"""

from __future__ import annotations

import os
import sys
from typing import Final

__all__ = ["GRPC_FORK_SUPPORT_ENV", "fork_handlers_warning", "turn_off_grpc_fork_handlers"]

GRPC_FORK_SUPPORT_ENV: Final = "GRPC_ENABLE_FORK_SUPPORT"
_OFF: Final = "0"
_left_on = False  # grpc came first, nothing set
_warned = False


def turn_off_grpc_fork_handlers() -> None:
    """Set ``GRPC_ENABLE_FORK_SUPPORT=0`` unless the user chose a value; note if too late."""
    global _left_on
    if GRPC_FORK_SUPPORT_ENV in os.environ:
        return
    os.environ[GRPC_FORK_SUPPORT_ENV] = _OFF
    # Children still get it; this process's gRPC read the variable at its import.
    _left_on = "grpc" in sys.modules


def fork_handlers_warning() -> str | None:
    """What to tell the user, once per process, when ``grpc`` was imported before ``splitflower``
    with nothing set (its fork handlers are on in this process, and children it starts may
    abort): else None.
    ``splitflower run`` says it before Ray starts; a simulation's ServerApp logs it as it
    starts, before Flower starts Ray in its process (under ``flwr run`` that process has the
    environment of its SuperLink)."""
    global _warned
    if not _left_on or _warned:
        return None
    _warned = True
    return (
        f"grpc was imported before splitflower, with {GRPC_FORK_SUPPORT_ENV} unset, so gRPC's fork handlers "
        "are on in this process, and in Flower's processes started with the same environment: a child they "
        "fork may abort before it execs (Ray's start-up then fails with 'The current node timed out during "
        f"startup'); set {GRPC_FORK_SUPPORT_ENV}=0 in the environment of every Flower process"
    )
