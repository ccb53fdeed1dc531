"""SplitFed v2: one shared server model serving the round's clients in turn."""

from __future__ import annotations

from splitflower.strategies.sequential import SequentialStrategy

__all__ = ["SplitFedV2Strategy"]


class SplitFedV2Strategy(SequentialStrategy):
    """Clients train one after another on one shared server model, each starting from the
    round's global client weights (nothing is handed on); the client segments are then
    averaged by FedAvg. The server model therefore sees the clients in turn, as in Thapa
    et al.'s SplitFed v2.

    Example
    -------
    >>> SplitFedV2Strategy().hands_on, SplitFedV2Strategy().num_server_models(4)
    (False, 1)
    """

    hands_on = False
