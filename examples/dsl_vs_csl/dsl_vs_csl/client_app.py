"""dsl_vs_csl ClientApp: one split-learning client per SuperNode partition."""

from __future__ import annotations

import torch
from flwr.app import Context

from dsl_vs_csl.task import experiment_config, load_experiment, partition_id
from splitflower.app import build_client_app
from splitflower.client import Client
from splitflower.experiment import threads_per_client


def make_client(context: Context) -> Client:
    """The client for this SuperNode's partition; per-client state lives in context.state."""
    config = experiment_config(context.run_config, context.node_config)
    torch.set_num_threads(threads_per_client(config))
    return load_experiment(config).make_client(partition_id(context))


app = build_client_app(make_client)
