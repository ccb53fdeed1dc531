"""Conventional split learning (CSL): the gradient of the cut activations flows back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from splitflower.client import Client
from splitflower.proxy import ProxyFuture
from splitflower.server_model import remote
from splitflower.supervised import EMBEDDINGS, LABELS, SupervisedServerModel

__all__ = ["CSLClient", "CSLOptions", "CSLServerModel"]


@dataclass(frozen=True)
class CSLOptions:
    """``window``: batches in flight. 1 (default) waits for each gradient; k > 1 forwards k
    batches with the same weights, holding their activations until all k gradients are
    back, then backpropagates them together and steps once."""

    window: int = 1

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")


class CSLClient(Client):
    """Forward the segment, let the server do the rest, backpropagate its dL/dz."""

    Options = CSLOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight: list[tuple[torch.Tensor, ProxyFuture]] = []

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        z = self.segment(x)
        if self.options.window == 1:
            self.step(z, self.server_model_proxy.forward_backward(embeddings=z, labels=y))
            return {}
        self._in_flight.append((z, self.server_model_proxy.forward_backward.future(embeddings=z, labels=y)))
        return self.end_round() if len(self._in_flight) == self.options.window else {}

    def end_round(self) -> dict[str, float]:
        pending, self._in_flight = self._in_flight, []
        if pending:
            self.step([z for z, _ in pending], [grad.result() for _, grad in pending])
        return {}


class CSLServerModel(SupervisedServerModel):
    """Forward, loss, backward and step on the server; return dL/dz to the client."""

    @remote(embeddings=EMBEDDINGS, labels=LABELS)
    def forward_backward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        embeddings = embeddings.detach().requires_grad_()
        self.train_on(embeddings, labels)
        return embeddings.grad
