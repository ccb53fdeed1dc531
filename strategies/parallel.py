"""Parallel split learning: every sampled client at once, one shared server model."""

from __future__ import annotations

from splitflower.strategy import SplitStrategy

__all__ = ["ParallelStrategy"]


class ParallelStrategy(SplitStrategy):
    """All sampled clients train at once against one shared server model.

    Client segments are averaged by examples at the end of each round (FedAvg). With
    ``batching=True`` the server concatenates the pending requests of the active clients
    into one batch (flushing after ``flush_timeout`` seconds at the latest).

    Example
    -------
    >>> strategy = ParallelStrategy(batching=True, flush_timeout=0.05)
    >>> strategy.num_server_models(3)
    1
    """
