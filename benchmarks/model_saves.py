"""What saving the weights after every round costs as a run grows: one writer per run against a
fresh write each time.

A run that saves after every round (``splitflower run --save-model``, reproduce cells, the
example app) writes the weights and every round's results entry. ``checkpoint.ModelWriter``
summarises and encodes each round once; :func:`checkpoint.save_model` (a fresh writer) encodes
them all, which is what every save did before the writer kept them. The record holds, for a
run of R rounds so far, the time of ``save_model`` and of the run's writer saving round R + 1,
and the history's size. The round records are copies of one real round (a one-round parallel
CSL simulation on synthetic data, 3 clients)::

    .venv/bin/python benchmarks/model_saves.py [--rounds-so-far 100 1000 3000]

It writes ``<out-dir>/model-saves-<short commit>[-dirty].json`` and prints a table. A report,
not a test.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport  # provenance, machine description and the results folder

from splitflower.checkpoint import ModelWriter, save_model
from splitflower.experiment import ExperimentConfig, run_experiment
from splitflower.strategy import SplitResult

CLIENTS = 3


def one_round() -> tuple[ExperimentConfig, SplitResult]:
    """A real round's record: one round of parallel CSL on synthetic data."""
    config = ExperimentConfig(algorithm="csl", dataset="synthetic", clients=CLIENTS, rounds=1, train_size=192)
    kept: list[tuple[ExperimentConfig, SplitResult]] = []
    run_experiment(config, say=lambda _: None, keep_model=lambda c, result: kept.append((c, result)))
    return kept[0]


def timed_ms(call: Any) -> float:
    started = time.perf_counter()
    call()
    return round((time.perf_counter() - started) * 1e3, 1)


def measure(config: ExperimentConfig, result: SplitResult, rounds: int, folder: Path) -> dict[str, Any]:
    record = result.rounds[1]
    grown = copy.copy(result)
    grown.rounds = {number: {**record, "round": number} for number in range(1, rounds + 1)}
    write = ModelWriter(folder / "writer.pt")
    write(config, grown)  # the run's saves so far: each round encoded once
    fresh_ms = timed_ms(lambda: save_model(folder / "fresh.pt", config, grown))
    grown.rounds[rounds + 1] = {**record, "round": rounds + 1}
    return {
        "rounds_so_far": rounds,
        "fresh_write_ms": fresh_ms,
        "writer_next_round_ms": timed_ms(lambda: write(config, grown)),
        "file_mb": round((folder / "writer.pt").stat().st_size / 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds-so-far", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--out-dir", type=Path, default=transport.DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    record = transport.new_record("model-saves")
    config, result = one_round()
    record["setup"] = {"algorithm": "csl", "strategy": "parallel", "clients": CLIENTS, "dataset": "synthetic"}
    with tempfile.TemporaryDirectory() as folder:
        record["runs"] = [measure(config, result, rounds, Path(folder)) for rounds in args.rounds_so_far]
    print("rounds so far  fresh write ms  the run's writer, next round ms  file MB")
    for run in record["runs"]:
        print(
            f"{run['rounds_so_far']:13d}  {run['fresh_write_ms']:14.1f}  "
            f"{run['writer_next_round_ms']:32.1f}  {run['file_mb']:7.2f}"
        )
    transport.write_record(record, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
