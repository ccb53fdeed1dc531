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

The hand-off is a thread round trip per request, with the GIL changing hands on each
side: on a small request it is the largest part of what splitflower adds to a gRPC round
trip (``benchmarks/transport_designs.py``). So the service hands the whole of a small
request, from its receipt on, to the compute thread when that thread is idle
(:class:`ComputeFirstExecutor`); a request that would wait there for others runs on a gRPC
thread while the compute thread works through its queue (:meth:`ComputeThread.run_jobs_until`).

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
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from splitflower._openmp import release_openmp_workers

__all__ = ["ComputeFirstExecutor", "ComputeThread", "run_on_compute_thread", "shared_compute_thread"]

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


_WAKE = object()  # queued to end a run_jobs_until wait; not a job


class ComputeThread:
    """A daemon thread that runs the callables handed to it, one at a time, in order.

    Example
    -------
    >>> compute = ComputeThread()
    >>> compute.run(lambda: threading.current_thread().name)
    'splitflower-compute'
    """

    def __init__(self, name: str = "splitflower-compute") -> None:
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._outstanding = 0  # jobs queued or running (under _count_lock)
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """No job queued or running (a snapshot: another thread may queue one at once)."""
        return self._outstanding == 0

    def is_current(self) -> bool:
        """Whether the calling thread is this compute thread."""
        return threading.current_thread() is self._thread

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=_IDLE_GRACE_S)
            except queue.Empty:
                # Idle: stop this thread's OpenMP workers spinning on cores a client may need.
                release_openmp_workers()
                job = self._jobs.get()
            if isinstance(job, _Job):
                self._execute(job)
            del job

    def _execute(self, job: _Job) -> None:
        try:
            job.result = job.fn(*job.args, **job.kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            job.error = err
        with self._count_lock:
            self._outstanding -= 1
        job.done.release()

    def _put(self, job: _Job) -> None:
        with self._count_lock:
            self._outstanding += 1
        self._jobs.put(job)

    def run_jobs_until(self, future: Future[Any]) -> None:
        """On this thread only: run the jobs queued for it until ``future`` is done, so that
        a job (a request handled here) that waits on other threads never holds up the jobs
        they hand this thread."""
        if not self.is_current():
            raise RuntimeError("run_jobs_until runs queued jobs, so only the compute thread itself may call it")
        future.add_done_callback(lambda _: self._jobs.put(_WAKE))
        while not future.done():
            job = self._jobs.get()
            if isinstance(job, _Job):
                self._execute(job)
            del job

    def submit(self, fn: Callable[..., object], /, *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)`` to run on this thread, without waiting for it: ``fn``
        hands its own outcome on (an exception it raises is logged)."""
        self._put(_Job(_logging_errors(fn), args, kwargs))

    def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` on this thread and return its result (or raise)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        job = _Job(fn, args, kwargs)
        self._put(job)
        job.done.acquire()  # a bare lock is the cheapest wake-up Python has
        if job.error is not None:
            raise job.error
        result: _T = job.result
        return result


class ComputeFirstExecutor(ThreadPoolExecutor):
    """Runs a task on ``compute`` when that thread is idle, else on ``fallback``.

    For gRPC's per-method thread pool (which must be a ``ThreadPoolExecutor``; this one
    starts no threads of its own): the handler of a small request then computes where it
    runs, without a hand-off. A task that finds the compute thread busy runs on
    ``fallback`` at once, so a request is still received and checked while a long
    computation runs.

    Example
    -------
    >>> compute, fallback = ComputeThread("example-compute"), ThreadPoolExecutor(1, "example-fallback")
    >>> ComputeFirstExecutor(compute, fallback).submit(lambda: threading.current_thread().name).result()
    'example-compute'
    """

    def __init__(self, compute: ComputeThread, fallback: Executor) -> None:
        super().__init__(max_workers=1)
        self.compute, self.fallback = compute, fallback

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        if not self.compute.idle:
            return self.fallback.submit(fn, *args, **kwargs)
        future: Future[_T] = Future()
        self.compute.submit(_settle, future, fn, args, kwargs)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing of its own to stop: the compute thread and ``fallback`` belong to others."""


def _settle(future: Future[_T], fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the future's owner
            future.set_exception(err)


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
