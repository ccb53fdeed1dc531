"""StreamSL: a frozen (e.g. pretrained) client segment streams embeddings; the server trains.

The client never backpropagates: it runs its segment in eval mode without autograd and
sends each batch's embeddings and labels fire-and-forget. The server model is FedSL's: it
trains on what arrives and replies with nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitflower.algorithms.fedsl import FedSLServerModel
from splitflower.client import Client

__all__ = ["StreamSLClient", "StreamSLServerModel"]


class StreamSLClient(Client):
    """Freezes the segment it is given (no optimizer is built) and only streams.

    Example
    -------
    >>> from splitflower.data import synthetic
    >>> data = synthetic(8, 8, input_shape=(1, 4, 4))[0]
    >>> client = StreamSLClient(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), data)
    >>> any(p.requires_grad for p in client.segment.parameters())
    False
    """

    def __init__(self, segment: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(segment.requires_grad_(False), *args, **kwargs)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            z = self.segment.eval()(x)
        self.server_model_proxy.train_batch.send(embeddings=z, labels=y)
        return {}


class StreamSLServerModel(FedSLServerModel):
    """Trains the server segment on the streamed embeddings (FedSL's ``train_batch``).

    Example
    -------
    >>> server = StreamSLServerModel(nn.Linear(4, 3))
    >>> server.configure_fit(None, {"lr": 0.1})
    >>> server.train_batch(embeddings=torch.ones(2, 4), labels=torch.tensor([0, 2]))
    >>> server.num_examples
    2
    """
