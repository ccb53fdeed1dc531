"""SIGTERM stops a run as Ctrl-C does, once, in a process that runs one experiment.

``timeout``, Slurm's ``scancel`` and ``kill -- -PGID`` signal a whole process group: the
``splitflower run`` supervisor and its attempt both get SIGTERM, and the supervisor passes
its own on. The first stops the run as Ctrl-C does, so the rounds recorded are kept; the
ones after it are ignored, so that they cannot cut that short. A process still running
:data:`TERMINATION_GRACE_S` after that SIGTERM (a thread of Ray's or of the ServerApp holds it)
ends then, as the supervisor would end it: the rounds so far are on disk already (the
progress file). While a simulation runs, Ray's driver has a SIGTERM handler of its own (it
raises SystemExit); what it raises counts as the same interruption, and the handler that was
there before is put back afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Final

from splitflower.errors import INTERRUPTED_EXIT_CODE

__all__: list[str] = []

TERMINATION_GRACE_S: Final = 30.0
"""Seconds a run told to stop by SIGTERM has to end before its process is ended."""

_stopping = threading.Event()
_deadlines: list[threading.Timer] = []


@contextlib.contextmanager
def sigterm_as_ctrl_c(grace_s: float = TERMINATION_GRACE_S) -> Iterator[None]:
    """While it lasts, SIGTERM raises KeyboardInterrupt in this process's main thread, once,
    and the process ends with :data:`~splitflower.errors.INTERRUPTED_EXIT_CODE` if it is
    still in here ``grace_s`` later; the handler before is put back after (nothing happens
    where called off the main thread: only the main thread sets handlers)."""
    with sigterm_handler_kept(), signals_reach_the_main_thread():
        if _on_main_thread():
            _stopping.clear()
            signal.signal(signal.SIGTERM, functools.partial(_interrupt_once, grace_s))
        try:
            yield
        finally:
            while _deadlines:  # the run ended in time
                _deadlines.pop().cancel()


# A signal the main thread takes at once: its own no-op handler makes a lock the thread waits on
# return early, and CPython then runs every handler that is due (ignored by default, so a stray
# one elsewhere changes nothing).
_NUDGE: Final = signal.SIGWINCH
_INTERRUPTIONS: Final = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def signals_reach_the_main_thread() -> Iterator[None]:
    """While it lasts, Ctrl-C and SIGTERM interrupt the main thread even where the kernel gave
    the signal to another thread of the process: CPython runs handlers on the main thread only,
    and one blocked on a lock (Flower's simulation joins its workers) would otherwise wait on
    until that lock is released, for ever in a run that does not end (measured: 1 Ctrl-C in 4 to
    19 went unheard). Each such signal is seen on a wake-up socket by a thread that then sends the
    main thread :data:`_NUDGE`. Nothing happens where called off the main thread."""
    if not _on_main_thread():
        yield
        return
    heard, told = socket.socketpair()
    told.setblocking(False)
    previous_nudge = signal.signal(_NUDGE, _nothing)
    previous_fd = signal.set_wakeup_fd(told.fileno(), warn_on_full_buffer=False)
    threading.Thread(
        target=_nudge_on_interruption, args=(heard, threading.get_ident()), name="splitflower-signals", daemon=True
    ).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(_NUDGE, previous_nudge)
        told.close()  # the watching thread ends, and closes its end


def _nothing(signum: int, frame: FrameType | None) -> None:
    """The nudge's handler: waking the main thread is all it is for."""


def _nudge_on_interruption(heard: socket.socket, main_thread: int) -> None:
    with heard, contextlib.suppress(OSError):
        while signals := heard.recv(64):
            if _INTERRUPTIONS & set(signals):
                with contextlib.suppress(OSError, ValueError):  # the main thread has ended
                    signal.pthread_kill(main_thread, _NUDGE)


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


def _interrupt_once(grace_s: float, signum: int, frame: FrameType | None) -> None:
    if not _stopping.is_set():
        _stopping.set()
        deadline = threading.Timer(grace_s, _end_now, args=(grace_s,))
        deadline.daemon = True
        deadline.start()
        _deadlines.append(deadline)
        raise KeyboardInterrupt


def _end_now(grace_s: float) -> None:
    with contextlib.suppress(BaseException):  # a closed pipe must not keep the process alive
        print(f"splitflower: the run had not ended {grace_s:g} s after SIGTERM; ending it", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT_CODE)


def is_interruption(error: BaseException) -> bool:
    """Ctrl-C, or the SystemExit Ray's SIGTERM handler raises."""
    return isinstance(error, KeyboardInterrupt) or (isinstance(error, SystemExit) and error.code == signal.SIGTERM)


def stopping() -> None:
    """The run is stopping: a SIGTERM from now on changes nothing."""
    _stopping.set()
