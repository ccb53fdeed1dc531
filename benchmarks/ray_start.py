"""How often Ray's local node fails to start beside a busy split service, with gRPC's fork
handlers on and off (see ``splitflower/_fork.py``).

Each try is a fresh interpreter that hosts a :class:`~splitflower.service.SplitService`,
keeps a proxy calling it from a thread (as a simulation's ServerApp does while Ray starts),
and runs ``ray.init``. Two settings alternate, try by try:

- ``handlers_on``: ``grpc`` imported before ``splitflower`` with ``GRPC_ENABLE_FORK_SUPPORT``
  unset, gRPC's default (``splitflower run`` warns of it);
- ``handlers_off``: ``splitflower`` imported first, which sets the variable to 0.

::

    .venv/bin/python benchmarks/ray_start.py [--pairs 30]

A failed start costs Ray's 30 s timeout, so a run takes 5 to 10 minutes at 30 pairs. It
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
_TRY_TIMEOUT_S = 120

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

def calls():
    while not done.is_set():
        proxy.echo(x=torch.ones(256))

caller = threading.Thread(target=calls)
caller.start()
"""
STOP_BUSY_SERVICE = """
done.set()
caller.join()
proxy.close()
service.stop(grace=0)
"""
_RAY_INIT = """
import ray
began = time.perf_counter()
try:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    outcome = {"started": True, "seconds": time.perf_counter() - began}
    ray.shutdown()
except Exception as err:
    outcome = {"started": False, "seconds": time.perf_counter() - began, "error": str(err)[:200]}
"""


def one_try(setting: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != GRPC_FORK_SUPPORT_ENV}
    env.update(RAY_USAGE_STATS_ENABLED="0", GRPC_VERBOSITY="ERROR")
    script = BUSY_SERVICE.format(first=SETTINGS[setting]) + _RAY_INIT + STOP_BUSY_SERVICE + "print(json.dumps(outcome))"
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=_TRY_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"started": False, "seconds": float(_TRY_TIMEOUT_S), "error": "the try hung"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"started": False, "seconds": None, "error": f"exit {done.returncode}: {done.stderr[-300:]}"}
    outcome: dict[str, Any] = json.loads(lines[-1])
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="tries of each setting, alternating")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    record = new_record("ray-start")
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


if __name__ == "__main__":
    raise SystemExit(main())
