"""What the dsl_vs_csl ServerApp keeps of a run: the results JSON (run config out), the
rounds so far while it runs and a failed run's rounds (OUT.partial.json: what a killed run
leaves), and with model-out the weights after each round (resume-from trains on from them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context

from dsl_vs_csl.task import experiment_config, load_experiment
from splitflower.checkpoint import ModelWriter, SavedModel, check_resumable, load_model
from splitflower.experiment import Experiment, ExperimentConfig
from splitflower.results import (
    OncePerRound,
    ProgressWriter,
    partial_results_path,
    results_document,
    summarise_round,
    write_results,
)
from splitflower.simulation import progress_document, stopped_early
from splitflower.strategy import SplitResult

# WARNING level: under `flwr run` only Flower's own logger shows INFO; progress must be seen.
logger = logging.getLogger("dsl_vs_csl")
DEFAULT_OUT = "dsl_vs_csl-results.json"


@dataclass
class _Run:
    """What the ServerApp keeps of one run while it goes (a process may serve run after run)."""

    out: str
    resumed: SavedModel | None  # the weights it trains on from (run config resume-from)
    started: float = field(default_factory=time.perf_counter)
    model_writer: ModelWriter | None = None  # one per run: each round summarised once
    progress: ProgressWriter | None = None
    # Each round summarised once, and the same entry each time: the progress writer then
    # encodes it once, so a round costs what it adds, not what the run holds.
    summaries: OncePerRound[Mapping[str, Any], dict[str, Any]] = field(
        default_factory=lambda: OncePerRound(summarise_round)
    )


_runs: dict[int, _Run] = {}


def experiment(context: Context) -> Experiment:
    return load_experiment(experiment_config(context.run_config))


def run_of(context: Context) -> _Run:
    """The run's state (its resume-from loaded and checked the first time)."""
    if context.run_id not in _runs:
        resume_from = str(context.run_config.get("resume-from", ""))
        resumed = load_model(resume_from) if resume_from else None
        if resumed is not None:  # checked against the run's config before anything trains
            check_resumable(experiment(context), resumed)
        _runs[context.run_id] = _Run(str(context.run_config.get("out", DEFAULT_OUT)), resumed)
    return _runs[context.run_id]


def start_run(context: Context) -> _Run:
    """The run's state, made afresh (the run starts now)."""
    _runs.pop(context.run_id, None)
    return run_of(context)


def resumed(context: Context) -> SavedModel | None:
    return run_of(context).resumed


_Parts = tuple[ExperimentConfig, list[dict[str, Any]], float, dict[str, Any]]


def _so_far(context: Context, records: dict[int, dict[str, Any]]) -> _Parts:
    """A results document's parts for the recorded rounds: config, entries, seconds, extras."""
    run, config = run_of(context), experiment(context).config
    rounds = run.summaries.each(records)
    rounds = run.resumed.carry_on(rounds) if run.resumed else rounds
    runtime = {"flower_run_id": context.run_id, "app": "examples/dsl_vs_csl"}
    extra = {"runtime": runtime} | ({"resumed_from": run.resumed.resumed_from(config)} if run.resumed else {})
    return config, rounds, time.perf_counter() - run.started, extra


def after_round(context: Context, result: SplitResult) -> None:
    """The weights resume-from reads (model-out), then the rounds so far."""
    run = run_of(context)
    if path := context.run_config.get("model-out"):
        run.model_writer = run.model_writer or ModelWriter(str(path), resumed=run.resumed)
        run.model_writer(experiment(context).config, result)
    if result.last_round < experiment(context).config.rounds:  # after the last, the results file
        config, rounds, wall_s, extra = _so_far(context, result.rounds)
        run.progress = run.progress or ProgressWriter(partial_results_path(run.out))
        run.progress(progress_document(config, rounds, wall_s, **extra))


def write_results_file(context: Context, result: SplitResult) -> None:
    config, rounds, wall_s, extra = _so_far(context, result.rounds)
    out = write_results(results_document(config, rounds, wall_s, **extra), run_of(context).out)
    logger.warning("[server] results written to %s", out.resolve())
    if (run := _runs.pop(context.run_id)).progress is not None:  # the whole run is written
        Path(run.progress.path).unlink(missing_ok=True)


def write_partial(context: Context, records: dict[int, dict[str, Any]], error: BaseException) -> None:
    """A run that failed keeps the rounds it recorded, beside (never in) its results file."""
    config, rounds, wall_s, extra = _so_far(context, records)
    partial = stopped_early(config, rounds, wall_s, error, **extra).partial_results or {}
    out = write_results(partial, partial_results_path(run_of(context).out))
    logger.warning("[server] the run failed; its %d recorded round(s) written to %s", len(records), out.resolve())
    _runs.pop(context.run_id, None)
