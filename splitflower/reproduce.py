"""``splitflower reproduce dsl-paper``: the decoupled-SL paper's grid, one results file per cell.

The grid is algorithm {CSL, DSL} x cut {s, m, d} x clients N {1, 5, 10} with the paper's
hyperparameters (SGD, momentum 0.9, learning rate 0.001, weight decay 1e-4 as in its code,
batch 128; DSL's auxiliary head is one linear layer, the algorithm's default). Clients train
one after another on one shared model, as the paper's code does: the ``sequential``
strategy, one Flower round = one epoch (``local_epochs`` 1; each client makes one pass over
its IID share, so a round is one pass over the training set).

Two scales (:data:`SCALES`):

* ``paper``: ResNet-110, 50 epochs, the full datasets: CIFAR-10 and CIFAR-100 from
  ``--data-root`` where given, Fashion-MNIST otherwise. Meant for a GPU (``--device cuda``).
* ``small``: ResNet-20 on Fashion-MNIST, 4 epochs on a seeded 3,840-example training subset
  and a 1,000-example test subset: the 18 cells take about 45 minutes on a 2-core CPU.

Each cell runs in a fresh process (a Flower simulation starts Ray, which does not start twice
in one process reliably) and writes ``<out>/<dataset>-<algorithm>-<cut>-n<N>.json``
atomically, and its weights after every round to ``<...>.pt`` beside it
(:func:`splitflower.checkpoint.save_model`); a rerun skips every cell whose results file
exists with the same configuration, and trains a cell that was stopped midway (killed, out
of time, failed) on from the last round its ``.pt`` holds, so an interrupted grid resumes
where it stopped, to the round.

Example
-------
>>> cells = grid_configs(SCALES["small"], algorithms=("dsl",), cuts=("s",), clients=(1,))
>>> cell_filename(cells[0])
'fashion-mnist-dsl-s-n1.json'
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from splitflower._logs import configure_logging
from splitflower.checkpoint import ModelWriter, SavedModel, load_model
from splitflower.errors import (
    DEFAULT_ATTEMPTS,
    STALLED_EXIT_CODE,
    CellFailedError,
    ConfigError,
    ResultsFileError,
    SimulationStartError,
)
from splitflower.experiment import ExperimentConfig, differing_fields, inert_fields
from splitflower.results import results_document, source_commit, write_results
from splitflower.simulation import run_experiment_owning_the_process
from splitflower.strategy import SplitResult

__all__ = [
    "ALGORITHMS",
    "CLIENTS",
    "CUTS",
    "GRIDS",
    "PAPER_HYPERPARAMETERS",
    "SCALES",
    "CellOutcome",
    "Scale",
    "add_reproduce_parser",
    "cell_filename",
    "grid_configs",
    "run_cell_process",
    "reproduce_main",
    "run_grid",
]

logger = logging.getLogger(__name__)

GRIDS = ("dsl-paper",)
ALGORITHMS = ("csl", "dsl")
CUTS = ("s", "m", "d")
CLIENTS = (1, 5, 10)

# Section IV-A of the paper; weight decay from its code.
PAPER_HYPERPARAMETERS: dict[str, Any] = {
    "batch_size": 128,
    "lr": 0.001,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "local_epochs": 1,
    "strategy": "sequential",
    "partition": "iid",
}


@dataclass(frozen=True)
class Scale:
    """Model, epochs and data sizes of one scale of the grid (0 sizes: the whole set).

    Example
    -------
    >>> SCALES["paper"].model, SCALES["paper"].epochs
    ('resnet110', 50)
    """

    name: str
    model: str
    epochs: int
    train_size: int = 0
    test_size: int = 0

    def datasets(self, data_root: str | None) -> tuple[str, ...]:
        """The datasets this scale runs on when none is named."""
        if self.name == "paper" and data_root:
            return ("cifar10", "cifar100")
        return ("fashion-mnist",)


SCALES: dict[str, Scale] = {
    "paper": Scale("paper", "resnet110", 50),
    # Chosen from a measured cell (docs/results/report.md, "Scale"): 18 cells in ~45 min on 2 cores.
    "small": Scale("small", "resnet20", 4, train_size=3840, test_size=1000),
}


def grid_configs(
    scale: Scale,
    *,
    datasets: Sequence[str] | None = None,
    data_root: str | None = None,
    algorithms: Sequence[str] = ALGORITHMS,
    cuts: Sequence[str] = CUTS,
    clients: Sequence[int] = CLIENTS,
    epochs: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    link: str = "",
    hand_over_optimizer: bool = False,
) -> list[ExperimentConfig]:
    """Every cell's validated config, in run order (dataset, N, cut, algorithm: the two
    algorithms of a cell pair run back to back, so a partial grid still pairs up).
    ``hand_over_optimizer``: the client optimizer's state travels from client to client
    with the segment, as in the paper's single-process code."""
    problems = []
    for label, given, allowed in (("algorithm", algorithms, ALGORITHMS), ("cut", cuts, CUTS)):
        problems += [f"{label} must be one of {list(allowed)}, got {g!r}" for g in given if g not in allowed]
    if not algorithms or not cuts or not clients:
        problems.append("algorithms, cuts and clients must each name at least one value")
    if problems:
        raise ConfigError("invalid grid:\n  - " + "\n  - ".join(problems))
    configs = []
    for dataset in datasets or scale.datasets(data_root):
        for n in clients:
            for cut in cuts:
                for algorithm in algorithms:
                    config = ExperimentConfig(
                        algorithm=algorithm,
                        dataset=dataset,
                        data_root=data_root if dataset != "synthetic" else None,
                        model=scale.model,
                        cut=cut,
                        clients=n,
                        rounds=scale.epochs if epochs is None else epochs,
                        train_size=scale.train_size if train_size is None else train_size,
                        test_size=scale.test_size if test_size is None else test_size,
                        device=device,
                        seed=seed,
                        link=link,
                        hand_over_optimizer=hand_over_optimizer,
                        **PAPER_HYPERPARAMETERS,
                    )
                    configs.append(config.validate())
    return configs


