"""What a process-wide setting changes on the CSL step of ``benchmarks/transport.py``.

Settings such as the OpenMP release or glibc's malloc parameters are decided once per
process, so each measurement runs in a fresh pair of processes: the calling script, re-run
with ``--one``, is the client, and it spawns the server process exactly as ``transport.py``
does. Pairs alternate the order of the settings. Each run times ``--steps`` split steps
(ResNet-20 cut after stage 1, batch 64) after a warm-up and counts both processes' minor
page faults over them; the record holds every run, the mean of the run medians per setting,
their ratio, and the commit it ran on. A report, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport  # the sibling benchmark whose CSL step is measured

__all__ = ["main"]

WARMUP_STEPS = 5


def one_run(steps: int, threads: int) -> dict[str, float]:
    """Time ``steps`` split steps in this process against a freshly spawned server process."""
    torch.set_num_threads(threads)
    server = transport.ServerProcess(threads)
    try:
        proxy = transport._proxy(server, server.info["service"], "open-csl", transport.SEED)
        x, y = transport.csl_batch()
        _, bottom, _ = transport._csl_halves(transport.SEED)
        optimizer = torch.optim.SGD(bottom.parameters(), lr=transport.CSL_LR, momentum=transport.CSL_MOMENTUM)

        step = transport.csl_split_step(proxy, bottom, optimizer, x, y)
        transport._timed(step, WARMUP_STEPS)
        server_pid = server.process.pid
        if server_pid is None:
            raise RuntimeError("the server process has no pid: it did not start")
        faults_per_step = transport.fault_counter(server_pid)
        times_ms = np.asarray(transport._timed(step, steps)) / 1000
        faults = faults_per_step(steps)
        proxy.close()
    finally:
        server.stop()
    return {
        "median_ms": round(float(np.median(times_ms)), 2),
        "mean_ms": round(float(times_ms.mean()), 2),
        "client_faults_per_step": faults["client"],
        "server_faults_per_step": faults["server"],
    }


def run_pairs(
    script: str, settings: Mapping[str, Mapping[str, str]], pairs: int, steps: int, threads: int
) -> dict[str, list[dict[str, float]]]:
    """Run ``script --one`` once per setting per pair, each setting's variables in both processes."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    controlled = {variable for overrides in settings.values() for variable in overrides}
    base_env = {k: v for k, v in os.environ.items() if k not in controlled}
    names = list(settings)
    for pair in range(pairs):
        for name in names if pair % 2 == 0 else names[::-1]:
            command = [sys.executable, script, "--one", "--steps", str(steps), "--threads", str(threads)]
            env = {**base_env, **settings[name]}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"a {name} run failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  pair {pair + 1}/{pairs} {name:>20}: {runs[name][-1]}", flush=True)
    return runs


def _mean(runs: Sequence[dict[str, float]], key: str) -> float:
    return round(float(np.mean([run[key] for run in runs])), 2)


def main(
    benchmark: str, script: str, settings: Mapping[str, Mapping[str, str]], argv: Sequence[str] | None = None
) -> int:
    """The command line of a fresh-pairs benchmark; the first setting is splitflower's default,
    and the record gives its mean of run medians over each other setting's."""
    parser = argparse.ArgumentParser(description=f"{benchmark}: {__doc__.splitlines()[0] if __doc__ else ''}")
    parser.add_argument("--pairs", type=int, default=6, help="process pairs per setting (default %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="timed split steps per run (default %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per process")
    parser.add_argument("--out-dir", type=Path, default=transport.DEFAULT_OUT_DIR)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one run, JSON on stdout
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.steps < 1 or args.threads < 1:
        given = f"{args.pairs}, {args.steps}, {args.threads}"
        parser.error(f"--pairs, --steps and --threads must each be at least 1, got {given}")
    if args.one:
        print(json.dumps(one_run(args.steps, args.threads)))
        return 0
    started = time.perf_counter()
    results: dict[str, Any] = {"benchmark": benchmark, **transport.provenance()}
    results["machine"] = transport.machine_info(args.threads)
    print(f"{benchmark} benchmark at {results['commit']}: {args.pairs} pairs x {args.steps} CSL steps")
    runs = run_pairs(script, settings, args.pairs, args.steps, args.threads)
    medians = {name: _mean(rs, "median_ms") for name, rs in runs.items()}
    first, *others = list(settings)
    results.update(
        settings={name: dict(overrides) for name, overrides in settings.items()},
        steps_per_run=args.steps,
        runs=runs,
        mean_of_medians_ms=medians,
        mean_server_faults_per_step={name: _mean(rs, "server_faults_per_step") for name, rs in runs.items()},
        mean_client_faults_per_step={name: _mean(rs, "client_faults_per_step") for name, rs in runs.items()},
        ratios={f"{first} / {other}": round(medians[first] / medians[other], 3) for other in others},
        runtime_s=round(time.perf_counter() - started, 1),
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{benchmark}-{results['commit_short']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"mean of run medians (ms): {medians}; {results['ratios']}; "
        f"server faults per step: {results['mean_server_faults_per_step']}; wrote {path}"
    )
    return 0
