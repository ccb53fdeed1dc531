"""A process running splitflower's gRPC channel starts children that reach ``exec``.

gRPC's fork handlers, on by default, can abort a child forked while another thread is inside
gRPC (see :mod:`splitflower._fork`); Ray's raylet and GCS died that way before they logged a
line. Each test runs in a fresh interpreter, since gRPC reads the setting at its import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT
from splitflower._fork import GRPC_FORK_SUPPORT_ENV

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from ray_start import BUSY_SERVICE, STOP_BUSY_SERVICE  # the benchmark's prelude, shared

# Children to start while calls flow. With gRPC's fork handlers on, 1 to 5 of every 300 to
# 600 died of SIGABRT here (one-off runs), so 600 leave a child abort all but certain to show.
_CHILDREN = 600

_FORKS = """
import collections, subprocess
exits = collections.Counter()
for _ in range({children}):
    # preexec_fn makes Python fork (not vfork), as Ray's process starter does
    child = subprocess.Popen(["/bin/true"], preexec_fn=lambda: None)
    exits[child.wait(timeout=30)] += 1
"""


def _run(script: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=240
    )
    if done.returncode != 0:
        raise AssertionError(f"the child interpreter failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def _environment(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != GRPC_FORK_SUPPORT_ENV}
    env.update(values)
    return env


def test_children_of_a_process_serving_calls_all_reach_exec() -> None:
    script = (
        BUSY_SERVICE.format(first="") + _FORKS.format(children=_CHILDREN) + STOP_BUSY_SERVICE + "print(dict(exits))"
    )
    exits = _run(script, _environment())
    assert exits == f"{{0: {_CHILDREN}}}", f"exit codes of {_CHILDREN} children: {exits} (-6 is SIGABRT)"


_SETTING = """
    {before}
    import os
    import splitflower
    from splitflower._fork import fork_handlers_left_on
    print(os.environ.get("{name}"), fork_handlers_left_on())
"""


def test_importing_splitflower_turns_grpc_fork_handlers_off() -> None:
    script = _SETTING.format(before="", name=GRPC_FORK_SUPPORT_ENV)
    assert _run(script, _environment()) == "0 False"


def test_a_value_the_user_set_is_kept() -> None:
    script = _SETTING.format(before="", name=GRPC_FORK_SUPPORT_ENV)
    assert _run(script, _environment(**{GRPC_FORK_SUPPORT_ENV: "1"})) == "1 False"


def test_grpc_imported_first_is_reported_as_too_late() -> None:
    script = _SETTING.format(before="import grpc", name=GRPC_FORK_SUPPORT_ENV)
    assert _run(script, _environment()) == "0 True"
