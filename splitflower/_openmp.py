"""Give the cores back while this party waits on the other: release idle OpenMP workers.

After every parallel region, torch's OpenMP runtime (libgomp) keeps its worker threads
spinning for about 10 ms (``GOMP_SPINCOUNT``'s default) so that the next region starts
at once. In split learning one party often waits on the other: a client blocked on a
CSL call, a server compute thread with no request queued. On a machine both parties share
(a simulation, a loopback benchmark), the waiting party's spinning workers then take cores
from the party that computes. OpenMP 5.0's ``omp_pause_resource_all(omp_pause_soft)``
ends the calling thread's workers; its next parallel region starts them again (tens of
microseconds, against milliseconds of spinning). A development measurement, not a recorded
benchmark: the CSL step of ``benchmarks/transport.py`` went from 117 to 104 ms (means of
three runs each, client and server on this 2-core machine).

Set ``SPLITFLOWER_KEEP_OPENMP_SPINNING=1`` to leave the workers alone; a process whose
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set is left alone too (its owner chose).
Without a loaded OpenMP runtime that has the call (another platform, another build of
torch), releasing does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["release_openmp_workers"]

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1
_RUNTIME_NAMES = ("libgomp", "libiomp5", "libomp")
_OPT_OUT = ("SPLITFLOWER_KEEP_OPENMP_SPINNING", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_pause: Callable[[int], int] | None = None
_resolved = False


def _loaded_runtime() -> Path | None:
    """The OpenMP runtime this process has already loaded (torch's), if any."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = Path(line.rsplit(maxsplit=1)[-1])
                if path.name.startswith(_RUNTIME_NAMES) and ".so" in path.name:
                    return path
    except OSError:  # no /proc: not Linux
        pass
    return None


def _resolve() -> Callable[[int], int] | None:
    if os.environ.get(_OPT_OUT[0]) == "1" or any(name in os.environ for name in _OPT_OUT[1:]):
        return None
    path = _loaded_runtime()
    if path is None:
        return None
    try:
        # RTLD_NOLOAD: use the copy torch loaded, never load a second runtime.
        runtime = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD)
        pause = runtime.omp_pause_resource_all
    except (OSError, AttributeError):  # an OpenMP older than 5.0
        return None
    pause.argtypes = [ctypes.c_int]
    pause.restype = ctypes.c_int
    logger.debug("idle OpenMP workers are released through %s", path)
    result: Callable[[int], int] = pause
    return result


def release_openmp_workers() -> None:
    """End the calling thread's idle OpenMP workers (a no-op where that is not possible).

    Only the thread that ran the parallel regions can release their workers, so each party
    calls this on its own compute thread, just before it starts waiting.
    """
    global _pause, _resolved
    if not _resolved:
        _pause, _resolved = _resolve(), True
    if _pause is not None:
        _pause(_OMP_PAUSE_SOFT)  # -1 inside a parallel region: nothing to release then
