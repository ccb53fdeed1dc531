"""A thread pool that hands each task to the most recently idle worker.

``concurrent.futures.ThreadPoolExecutor`` wakes its idle workers in turn, so a stream of
requests rotates through every thread of the pool. Each thread that runs torch on the CPU
gets an OpenMP team of its own, and many teams on few cores slow every operation down.
Handing work to the last worker that went idle keeps the set of
threads running torch as small as the concurrency allows, at no hand-off cost. (Torch work
now runs on :mod:`splitflower.compute`'s thread; this pool still keeps the threads that
decode and check requests warm.)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

__all__ = ["StickyExecutor"]

_Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _Worker:
    def __init__(self, pool: StickyExecutor, name: str) -> None:
        self.pool = pool
        self.task: _Task | None = None
        self.wake = threading.Lock()
        self.wake.acquire()
        self.thread = threading.Thread(target=self.loop, name=name, daemon=True)

    def loop(self) -> None:
        while True:
            self.wake.acquire()
            task = self.task
            while task is not None:
                future, fn, args, kwargs = task
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as err:  # noqa: BLE001 - handed to the future's owner
                        future.set_exception(err)
                del future, fn, args, kwargs
                task = self.pool._next_task(self)
            if self.pool._stopped:
                return


class StickyExecutor(Executor):
    """At most ``max_workers`` threads; a new task goes to the most recently idle one."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "splitflower") -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._workers: list[_Worker] = []
        self._backlog: deque[_Task] = deque()
        self._stopped = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        task: _Task = (future, fn, args, kwargs)
        with self._lock:
            if self._stopped:
                raise RuntimeError("cannot submit to a StickyExecutor that was shut down")
            if self._idle:
                worker = self._idle.pop()
            elif len(self._workers) < self._max_workers:
                worker = _Worker(self, f"{self._prefix}-{len(self._workers)}")
                self._workers.append(worker)
                worker.thread.start()
            else:
                self._backlog.append(task)
                return future
            worker.task = task
        worker.wake.release()
        return future

    def raise_max_workers(self, max_workers: int) -> None:
        """Allow up to ``max_workers`` threads from now on (never fewer than before); they start
        as tasks come."""
        with self._lock:
            self._max_workers = max(self._max_workers, max_workers)

    def _next_task(self, worker: _Worker) -> _Task | None:
        with self._lock:
            if self._backlog and not self._stopped:
                return self._backlog.popleft()
            worker.task = None
            if not self._stopped:
                self._idle.append(worker)
            return None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
            if cancel_futures:
                for future, *_ in self._backlog:
                    future.cancel()
                self._backlog.clear()
        for worker in idle:
            worker.wake.release()
        if wait:
            for worker in self._workers:
                if worker.thread is not threading.current_thread():
                    worker.thread.join()