def cell_filename(config: ExperimentConfig) -> str:
    """``<dataset>-<algorithm>-<cut>-n<N>.json``."""
    return f"{config.dataset}-{config.algorithm}-{config.cut}-n{config.clients}.json"


@dataclass(frozen=True)
class CellOutcome:
    """What happened to one cell: ``ran``, ``skipped`` (already done) or ``failed``."""

    config: ExperimentConfig
    path: Path
    status: str
    seconds: float = 0.0
    error: str = ""


def _finished(path: Path, config: ExperimentConfig) -> bool:
    """Whether ``path`` holds this cell's results; raise if it holds another configuration's."""
    if not path.is_file():
        return False
    try:
        existing = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False  # unreadable: run the cell again (results are written atomically)
    if not isinstance(existing, dict) or not isinstance(existing.get("config"), dict):
        raise ConfigError(
            f"{path} is not a splitflower results file (expected a JSON object with a 'config' object); "
            "choose another --out directory or delete the file"
        )
    differing = differing_fields(existing["config"], config, ignore=inert_fields(config))
    if differing:
        raise ConfigError(
            f"{path} holds results of a different configuration (differs in {differing}); "
            "choose another --out directory or delete the file"
        )
    return bool(existing.get("rounds"))


def _run_cell(config: ExperimentConfig, path: str, extra: dict[str, Any]) -> None:
    """Child-process entry point: run one cell (on from the weights an unfinished run of it
    saved, if any), saving its weights after every round, and write its results file."""
    configure_logging(verbose=False)
    model = Path(path).with_suffix(".pt")
    saved = _saved_cell(model, config)
    if saved is not None and saved.rounds == config.rounds:  # stopped after its last save, before its results
        results = results_document(config, list(saved.history), 0.0, resumed_from=saved.resumed_from(config))
    else:
        # A cell whose simulation stalls or fails ends its process at once, so the grid can retry it.
        write = ModelWriter(model, resumed=saved)
        results = run_experiment_owning_the_process(
            config,
            say=_say_in_cell,
            keep_model=partial(_save_cell_model, write),
            checkpoint=write,  # a failed write is logged, the cell goes on
            resume=saved,
        )
    results["reproduce"] = extra
    write_results(results, path)


def _say_in_cell(line: str) -> None:
    print(f"    {line}", flush=True)


def _save_cell_model(write: ModelWriter, config: ExperimentConfig, result: SplitResult) -> None:
    try:
        write(config, result)
    except ResultsFileError as err:  # its results are written all the same
        print(f"    warning: the weights after round {result.last_round} are not kept: {err}", flush=True)


