"""Where server-side torch work runs: on one long-lived compute thread per process.

On the CPU every thread that runs a parallel torch operation gets an OpenMP team of its
own, and as soon as a process has more OpenMP threads than cores, libgomp stops spinning
at its barriers and every parallel operation slows down. So the framework runs
server-model construction, computations, weight loading and evaluation on one thread, and
hands each request over to it (``benchmarks/rtt_breakdown.py`` records what the hand-off
costs: the round trip to this thread and back, with and without a job). When no request
has come for a millisecond, the thread ends its OpenMP workers (see
:mod:`splitflower._openmp`): left spinning, they would take the cores of clients that share
the machine.

A scheduler may instead give its model a :class:`ComputeThread` of its own, so that a long
computation on one model does not delay another (useful with several GPUs).

Example
-------
>>> run_on_compute_thread(sum, [1, 2, 3])
6
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from splitflower._openmp import release_openmp_workers

__all__ = ["ComputeThread", "run_on_compute_thread", "shared_compute_thread"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_IDLE_GRACE_S = 0.001  # a request arriving within this keeps the OpenMP workers warm


class _Job:
    __slots__ = ("args", "done", "error", "fn", "kwargs", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()


class ComputeThread:
    """A daemon thread that runs the callables handed to it, one at a time, in order.

    Example
    -------
    >>> compute = ComputeThread()
    >>> compute.run(lambda: threading.current_thread().name)
    'splitflower-compute'
    """

    def __init__(self, name: str = "splitflower-compute") -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=_IDLE_GRACE_S)
            except queue.Empty:
                # Idle: stop this thread's OpenMP workers spinning on cores a client may need.
                release_openmp_workers()
                job = self._jobs.get()
            try:
                job.result = job.fn(*job.args, **job.kwargs)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                job.error = err
            job.done.release()
            del job

    def submit(self, fn: Callable[..., object], /, *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)`` to run on this thread, without waiting for it: ``fn``
        hands its own outcome on (an exception it raises is logged)."""
        self._jobs.put(_Job(_logging_errors(fn), args, kwargs))

    def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` on this thread and return its result (or raise)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        job = _Job(fn, args, kwargs)
        self._jobs.put(job)
        job.done.acquire()  # a bare lock is the cheapest wake-up Python has
        if job.error is not None:
            raise job.error
        result: _T = job.result
        return result


def _logging_errors(fn: Callable[..., object]) -> Callable[..., None]:
    def logged(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except BaseException:
            logger.exception("[server] a job queued on the compute thread failed")

    return logged


_shared: ComputeThread | None = None
_shared_lock = threading.Lock()


def shared_compute_thread() -> ComputeThread:
    """The process's compute thread, started on first use."""
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = ComputeThread()
    return _shared


def run_on_compute_thread(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Run ``fn`` on the process's compute thread and return its result."""
    return shared_compute_thread().run(fn, *args, **kwargs)
