"""Conventional split learning (CSL): the gradient of the cut activations flows back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitflower.client import Client
from splitflower.errors import ConfigError
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
            raise ConfigError(f"window must be at least 1, got {self.window}")


class CSLClient(Client):
    """Forward the segment, let the server do the rest, backpropagate its dL/dz (with
    ``window`` > 1, as futures that :meth:`Client.step` settles ``window`` at a time).

    Example
    -------
    >>> from torch import nn
    >>> from splitflower.data import synthetic
    >>> client = CSLClient(nn.Flatten(), synthetic(8, 8, input_shape=(1, 2, 2))[0], options=CSLOptions(window=4))
    >>> client.options.window
    4
    """

    Options = CSLOptions

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        z = self.segment(x)
        forward_backward = self.server_model_proxy.forward_backward
        call = forward_backward if self.options.window == 1 else forward_backward.future
        self.step(z, call(embeddings=z, labels=y), window=self.options.window)
        return {}


class CSLServerModel(SupervisedServerModel):
    """Forward, loss, backward and step on the server; return dL/dz to the client.

    Example
    -------
    >>> server = CSLServerModel(torch.nn.Linear(3, 2))
    >>> server.configure_fit(None, {"lr": 0.5})
    >>> grad = server.forward_backward(embeddings=torch.zeros(5, 3), labels=torch.zeros(5, dtype=torch.int64))
    >>> server.num_examples, grad.dtype
    (5, torch.float32)
    """

    @remote(embeddings=EMBEDDINGS, labels=LABELS)
    def forward_backward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        embeddings = embeddings.detach().requires_grad_()
        self.train_on(embeddings, labels)
        return embeddings.grad