def _saved_cell(path: Path, config: ExperimentConfig) -> SavedModel | None:
    """The weights an unfinished run of this cell saved after a round (None: none); refuses
    another configuration's."""
    if not path.is_file():
        return None
    saved = load_model(path)
    # Every field but the rounds: a cell's results must come from one setting (link, test size, ...).
    if saved.rounds > config.rounds or differing_fields(saved.config, config, ignore={"rounds", *inert_fields(config)}):
        raise ConfigError(
            f"{path} holds the weights of a different configuration (after round {saved.rounds}); "
            "choose another --out directory or delete the file"
        )
    return saved


def run_cell_process(config: ExperimentConfig, path: str, extra: dict[str, Any], timeout: float | None) -> None:
    """Run one cell in a fresh process. Raises :class:`SimulationStartError` when its
    simulation did not start (worth another try), :class:`CellFailedError` otherwise."""
    process = multiprocessing.get_context("spawn").Process(
        target=_run_cell, args=(config, path, extra), name="splitflower-cell"
    )
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise CellFailedError(f"the cell did not finish within {timeout:.0f}s and was stopped")
    if process.exitcode == STALLED_EXIT_CODE:
        raise SimulationStartError(f"the cell's simulation did not start (exit code {STALLED_EXIT_CODE}; output above)")
    if process.exitcode != 0:
        raise CellFailedError(f"the cell's process exited with code {process.exitcode} (its output is above)")


def run_grid(
    configs: Sequence[ExperimentConfig],
    out_dir: str | Path,
    *,
    grid: str = "dsl-paper",
    scale: str = "",
    say: Callable[[str], None] = print,
    runner: Callable[[ExperimentConfig, str, dict[str, Any]], None] | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    cell_timeout: float | None = None,
) -> list[CellOutcome]:
    """Run every cell not yet finished in ``out_dir``, each in a fresh process.

    ``runner`` replaces the child process (tests). A cell whose simulation did not start
    (:class:`SimulationStartError`: Ray's local node can miss its start-up window) is tried
    ``attempts`` times in all; any other failure is not tried again.
    A failed cell is reported and the grid goes on; the outcomes say which failed.
    ``cell_timeout`` (seconds) stops a cell's process that runs longer.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot use {str(out)!r} as the grid's folder (--out): {err.strerror or err}") from err
    commit = source_commit()
    outcomes: list[CellOutcome] = []
    started = time.perf_counter()
    ran_seconds: list[float] = []
    # Checked before any cell runs: a folder holding another configuration's file is refused
    # at once, not after hours of the cells before it.
    finished = [_finished(out / cell_filename(config), config) for config in configs]
    for number, config in enumerate(configs, 1):
        path = out / cell_filename(config)
        label = (
            f"cell {number}/{len(configs)} {config.algorithm} cut {config.cut} N={config.clients} ({config.dataset})"
        )
        if finished[number - 1]:
            say(f"{label}: done already ({path.name}), skipped")
            outcomes.append(CellOutcome(config, path, "skipped"))
            continue
        remaining = sum(1 for c in configs[number - 1 :] if not (out / cell_filename(c)).is_file())
        eta = f", about {sum(ran_seconds) / len(ran_seconds) * remaining / 60:.0f} min left" if ran_seconds else ""
        say(f"{label}: running ({time.perf_counter() - started:.0f}s into the grid{eta})")
        extra = {"grid": grid, "scale": scale, "commit": commit, "cell": number, "cells": len(configs)}
        run = runner or partial(run_cell_process, timeout=cell_timeout)
        cell_started = time.perf_counter()
        error = _run_with_attempts(run, config, path, extra, attempts, say, label)
        outcome = _cell_outcome(config, path, time.perf_counter() - cell_started, error)
        if outcome.status == "ran":
            ran_seconds.append(outcome.seconds)
            accuracy = json.loads(path.read_text()).get("final", {}).get("test_accuracy", float("nan"))
            say(f"{label}: finished in {outcome.seconds:.0f}s, test accuracy {accuracy:.4f} -> {path}")
        else:
            say(f"{label}: FAILED after {outcome.seconds:.0f}s: {outcome.error}")
        outcomes.append(outcome)
    failed = [o for o in outcomes if o.status == "failed"]
    say(
        f"grid: {sum(o.status == 'ran' for o in outcomes)} ran, {sum(o.status == 'skipped' for o in outcomes)} "
        f"skipped, {len(failed)} failed, {time.perf_counter() - started:.0f}s"
    )
    return outcomes


def _run_with_attempts(
    run: Callable[[ExperimentConfig, str, dict[str, Any]], None],
    config: ExperimentConfig,
    path: Path,
    extra: dict[str, Any],
    attempts: int,
    say: Callable[[str], None],
    label: str,
) -> str:
    """Run a cell, again while its simulation does not start, ``attempts`` times at most;
    the last attempt's error ("" where it ran)."""
    error = ""
    for attempt in range(1, max(attempts, 1) + 1):
        error, retryable = "", False
        try:
            run(config, str(path), extra)
        except SimulationStartError as err:
            error, retryable = f"{type(err).__name__}: {err}", True
        except Exception as err:  # noqa: BLE001 - one cell's failure is reported, the grid goes on
            error = f"{type(err).__name__}: {err}"
        if not retryable or attempt == attempts:
            break
        say(f"{label}: attempt {attempt} did not start ({error}); trying again")
    return error


