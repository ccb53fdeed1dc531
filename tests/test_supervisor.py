"""`splitflower run`'s supervisor, which runs each attempt in a fresh process: what it does
when it is told to stop. Its attempts here are small scripts (no torch, no Flower), and the
SIGTERM reaches this process, as `kill` would reach the command."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from splitflower import cli
from splitflower.errors import INTERRUPTED_EXIT_CODE, STALLED_EXIT_CODE

# An attempt deaf to signals, as one stuck where none reaches Python (its Ray processes died
# under it), that says it runs by writing the file it is given.
_DEAF_ATTEMPT = """
import pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[-1]).write_text("running")
time.sleep({seconds})
sys.exit({status})
"""


def _terminated_once_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attempt: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, float]:
    """Run two attempts at most; SIGTERM this process once the first runs. (status, stderr, seconds)"""
    running = tmp_path / "running"
    monkeypatch.setattr(cli, "_ATTEMPT_COMMAND", (sys.executable, "-c", attempt))
    monkeypatch.setattr(cli, "TERMINATION_GRACE_S", 1.0)

    def terminate_once_running() -> None:
        deadline = time.monotonic() + 30
        while not running.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if running.exists():  # the supervisor's handler is set before the attempt starts
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_running, daemon=True)
    killer.start()
    started = time.monotonic()
    status = cli._run_attempts([str(running)], attempts=2)
    killer.join()
    assert running.exists(), "the attempt ran"
    return status, capsys.readouterr().err, time.monotonic() - started


def test_an_attempt_that_does_not_end_after_sigterm_is_killed_and_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deaf = _DEAF_ATTEMPT.format(seconds=60, status=0)
    status, stderr, seconds = _terminated_once_running(tmp_path, monkeypatch, deaf, capsys)
    assert status == 128 + signal.SIGKILL, stderr
    assert "splitflower: killing the run's attempt (no end 1 s after SIGTERM)" in stderr
    assert "starting it again" not in stderr and seconds < 30


def test_an_attempt_that_fails_to_start_after_sigterm_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its exit status says "run me again", but the command was told to stop meanwhile.
    stalls = _DEAF_ATTEMPT.format(seconds=0.5, status=STALLED_EXIT_CODE)
    status, stderr, _ = _terminated_once_running(tmp_path, monkeypatch, stalls, capsys)
    assert status == STALLED_EXIT_CODE and "starting it again" not in stderr, stderr


def test_an_attempt_that_fails_to_start_unasked_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_ATTEMPT_COMMAND", (sys.executable, "-c", f"raise SystemExit({STALLED_EXIT_CODE})"))
    handlers = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]
    assert cli._run_attempts([], attempts=2) == STALLED_EXIT_CODE
    assert "(attempt 1 of 2); starting it again in a fresh process" in capsys.readouterr().err
    assert [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)] == handlers, "put back"


# A run that takes SIGTERM as Ctrl-C, then spends `linger` seconds before it ends: a thread
# of Ray's or of the ServerApp holding it, say (the run itself in this process, --attempts 1).
_LINGERING_RUN = """
import os, signal, time
from splitflower._termination import sigterm_as_ctrl_c
with sigterm_as_ctrl_c(grace_s=0.5):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        time.sleep({linger})
print("went-on", flush=True)
time.sleep(1.0)
print("ended", flush=True)
"""


@pytest.mark.parametrize("linger", [0.0, 20.0])
def test_a_run_that_has_not_ended_a_grace_after_sigterm_ends_its_process(linger: float) -> None:
    started = time.monotonic()
    run = [sys.executable, "-c", _LINGERING_RUN.format(linger=linger)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    if linger:
        assert done.returncode == INTERRUPTED_EXIT_CODE, done.stderr
        assert done.stdout.split() == ["interrupted"] and time.monotonic() - started < 15
        assert "the run had not ended 0.5 s after SIGTERM; ending it" in done.stderr
    else:  # ended within the grace: the process goes on, beyond it, unharmed
        assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["interrupted", "went-on", "ended"], "")


# Ctrl-C or SIGTERM that the kernel gives to a thread other than the main one, while the main
# thread waits on a lock (Flower's simulation joins its workers there) for 20 s.
_SIGNAL_TO_ANOTHER_THREAD = """
import signal, threading, time
from splitflower._termination import sigterm_as_ctrl_c
def send_from_this_thread():
    time.sleep(0.3)
    signal.pthread_kill(threading.get_ident(), signal.{name})
with sigterm_as_ctrl_c():
    worker = threading.Thread(target=time.sleep, args=(20,), daemon=True)
    worker.start()
    threading.Thread(target=send_from_this_thread).start()
    started = time.monotonic()
    try:
        worker.join()
    except KeyboardInterrupt:
        print("interrupted after", round(time.monotonic() - started, 1), flush=True)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_another_thread_took_still_interrupts_the_main_thread_where_it_waits(name: str) -> None:
    run = [sys.executable, "-c", _SIGNAL_TO_ANOTHER_THREAD.format(name=name)]
    # As from a terminal: a job a script started with `&` (CI's tests, say) ignores Ctrl-C.
    as_at_a_terminal = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False, preexec_fn=as_at_a_terminal)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[:2] == ["interrupted", "after"] and float(words[2]) < 5, done.stdout
