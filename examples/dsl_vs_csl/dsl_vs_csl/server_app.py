"""dsl_vs_csl ServerApp: runs the strategy, evaluates centrally, writes the results JSON
(and, with run config model-out, the weights after each round; resume-from trains on from them)."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Context

from dsl_vs_csl.task import experiment_config, load_experiment
from splitflower.app import build_server_app
from splitflower.checkpoint import ModelWriter, SavedModel, check_resumable, load_model
from splitflower.experiment import Experiment
from splitflower.results import (
    check_results_path,
    partial_results_path,
    results_document,
    summarise_rounds,
    write_results,
)
from splitflower.simulation import stopped_early
from splitflower.strategy import SplitResult, SplitStrategy

# WARNING level: under `flwr run` only Flower's own logger shows INFO; progress must be seen.
logger = logging.getLogger("dsl_vs_csl")
_started: dict[int, float] = {}  # run id -> perf_counter at start
_writers: dict[int, ModelWriter] = {}  # run id -> what writes its model-out
_resumes: dict[int, SavedModel] = {}  # run id -> the weights it trains on from
DEFAULT_OUT = "dsl_vs_csl-results.json"


def _experiment(context: Context) -> Experiment:
    return load_experiment(experiment_config(context.run_config))


def _resumed(context: Context) -> SavedModel | None:
    """The weights run config resume-from names (checked against the run's config), if any."""
    if not context.run_config.get("resume-from"):
        return None
    if context.run_id not in _resumes:
        _resumes[context.run_id] = load_model(str(context.run_config["resume-from"]))
        check_resumable(_experiment(context), _resumes[context.run_id])
    return _resumes[context.run_id]


def _strategy(context: Context) -> SplitStrategy:
    _started[context.run_id] = time.perf_counter()
    check_results_path(str(context.run_config.get("out", DEFAULT_OUT)))  # before training, not after
    if context.run_config.get("model-out"):
        check_results_path(str(context.run_config["model-out"]), what="the model")
    c = _experiment(context).config
    logger.warning("[server] %s / %s, %s, %s cut %s, %d clients, %d rounds",
                   c.algorithm, c.strategy, c.dataset, c.model, c.cut, c.clients, c.rounds)  # fmt: skip
    return _experiment(context).make_strategy(s.strategy_state if (s := _resumed(context)) else None)


def _on_round(server_round: int, record: dict[str, Any]) -> None:
    accuracy = record.get("evaluation", {}).get("test_accuracy", float("nan"))
    logger.warning("[server] round %d: test accuracy %.4f, %.1fs", server_round, accuracy, record["seconds"])


def _document(context: Context, records: dict[int, dict[str, Any]], error: BaseException | None) -> dict[str, Any]:
    """The results document of the recorded rounds (marked incomplete when ``error`` stopped the run)."""
    saved = _resumed(context)
    rounds = saved.carry_on(summarise_rounds(records)) if saved else summarise_rounds(records)
    wall_s = time.perf_counter() - _started.get(context.run_id, time.perf_counter())
    config, runtime = _experiment(context).config, {"flower_run_id": context.run_id, "app": "examples/dsl_vs_csl"}
    extra = {"runtime": runtime} | ({"resumed_from": saved.resumed_from(config)} if saved else {})
    if error is None:
        return results_document(config, rounds, wall_s, **extra)
    return stopped_early(config, rounds, wall_s, error, **extra).partial_results or {}


def _write_results(context: Context, result: SplitResult) -> None:
    out = write_results(_document(context, result.rounds, None), str(context.run_config.get("out", DEFAULT_OUT)))
    logger.warning("[server] results written to %s", out.resolve())
    _forget(context.run_id)


def _forget(run_id: int) -> None:  # the run is over: a process serving run after run keeps nothing of it
    for per_run in (_started, _writers, _resumes):
        per_run.pop(run_id, None)


def _save_model(context: Context, result: SplitResult) -> None:  # after each round: what resume-from reads
    if path := context.run_config.get("model-out"):
        if context.run_id not in _writers:  # one per run: each round summarised once
            _writers[context.run_id] = ModelWriter(str(path), resumed=_resumed(context))
        _writers[context.run_id](_experiment(context).config, result)


def _write_partial(context: Context, records: dict[int, dict[str, Any]], error: BaseException) -> None:
    """A run that failed keeps the rounds it recorded, beside (never in) its results file."""
    out = partial_results_path(str(context.run_config.get("out", DEFAULT_OUT)))
    write_results(_document(context, records, error), out)
    logger.warning("[server] the run failed; its %d recorded round(s) written to %s", len(records), out.resolve())
    _forget(context.run_id)


app = build_server_app(
    _strategy,
    lambda ctx: _experiment(ctx).make_server_model(),
    initial_client_weights=lambda ctx: s.client if (s := _resumed(ctx)) else _experiment(ctx).initial_client_weights(),
    initial_server_weights=lambda ctx: s.server if (s := _resumed(ctx)) else None,
    first_round=lambda ctx: s.first_round if (s := _resumed(ctx)) else 1,
    train_config=lambda ctx: _experiment(ctx).train_config(),
    central_evaluate=lambda ctx: _experiment(ctx).evaluate,
    on_result=_write_results,
    on_round=_on_round,
    on_stopped=_write_partial,
    checkpoint=_save_model,
)
