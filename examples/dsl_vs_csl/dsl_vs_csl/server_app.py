"""dsl_vs_csl ServerApp: runs the strategy, evaluates centrally, and keeps the run's files
(run_files.py: the results JSON, the rounds so far, the weights after each round)."""

from __future__ import annotations

from typing import Any

from flwr.app import Context

from dsl_vs_csl.run_files import after_round, experiment, logger, resumed, start_run, write_partial, write_results_file
from splitflower.app import build_server_app
from splitflower.results import check_results_path
from splitflower.strategy import SplitStrategy


def _strategy(context: Context) -> SplitStrategy:
    check_results_path(start_run(context).out)  # before training, not after
    if context.run_config.get("model-out"):
        check_results_path(str(context.run_config["model-out"]), what="the model")
    c = experiment(context).config
    logger.warning("[server] %s / %s, %s, %s cut %s, %d clients, %d rounds",
                   c.algorithm, c.strategy, c.dataset, c.model, c.cut, c.clients, c.rounds)  # fmt: skip
    return experiment(context).make_strategy(s.strategy_state if (s := resumed(context)) else None)


def _on_round(server_round: int, record: dict[str, Any]) -> None:
    accuracy = record.get("evaluation", {}).get("test_accuracy", float("nan"))
    logger.warning("[server] round %d: test accuracy %.4f, %.1fs", server_round, accuracy, record["seconds"])


app = build_server_app(
    _strategy,
    lambda ctx: experiment(ctx).make_server_model(),
    initial_client_weights=lambda ctx: s.client if (s := resumed(ctx)) else experiment(ctx).initial_client_weights(),
    initial_server_weights=lambda ctx: s.server if (s := resumed(ctx)) else None,
    first_round=lambda ctx: s.first_round if (s := resumed(ctx)) else 1,
    train_config=lambda ctx: experiment(ctx).train_config(),
    central_evaluate=lambda ctx: experiment(ctx).evaluate,
    on_result=write_results_file,
    on_round=_on_round,
    on_stopped=write_partial,
    checkpoint=after_round,
)
