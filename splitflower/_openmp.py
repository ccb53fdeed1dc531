"""Give the cores back while this party waits on the other: release idle OpenMP workers.

After every parallel region, torch's OpenMP runtime (libgomp) keeps its worker threads
spinning for about 10 ms (``GOMP_SPINCOUNT``'s default) so that the next region starts
at once. In split learning one party often waits on the other: a client blocked on a
CSL call, a server compute thread with no request queued. On a machine both parties share
(a simulation, a loopback benchmark), the waiting party's spinning workers then take cores
from the party that computes. OpenMP 5.0's ``omp_pause_resource_all(omp_pause_soft)``
makes libgomp end the calling thread's workers; its next parallel region starts them again
(tens of microseconds, against milliseconds of spinning). ``benchmarks/openmp_release.py``
measures the saving on the CSL step of ``benchmarks/transport.py`` (client and server sharing
a 2-core machine) and records it in ``benchmarks/results/``.

Set ``SPLITFLOWER_KEEP_OPENMP_SPINNING=1`` to leave the workers alone; a process whose
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set is left alone too (its owner chose). These
are read once, at the first release. Only libgomp (torch's runtime on Linux) is used: other
runtimes (LLVM's libomp, Intel's libiomp5) pause every thread's workers at once, and a
process without libgomp is left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["KEEP_SPINNING_ENV", "release_openmp_workers"]

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1
_RUNTIME_PREFIX = "libgomp"
KEEP_SPINNING_ENV = "SPLITFLOWER_KEEP_OPENMP_SPINNING"
_OPT_OUT = (KEEP_SPINNING_ENV, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_pause: Callable[[int], int] | None = None
_resolved = False


def _loaded_runtimes() -> list[str]:
    """Paths of the libgomp copies this process has already loaded (torch's among them)."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5].strip().removesuffix(" (deleted)") if len(fields) == 6 else ""
                name = Path(path).name
                if name.startswith(_RUNTIME_PREFIX) and ".so" in name and path not in paths:
                    paths.append(path)
    except OSError:  # no /proc: not Linux
        pass
    return paths


def _resolve() -> Callable[[int], int] | None:
    if os.environ.get(_OPT_OUT[0]) == "1" or any(name in os.environ for name in _OPT_OUT[1:]):
        return None
    for path in _loaded_runtimes():
        try:
            # RTLD_NOLOAD: use a copy already loaded, never load a second runtime.
            pause = ctypes.CDLL(path, mode=os.RTLD_NOLOAD).omp_pause_resource_all
        except (OSError, AttributeError):  # gone, or a libgomp older than OpenMP 5.0
            continue
        pause.argtypes = [ctypes.c_int]
        pause.restype = ctypes.c_int
        logger.debug("idle OpenMP workers are released through %s", path)
        result: Callable[[int], int] = pause
        return result
    return None


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
