"""SIGTERM stops a run as Ctrl-C does, once, in a process that runs one experiment.

``timeout``, Slurm's ``scancel`` and ``kill -- -PGID`` signal a whole process group: the
``splitflower run`` supervisor and its attempt both get SIGTERM, and the supervisor passes
its own on. The first stops the run as Ctrl-C does, so the rounds recorded are kept; the
ones after it are ignored, so that they cannot cut that short. While a simulation runs,
Ray's driver has a SIGTERM handler of its own (it raises SystemExit); what it raises counts
as the same interruption, and the handler that was there before is put back afterwards.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__: list[str] = []

_stopping = threading.Event()


def interrupt_on_sigterm() -> None:
    """From now on, SIGTERM raises KeyboardInterrupt in this process's main thread, once
    (nothing where called from another thread: only the main thread sets handlers)."""
    if threading.current_thread() is threading.main_thread():
        _stopping.clear()
        signal.signal(signal.SIGTERM, _interrupt_once)


def _interrupt_once(signum: int, frame: FrameType | None) -> None:
    if not _stopping.is_set():
        _stopping.set()
        raise KeyboardInterrupt


def is_interruption(error: BaseException) -> bool:
    """Ctrl-C, or the SystemExit Ray's SIGTERM handler raises."""
    return isinstance(error, KeyboardInterrupt) or (isinstance(error, SystemExit) and error.code == signal.SIGTERM)


def stopping() -> None:
    """The run is stopping: a SIGTERM from now on changes nothing."""
    _stopping.set()


def current_sigterm_handler() -> Any:
    """The SIGTERM handler now, to :func:`restore_sigterm_handler` later (None off the main thread)."""
    return signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None


def restore_sigterm_handler(handler: Any) -> None:
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
