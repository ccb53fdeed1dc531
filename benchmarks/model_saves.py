"""What saving the weights, and the rounds so far, after every round costs as a run grows: one
writer per run against a fresh write each time.

A run that saves after every round (``splitflower run --save-model``, reproduce cells, the
example app) writes the weights and every round's results entry. ``checkpoint.ModelWriter``
summarises and encodes each round once; :func:`checkpoint.save_model` (a fresh writer) encodes
them all, which is what every save did before the writer kept them. The record holds, for a
run of R rounds so far, the time of ``save_model`` and of the run's writer saving round R + 1,
and the history's size. Likewise for the results file a run keeps as it goes (``splitflower
run --out``: ``results.ProgressWriter``, which encodes each round's entry once, against
``write_results`` of the whole document). The round records are copies of one real round (a
one-round parallel CSL simulation on synthetic data, 3 clients)::

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
from splitflower.experiment import ExperimentConfig
from splitflower.results import ProgressWriter, results_document, summarise_round, summarise_rounds, write_results
from splitflower.simulation import run_experiment_owning_the_process
from splitflower.strategy import SplitResult

CLIENTS = 3
STARTUP_TIMEOUT_S = 120.0


def one_round() -> tuple[ExperimentConfig, SplitResult]:
    """A real round's record: one round of parallel CSL on synthetic data."""
    config = ExperimentConfig(algorithm="csl", dataset="synthetic", clients=CLIENTS, rounds=1, train_size=192)
    kept: list[tuple[ExperimentConfig, SplitResult]] = []
    # Owning the process: where Ray's node fails to start, it ends saying so instead of hanging.
    run_experiment_owning_the_process(
        config,
        say=lambda _: None,
        startup_timeout=STARTUP_TIMEOUT_S,
        keep_model=lambda c, result: kept.append((c, result)),
    )
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
    entries = summarise_rounds(grown.rounds)
    keep = ProgressWriter(folder / "run.partial.json")
    keep(results_document(config, entries, 0.0))  # the run's progress files so far
    fresh_results_ms = timed_ms(lambda: write_results(results_document(config, entries, 0.0), folder / "fresh.json"))
    grown.rounds[rounds + 1] = {**record, "round": rounds + 1}
    entries.append(summarise_round(grown.rounds[rounds + 1]))
    return {
        "rounds_so_far": rounds,
        "fresh_write_ms": fresh_ms,
        "writer_next_round_ms": timed_ms(lambda: write(config, grown)),
        "file_mb": round((folder / "writer.pt").stat().st_size / 1e6, 2),
        "fresh_results_write_ms": fresh_results_ms,
        "progress_writer_next_round_ms": timed_ms(lambda: keep(results_document(config, entries, 0.0))),
        "results_file_mb": round((folder / "run.partial.json").stat().st_size / 1e6, 2),
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
    print("                 model file (.pt)                        results so far (.partial.json)")
    print("rounds so far  fresh write ms  the run's writer ms  MB     fresh write ms  the run's writer ms  MB")
    for run in record["runs"]:
        print(
            f"{run['rounds_so_far']:13d}  {run['fresh_write_ms']:14.1f}  {run['writer_next_round_ms']:19.1f}  "
            f"{run['file_mb']:5.2f}  {run['fresh_results_write_ms']:14.1f}  "
            f"{run['progress_writer_next_round_ms']:19.1f}  {run['results_file_mb']:5.2f}"
        )
    transport.write_record(record, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