def _cell_outcome(config: ExperimentConfig, path: Path, seconds: float, error: str) -> CellOutcome:
    """A cell ran when it raised nothing and wrote its results file."""
    if error or not path.is_file():
        return CellOutcome(config, path, "failed", seconds, error or f"no results file {path} was written")
    return CellOutcome(config, path, "ran", seconds)


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _numbers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError as err:
        raise ConfigError(f"--clients must be comma-separated integers such as 1,5,10, got {text!r}") from err


def add_reproduce_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``reproduce`` to the CLI's subcommands (``commands`` from ``add_subparsers``) and
    return its parser."""
    parser = commands.add_parser("reproduce", help="run a paper's grid of experiments, one results file per cell")
    parser.add_argument("grid", choices=GRIDS)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small", help="default: small")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default results/<grid>-<scale>)")
    parser.add_argument("--data-root", default=None, help="directory holding CIFAR-10/100 (paper scale)")
    parser.add_argument("--datasets", default="", help="comma list; default: the scale's own")
    parser.add_argument(
        "--algorithms", default=",".join(ALGORITHMS), help=f"comma list (default: {','.join(ALGORITHMS)})"
    )
    parser.add_argument("--cuts", default=",".join(CUTS), help=f"comma list of cut points (default: {','.join(CUTS)})")
    parser.add_argument(
        "--clients", default=",".join(map(str, CLIENTS)), help=f"comma list (default: {','.join(map(str, CLIENTS))})"
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the scale's own")
    parser.add_argument("--train-size", type=int, default=None, help="default: the scale's own (0: all)")
    parser.add_argument("--test-size", type=int, default=None, help="default: the scale's own (0: all)")
    parser.add_argument("--device", default="cpu", help="e.g. cuda for the paper scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of every cell (default: 0)")
    parser.add_argument("--link", default="", help="emulated client link UP/DOWN/RTT, e.g. 10mbit/50mbit/20ms")
    parser.add_argument(
        "--hand-over-optimizer",
        action="store_true",
        help="hand the client optimizer's state on with the segment, as the paper's code does",
    )
    parser.add_argument("--cell-timeout", type=float, default=None, help="stop a cell that runs longer (seconds)")
    parser.add_argument("--report-only", action="store_true", help="only build the plots and report from the files")
    parser.add_argument("--no-report", action="store_true", help="do not build the plots and report at the end")
    return parser


def reproduce_main(args: Any) -> int:
    """Run ``splitflower reproduce`` with parsed ``args``; 0 when every cell is done."""
    from splitflower.paper_report import build_report, load_cells

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or Path("results") / f"{args.grid}-{args.scale}"
    outcomes: list[CellOutcome] = []
    if not args.report_only:
        configs = grid_configs(
            SCALES[args.scale],
            datasets=_names(args.datasets) or None,
            data_root=args.data_root,
            algorithms=_names(args.algorithms),
            cuts=_names(args.cuts),
            clients=_numbers(args.clients),
            epochs=args.epochs,
            train_size=args.train_size,
            test_size=args.test_size,
            device=args.device,
            seed=args.seed,
            link=args.link,
            hand_over_optimizer=args.hand_over_optimizer,
        )
        outcomes = run_grid(
            configs,
            out,
            grid=args.grid,
            scale=args.scale,
            say=lambda s: print(s, flush=True),
            attempts=args.attempts,
            cell_timeout=args.cell_timeout,
        )
    if args.report_only and not load_cells(out):
        raise ConfigError(
            f"{out} holds no results files of a grid to report on; run the grid first (without --report-only)"
        )
    if not args.no_report:
        for path in build_report(out):
            print(f"written: {path}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0
