"""A party that waits on the other releases its OpenMP workers, so they stop taking cores.

Each case runs in a fresh interpreter with two torch threads: the test process keeps torch
at one thread, and which variables are set decides whether workers may be released.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from conftest import run_fresh_interpreter
from splitflower._openmp import KEEP_SPINNING_ENV

# Prints {"workers": [...], "alive_after_wait": [...]}: the threads a parallel op started on
# the waiting party's thread, and which of them still exist after it waited.
_SCENARIO = r"""
import json, os, sys, threading, time
import torch
from torch import nn

torch.set_num_threads(2)

def tids():
    return set(os.listdir("/proc/self/task"))

def parallel_op_then_tids():
    torch.ones(4_000_000).mul_(2.0)
    return tids()  # listed on the same thread, before any release can happen

def workers_started_by(run):
    before = tids()
    return sorted(run(parallel_op_then_tids) - before)

party = sys.argv[1]
if party == "compute":
    from splitflower.compute import ComputeThread
    compute = ComputeThread()
    workers = workers_started_by(compute.run)
    time.sleep(0.2)  # the compute thread is idle now
else:
    from splitflower.proxy import ServerModelProxy
    from splitflower.scheduling import ImmediateScheduler
    from splitflower.server_model import ServerModel
    from splitflower.service import SplitService

    class Sleeper(ServerModel):
        def nap(self, seconds: torch.Tensor) -> torch.Tensor:
            time.sleep(float(seconds))
            return seconds

    service = SplitService(port=0)
    service.start()
    token, _ = service.open_session("client-0", ImmediateScheduler(Sleeper(nn.Identity())))
    proxy = ServerModelProxy(service.address, token)
    if party == "client-after-a-short-wait":
        import splitflower.proxy
        splitflower.proxy._RELEASE_WORKERS_AFTER_S = 10.0  # so that a 50 ms wait counts as short
        proxy.nap(seconds=torch.tensor(0.05))
    workers = workers_started_by(lambda op: op())
    if party != "client-future":
        proxy.nap(seconds=torch.tensor(0.05))
    else:
        proxy.nap.future(seconds=torch.tensor(0.05)).result()
    proxy.close()
    service.stop(grace=0)
omp_env = {k: v for k, v in os.environ.items() if "OMP" in k or "MKL" in k or "THREADS" in k}
print(json.dumps({"workers": workers, "alive_after_wait": sorted(tids() & set(workers)),
                  "torch_threads": torch.get_num_threads(), "env": omp_env}))
"""

_SPIN_SETTINGS = frozenset((KEEP_SPINNING_ENV, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"))


def _run(party: str, **env: str) -> dict[str, Any]:
    result = run_fresh_interpreter(_SCENARIO, party, drop=_SPIN_SETTINGS, env=env, timeout=120)
    if not result["workers"]:
        pytest.skip(f"torch started no OpenMP worker here ({result['torch_threads']} threads, {result['env']})")
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are counted through /proc")
@pytest.mark.parametrize("party", ["compute", "client-blocking", "client-future"])
def test_waiting_party_releases_its_openmp_workers(party: str) -> None:
    assert _run(party)["alive_after_wait"] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are counted through /proc")
def test_a_client_whose_last_wait_was_short_keeps_its_workers() -> None:
    result = _run("client-after-a-short-wait")
    assert result["alive_after_wait"] == result["workers"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are counted through /proc")
@pytest.mark.parametrize("opt_out", [{KEEP_SPINNING_ENV: "1"}, {"OMP_WAIT_POLICY": "active"}])
def test_workers_are_kept_when_the_user_chose_how_openmp_waits(opt_out: dict[str, str]) -> None:
    result = _run("client-blocking", **opt_out)
    assert result["alive_after_wait"] == result["workers"]
