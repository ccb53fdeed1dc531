"""What releasing idle OpenMP workers saves on the CSL step of ``benchmarks/transport.py``.

The release (``splitflower/_openmp.py``) is decided once per process, so each measurement
runs in a fresh pair of processes: this script, re-run with ``--one``, is the client, and
it spawns the server process exactly as ``transport.py`` does. Pairs alternate the order of
the two settings (released, and kept spinning with ``SPLITFLOWER_KEEP_OPENMP_SPINNING=1``
in both processes). Each run times ``--steps`` split steps (ResNet-20 cut after stage 1,
batch 64) after a warm-up; the record holds every run's median and mean, the mean of the
medians per setting, and the commit it ran on::

    .venv/bin/python benchmarks/openmp_release.py [--pairs 6] [--steps 40]

It writes ``<out-dir>/openmp-release-<short commit>[-dirty].json``. A report, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport  # the sibling benchmark whose CSL step is measured

from splitflower._openmp import KEEP_SPINNING_ENV as KEEP_SPINNING

WARMUP_STEPS = 5


def one_run(steps: int, threads: int) -> dict[str, float]:
    """Time ``steps`` split steps in this process against a freshly spawned server process."""
    torch.set_num_threads(threads)
    server = transport.ServerProcess(threads)
    try:
        proxy = transport._proxy(server, server.info["service"], "open-csl", transport.SEED)
        generator = torch.Generator().manual_seed(transport.SEED + 1)
        x = torch.randn(transport.CSL_BATCH, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (transport.CSL_BATCH,), generator=generator)
        _, bottom, _ = transport._csl_halves(transport.SEED)
        optimizer = torch.optim.SGD(bottom.parameters(), lr=transport.CSL_LR, momentum=transport.CSL_MOMENTUM)

        step = transport.csl_split_step(proxy, bottom, optimizer, x, y)
        transport._timed(step, WARMUP_STEPS)
        times_ms = np.asarray(transport._timed(step, steps)) / 1000
        proxy.close()
    finally:
        server.stop()
    return {"median_ms": round(float(np.median(times_ms)), 2), "mean_ms": round(float(times_ms.mean()), 2)}


def run_pairs(pairs: int, steps: int, threads: int) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {"released": [], "kept_spinning": []}
    base_env = {k: v for k, v in os.environ.items() if k != KEEP_SPINNING}
    for pair in range(pairs):
        order = ["released", "kept_spinning"] if pair % 2 == 0 else ["kept_spinning", "released"]
        for setting in order:
            env = {**base_env, KEEP_SPINNING: "1"} if setting == "kept_spinning" else base_env
            command = [sys.executable, __file__, "--one", "--steps", str(steps), "--threads", str(threads)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"a {setting} run failed:\n{done.stderr[-3000:]}")
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  pair {pair + 1}/{pairs} {setting:>13}: {runs[setting][-1]}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
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
    results: dict[str, Any] = {"benchmark": "openmp-release", **transport.provenance()}
    results["machine"] = transport.machine_info(args.threads)
    print(f"OpenMP release benchmark at {results['commit']}: {args.pairs} pairs x {args.steps} CSL steps")
    runs = run_pairs(args.pairs, args.steps, args.threads)
    summary = {setting: round(float(np.mean([r["median_ms"] for r in rs])), 2) for setting, rs in runs.items()}
    results.update(
        steps_per_run=args.steps,
        runs=runs,
        mean_of_medians_ms=summary,
        released_over_kept=round(summary["released"] / summary["kept_spinning"], 3),
        runtime_s=round(time.perf_counter() - started, 1),
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"openmp-release-{results['commit_short']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"mean of run medians: released {summary['released']} ms, kept spinning {summary['kept_spinning']} ms "
        f"(ratio {results['released_over_kept']}); wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
