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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport  # the sibling benchmark whose CSL step is measured

__all__ = ["main"]

WARMUP_STEPS = 5

Run = dict[str, float | int | None]
"""One run's figures (a huge-page tally is None where /proc does not give it)."""


def _anon_huge_kib(pid: int | str) -> int | None:
    """Anonymous memory of process ``pid`` backed by transparent huge pages, in KiB (Linux)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith("AnonHugePages:")), None)


def _beside_one_process(split_step: Callable[[], None], steps: int) -> dict[str, float]:
    """The unsplit step in this process and the split step, in alternating blocks: medians and
    their ratio."""
    model, _, _ = transport._csl_halves(transport.SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=transport.CSL_LR, momentum=transport.CSL_MOMENTUM)
    one_process_step = transport.csl_one_process_step(model, optimizer, *transport.csl_batch())
    transport._timed(one_process_step, WARMUP_STEPS)
    samples = transport._interleaved({"split": split_step, "one_process": one_process_step}, steps, blocks=4)
    split, one = (float(np.median(samples[name])) / 1000 for name in ("split", "one_process"))
    return {
        "paired_split_median_ms": round(split, 2),
        "one_process_median_ms": round(one, 2),
        "split_over_one_process": round(split / one, 3),
    }


def one_run(steps: int, threads: int, one_process: bool = False) -> Run:
    """Time ``steps`` split steps in this process against a freshly spawned server process
    (and, with ``one_process``, the unsplit step beside them)."""
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
        run: Run = {
            "median_ms": round(float(np.median(times_ms)), 2),
            "mean_ms": round(float(times_ms.mean()), 2),
            "client_faults_per_step": faults["client"],
            "server_faults_per_step": faults["server"],
            "client_anon_huge_kib": _anon_huge_kib("self"),
            "server_anon_huge_kib": _anon_huge_kib(server_pid),
        }
        if one_process:
            run.update(_beside_one_process(step, steps))
        proxy.close()
    finally:
        server.stop()
    return run


def run_pairs(
    script: str,
    settings: Mapping[str, Mapping[str, str]],
    pairs: int,
    steps: int,
    threads: int,
    one_process: bool = False,
) -> dict[str, list[Run]]:
    """Run ``script --one`` once per setting per pair, each setting's variables in both processes."""
    runs: dict[str, list[Run]] = {name: [] for name in settings}
    controlled = {variable for overrides in settings.values() for variable in overrides}
    base_env = {k: v for k, v in os.environ.items() if k not in controlled}
    names = list(settings)
    for pair in range(pairs):
        for name in names if pair % 2 == 0 else names[::-1]:
            command = [sys.executable, script, "--one", "--steps", str(steps), "--threads", str(threads)]
            command += ["--one-process"] if one_process else []
            env = {**base_env, **settings[name]}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"a {name} run failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  pair {pair + 1}/{pairs} {name:>20}: {runs[name][-1]}", flush=True)
    return runs


def _mean(runs: Sequence[Run], key: str, digits: int = 2) -> float:
    return round(float(np.mean([cast(float, run[key]) for run in runs])), digits)  # timings: never None


def main(
    benchmark: str,
    script: str,
    settings: Mapping[str, Mapping[str, str]],
    argv: Sequence[str] | None = None,
    one_process: bool = False,
) -> int:
    """The command line of a fresh-pairs benchmark; the first setting is splitflower's default,
    and the record gives its mean of run medians over each other setting's. With
    ``one_process``, each run also times the unsplit step beside the split one, and the record
    gives each setting's mean of those and of their ratios."""
    parser = argparse.ArgumentParser(description=f"{benchmark}: {__doc__.splitlines()[0] if __doc__ else ''}")
    parser.add_argument("--pairs", type=int, default=6, help="process pairs per setting (default %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="timed split steps per run (default %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per process")
    parser.add_argument("--out-dir", type=Path, default=transport.DEFAULT_OUT_DIR)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one run, JSON on stdout
    parser.add_argument("--one-process", action="store_true", help=argparse.SUPPRESS)  # in a run: unsplit too
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.steps < 1 or args.threads < 1:
        given = f"{args.pairs}, {args.steps}, {args.threads}"
        parser.error(f"--pairs, --steps and --threads must each be at least 1, got {given}")
    if args.one:
        print(json.dumps(one_run(args.steps, args.threads, args.one_process)))
        return 0
    started = time.perf_counter()
    results: dict[str, Any] = {"benchmark": benchmark, **transport.provenance()}
    results["machine"] = transport.machine_info(args.threads)
    print(f"{benchmark} benchmark at {results['commit']}: {args.pairs} pairs x {args.steps} CSL steps")
    runs = run_pairs(script, settings, args.pairs, args.steps, args.threads, one_process)
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
    if one_process:
        unsplit = {name: _mean(rs, "one_process_median_ms") for name, rs in runs.items()}
        ratios = {name: _mean(rs, "split_over_one_process", 3) for name, rs in runs.items()}
        results.update(one_process_mean_of_medians_ms=unsplit, mean_split_over_one_process=ratios)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{benchmark}-{results['commit_short']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"mean of run medians (ms): {medians}; {results['ratios']}; "
        f"server faults per step: {results['mean_server_faults_per_step']}; wrote {path}"
    )
    return 0
