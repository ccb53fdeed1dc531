"""SIGTERM stops a run as Ctrl-C does, once, in a process that runs one experiment.

``timeout``, Slurm's ``scancel`` and ``kill -- -PGID`` signal a whole process group: the
``splitflower run`` supervisor and its attempt both get SIGTERM, and the supervisor passes
its own on. The first stops the run as Ctrl-C does, so the rounds recorded are kept; the
ones after it are ignored, so that they cannot cut that short. While a simulation runs,
Ray's driver has a SIGTERM handler of its own (it raises SystemExit); what it raises counts
as the same interruption, and the handler that was there before is put back afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__: list[str] = []

_stopping = threading.Event()


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """While it lasts, SIGTERM raises KeyboardInterrupt in this process's main thread, once;
    the handler before is put back after (nothing happens where called off the main thread:
    only the main thread sets handlers)."""
    with sigterm_handler_kept():
        if _on_main_thread():
            _stopping.clear()
            signal.signal(signal.SIGTERM, _interrupt_once)
        yield


@contextlib.contextmanager
def sigterm_handler_kept() -> Iterator[None]:
    """Puts this process's SIGTERM handler back on leaving (Ray's driver sets its own)."""
    handler = signal.getsignal(signal.SIGTERM) if _on_main_thread() else None
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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
