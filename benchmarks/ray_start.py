"""How often a child forked beside a busy split service dies before exec, and how often Ray's
local node fails to start there, with gRPC's fork handlers on and off (see
``splitflower/_fork.py``).

Each run is a fresh interpreter that hosts a :class:`~splitflower.service.SplitService` and
keeps a proxy calling it from a thread (as a simulation's ServerApp does while Ray starts).
A *children* run then starts ``--children`` ``/bin/true`` processes and counts their exit
codes; a *Ray* try runs ``ray.init``. Children are started two ways (``CHILD_STARTS``):

- ``fork``: with a ``preexec_fn``, so Python forks and glibc runs gRPC's fork handlers, as
  Ray's process starter does;
- ``vfork``: a plain ``subprocess.Popen``, as Flower starts its SuperExec, ClientApp and
  simulation processes; Python then vforks, and no fork handler runs.

Two settings alternate, run by run:

- ``handlers_on``: ``grpc`` imported before ``splitflower`` with ``GRPC_ENABLE_FORK_SUPPORT``
  unset, gRPC's default (``splitflower run`` warns of it);
- ``handlers_off``: ``splitflower`` imported first, which sets the variable to 0.

::

    .venv/bin/python benchmarks/ray_start.py [--pairs 30] [--children-runs 3] [--children 600]

A failed start costs Ray's 30 s timeout, so a run takes 6 to 12 minutes at 30 pairs. A run
that made no call while it forked or started Ray is an error, not a figure. It
prints the tally and writes ``<out-dir>/ray-start-<short commit>[-dirty].json``. A report,
not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transport import DEFAULT_OUT_DIR, new_record, write_record

from splitflower._fork import GRPC_FORK_SUPPORT_ENV

SETTINGS = {"handlers_on": "import grpc", "handlers_off": ""}
_RUN_TIMEOUT_S = 240
_QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "GRPC_VERBOSITY": "ERROR"}

# A fresh interpreter's prelude: splitflower's service up and a proxy calling it from a thread
# (``{first}`` runs before splitflower is imported); STOP_BUSY_SERVICE ends both. Shared with
# tests/test_fork.py.
BUSY_SERVICE = """
import json, threading, time
{first}
import splitflower
import torch
from torch import nn
from splitflower.proxy import ServerModelProxy
from splitflower.scheduling import ImmediateScheduler
from splitflower.server_model import ServerModel
from splitflower.service import SplitService

class Echo(ServerModel):
    def __init__(self):
        super().__init__(nn.Identity())

    def echo(self, x):
        return x

service = SplitService(port=0)
service.start()
token, _ = service.open_session("client-0", ImmediateScheduler(Echo()))
proxy = ServerModelProxy(service.address, token)
done = threading.Event()
calls_made = [0]

def calls():
    while not done.is_set():
        proxy.echo(x=torch.ones(256))
        calls_made[0] += 1

caller = threading.Thread(target=calls)
caller.start()
"""
STOP_BUSY_SERVICE = """
done.set()
caller.join()
proxy.close()
service.stop(grace=0)
"""
# Popen's extra arguments per way of starting a child. A preexec_fn makes Python fork where it
# would vfork (Python >= 3.10 on Linux: subprocess._USE_VFORK, checked by the vfork runs).
CHILD_STARTS = {"fork": ", preexec_fn=lambda: None", "vfork": ""}
FORK_CHILDREN = """
import collections, subprocess
exits = collections.Counter()
calls_before = calls_made[0]
for _ in range({children}):
    child = subprocess.Popen(["/bin/true"]{start})
    exits[child.wait(timeout=30)] += 1
outcome = {{
    "exits": {{str(code): n for code, n in exits.items()}},
    "calls": calls_made[0] - calls_before,
    "vfork_available": getattr(subprocess, "_USE_VFORK", False),
}}
"""
_RAY_INIT = """
import ray
calls_before = calls_made[0]
began = time.perf_counter()
try:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    outcome = {"started": True, "seconds": time.perf_counter() - began}
    ray.shutdown()
