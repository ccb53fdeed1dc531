"""A process running splitflower's gRPC channel starts children that reach ``exec``.

gRPC's fork handlers, on by default, can abort a child forked while another thread is inside
gRPC (see :mod:`splitflower._fork`); Ray's raylet and GCS died that way before they logged a
line. Each test runs in a fresh interpreter, since gRPC reads the setting at its import.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO_ROOT
from splitflower._fork import GRPC_FORK_SUPPORT_ENV

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from ray_start import children_script, environment, run_script  # the benchmark's runs

# Children forked while calls flow. With gRPC's fork handlers on, 43 of 5400 children aborted
# in one-off runs here (about 1 in 120), so 600 leave a regression about a 1% chance to pass.
_CHILDREN = 600


def _run(script: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=240
    )
    if done.returncode != 0:
        raise AssertionError(f"the child interpreter failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def test_children_of_a_process_serving_calls_all_reach_exec() -> None:
    # splitflower imported first, no setting in the environment: splitflower's own setting
    outcome = run_script(children_script("handlers_off", _CHILDREN), environment())
    assert outcome["exits"] == {"0": _CHILDREN}, f"exit codes of {_CHILDREN} children (-6: SIGABRT): {outcome}"


_SETTING = """
    {before}
    import os
    import splitflower
    from splitflower._fork import fork_handlers_warning
    print(os.environ.get("{name}"), fork_handlers_warning() is not None)
"""


def test_importing_splitflower_turns_grpc_fork_handlers_off() -> None:
    script = _SETTING.format(before="", name=GRPC_FORK_SUPPORT_ENV)
    assert _run(script, environment()) == "0 False"


def test_a_value_the_user_set_is_kept() -> None:
    script = _SETTING.format(before="", name=GRPC_FORK_SUPPORT_ENV)
    assert _run(script, environment(**{GRPC_FORK_SUPPORT_ENV: "1"})) == "1 False"


def test_grpc_imported_first_is_reported_as_too_late() -> None:
    script = _SETTING.format(before="import grpc", name=GRPC_FORK_SUPPORT_ENV)
    assert _run(script, environment()) == "0 True"


def test_flower_starts_its_own_processes_without_running_fork_handlers() -> None:
    # Why a ServerApp under the deployment runtime does not warn (splitflower.app): Flower starts
    # its processes with Popen and no preexec_fn, which Python runs as a vfork, where no fork
    # handler runs. Should a Flower release fork its children instead, this fails.
    import flwr

    forking = [
        f"{path.name}:{number}"
        for path in Path(flwr.__file__).parent.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "preexec_fn" in line or "os.fork(" in line
    ]
    assert forking == [], f"Flower forks (fork handlers would run in the child) at {forking}"
    assert subprocess._USE_VFORK  # type: ignore[attr-defined]  # Python vforks a plain Popen
