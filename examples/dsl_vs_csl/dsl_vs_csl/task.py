"""Run config + node config -> splitflower ExperimentConfig, and the cached Experiment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context

from splitflower.app import NUM_SERVER_ROUNDS_KEY
from splitflower.errors import ConfigError
from splitflower.experiment import Experiment, ExperimentConfig, cached_experiment
from splitflower.options import split_option_string

# run-config key (as in pyproject.toml) -> ExperimentConfig field
_FIELDS = {
    "algorithm": "algorithm",
    "strategy": "strategy",
    "dataset": "dataset",
    "data-root": "data_root",
    "model": "model",
    "cut": "cut",
    NUM_SERVER_ROUNDS_KEY: "rounds",
    "num-clients": "clients",
    "local-epochs": "local_epochs",
    "batch-size": "batch_size",
    "lr": "lr",
    "momentum": "momentum",
    "weight-decay": "weight_decay",
    "seed": "seed",
    "partition": "partition",
    "batching": "batching",
    "flush-timeout": "flush_timeout",
    "request-order": "request_order",
    "synthetic-size": "synthetic_size",
    "hand-over-optimizer": "hand_over_optimizer",
}
_FLOATS = {"lr", "momentum", "weight_decay", "flush_timeout"}


def experiment_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The experiment the run config describes; raises ConfigError naming every bad key.

    The run config's ``num-clients`` is the number of clients the data is split between; on a
    client, ``node_config``'s ``num-partitions`` must equal it.
    """
    values: dict[str, Any] = {"clients": 2}
    for key, name in _FIELDS.items():
        if key in run_config:
            value = run_config[key]
            # TOML writes 1 for 1.0; ExperimentConfig checks every type and range itself.
            values[name] = float(value) if name in _FLOATS and type(value) is int else value
    problems = []
    if not isinstance(run_config.get("out", "x"), str) or not run_config.get("out", "x"):
        problems.append(f"run config 'out' must be a non-empty path, got {run_config.get('out')!r}")
    for key in ("model-out", "resume-from"):
        if not isinstance(run_config.get(key, ""), str):
            problems.append(f'run config {key!r} must be a path or "", got {run_config[key]!r}')
    if node_config is not None:
        count = node_config.get("num-partitions")
        if type(count) is not int or count < 1:
            problems.append(f"node config 'num-partitions' must be a positive int, got {count!r}")
        elif count != values["clients"]:
            problems.append(
                f"node config 'num-partitions' is {count} but run config 'num-clients' is {values['clients']}; "
                "they must be equal (in simulation num-partitions is num-supernodes)"
            )
    if isinstance(values.get("cut"), bool):
        problems.append(f"run config 'cut' must be s, m, d or a number of blocks, got {values['cut']!r}")
    values["cut"] = str(values.get("cut", "s"))
    options = run_config.get("options", "")
    if isinstance(options, str):
        values["options"] = split_option_string(options)
    else:
        problems.append(f"run config 'options' must be a string like \"window=4,lam=0.5\", got {options!r}")
    for optional in ("strategy", "data_root"):  # "" means: use the default
        values[optional] = values.get(optional) or None
    try:
        config = ExperimentConfig(**values).validate()
    except ConfigError as err:
        found = str(err).removeprefix("invalid experiment config:\n  - ").split("\n  - ")
        problems += [_by_run_config_key(problem) for problem in found]
    if problems:
        raise ConfigError("invalid dsl_vs_csl configuration:\n  - " + "\n  - ".join(problems))
    return config


def _by_run_config_key(problem: str) -> str:
    """Name the run-config key (num-server-rounds) where the message names the field (rounds)."""
    field, _, rest = problem.partition(" ")
    keys = [key for key, name in _FIELDS.items() if name == field]
    return f"run config '{keys[0]}' {rest}" if keys and rest else problem


def partition_id(context: Context) -> int:
    """This SuperNode's partition, checked against ``num-partitions``."""
    pid, count = context.node_config.get("partition-id"), context.node_config.get("num-partitions")
    if type(pid) is not int or type(count) is not int or not 0 <= pid < count:
        raise ConfigError(
            f"node config needs 0 <= partition-id < num-partitions, got partition-id={pid!r} num-partitions={count!r}; "
            'start each SuperNode with --node-config "partition-id=I num-partitions=N"'
        )
    return pid


def load_experiment(config: ExperimentConfig) -> Experiment:
    """Data and split model, built once per process (simulation actors serve many nodes)."""
    return cached_experiment(config)