except Exception as err:
    outcome = {"started": False, "seconds": time.perf_counter() - began, "error": str(err)[:200]}
outcome["calls"] = calls_made[0] - calls_before
"""


def busy_service_script(setting: str, body: str) -> str:
    """A fresh interpreter's script: the busy service under ``setting``, ``body`` (which sets
    ``outcome``), the service stopped, ``outcome`` printed as JSON."""
    return BUSY_SERVICE.format(first=SETTINGS[setting]) + body + STOP_BUSY_SERVICE + "print(json.dumps(outcome))"


def run_script(script: str, env: dict[str, str]) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter; its outcome (raises if it failed or made no call)."""
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the interpreter failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    outcome: dict[str, Any] = json.loads(lines[-1])
    if outcome["calls"] < 1:
        raise RuntimeError(f"no proxy call completed while the run forked; nothing was measured: {outcome}")
    return outcome


def environment(**values: str) -> dict[str, str]:
    """This process's environment without a fork-support setting (the script's import order
    decides, unless ``values`` sets one), quiet, with ``values`` on top."""
    env = {k: v for k, v in os.environ.items() if k != GRPC_FORK_SUPPORT_ENV}
    return env | _QUIET | values


def one_try(setting: str) -> dict[str, Any]:
    try:
        return run_script(busy_service_script(setting, _RAY_INIT), environment())
    except subprocess.TimeoutExpired:
        return {"started": False, "seconds": float(_RUN_TIMEOUT_S), "error": "the try hung"}


def children_script(setting: str, children: int, start: str = "fork") -> str:
    """The script of a children run: ``children`` started the ``start`` way (``CHILD_STARTS``)."""
    return busy_service_script(setting, FORK_CHILDREN.format(children=children, start=CHILD_STARTS[start]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="tries of each setting, alternating")
    parser.add_argument("--children-runs", type=int, default=3, help="children runs of each setting")
    parser.add_argument("--children", type=int, default=600, help="children forked per children run")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    record = new_record("ray-start")
    record["children"] = _children(args.children_runs, args.children, "fork", list(SETTINGS))
    # gRPC's default only: Flower's own processes import grpc first (the case to measure)
    record["children_vfork"] = _children(args.children_runs, args.children, "vfork", ["handlers_on"])
    tries: dict[str, list[dict[str, Any]]] = {setting: [] for setting in SETTINGS}
    for pair in range(args.pairs):
        for setting in SETTINGS:
            outcome = one_try(setting)
            tries[setting].append(outcome)
            print(f"pair {pair + 1}/{args.pairs} {setting}: {json.dumps(outcome)}", flush=True)
    record["tries"] = tries
    record["failed"] = {setting: sum(not t["started"] for t in outcomes) for setting, outcomes in tries.items()}
    record["pairs"] = args.pairs
    for setting, failed in record["failed"].items():
        print(f"{setting}: Ray failed to start {failed} times in {args.pairs}")
    write_record(record, args.out_dir)
    return 0


def _children(runs: int, children: int, start: str, settings: list[str]) -> dict[str, Any]:
    """Children started the ``start`` way beside the busy service, per setting: each run's exit
    codes, and the total that did not exit 0 (-6: SIGABRT)."""
    exits: dict[str, list[dict[str, int]]] = {setting: [] for setting in settings}
    for run in range(runs):
        for setting in settings:
            outcome = run_script(children_script(setting, children, start), environment())
            if start == "vfork" and not outcome["vfork_available"]:
                raise RuntimeError("this Python does not vfork (subprocess._USE_VFORK): its children fork instead")
            exits[setting].append(outcome["exits"])
            print(f"children run {run + 1}/{runs} {start} {setting}: {json.dumps(outcome)}", flush=True)
    died = {
        setting: sum(n for one in runs_ for code, n in one.items() if code != "0") for setting, runs_ in exits.items()
    }
    for setting, count in died.items():
        print(f"{start} {setting}: {count} of {runs * children} children did not reach exec")
    return {
        "start": start,
        "per_run": children,
        "runs": exits,
        "died": died,
    }


if __name__ == "__main__":
    raise SystemExit(main())
