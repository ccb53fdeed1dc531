"""SplitFed v1: one server model per client, both sides averaged every round."""

from __future__ import annotations

from splitflower.strategy import SplitStrategy

__all__ = ["SplitFedV1Strategy"]


class SplitFedV1Strategy(SplitStrategy):
    """Every sampled client trains at once against a server model of its own.

    Each server model starts the round from the global server weights; at the end of the
    round the server models are averaged by the examples each trained on, and the client
    segments by FedAvg, as in Thapa et al.'s SplitFed v1.

    Example
    -------
    >>> strategy = SplitFedV1Strategy()
    >>> strategy.num_server_models(3), [strategy.assign(i, 3) for i in range(3)]
    (3, [0, 1, 2])
    """

    def num_server_models(self, num_clients: int) -> int:
        return num_clients

    def assign(self, index: int, num_clients: int) -> int:
        return index
