"""FedSL, local-loss split learning (Han et al., 2021): the tutorial's subject.

Each client trains its segment with a small auxiliary head on a local loss and streams
the cut activations to the server, which trains its part on the true loss; nothing comes
back per batch. The strategy averages the client segments (and heads) every round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitflower.client import Client
from splitflower.server_model import remote
from splitflower.supervised import EMBEDDINGS, LABELS, SupervisedServerModel, linear_head

__all__ = ["FedSLClient", "FedSLServerModel"]


class FedSLClient(Client):
    """Adds an auxiliary head, steps on its local loss, streams the activations.

    Example
    -------
    >>> from splitflower.data import synthetic
    >>> data = synthetic(8, 8, num_classes=3, input_shape=(1, 4, 4))[0]
    >>> client = FedSLClient(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), data)
    >>> sorted(client.model)
    ['aux_head', 'segment']
    """

    def __init__(self, segment: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(segment, *args, **kwargs)
        self.add_part("aux_head", linear_head(self.cut_shape, self.train_data.num_classes))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        z = self.segment(x)
        self.server_model_proxy.train_batch.send(embeddings=z, labels=y)
        loss = self.loss_fn(self.model["aux_head"](z), y)
        self.step(loss)
        return {"aux_loss": loss.item()}


class FedSLServerModel(SupervisedServerModel):
    """Trains on the activations it receives; replies with nothing.

    Example
    -------
    >>> server = FedSLServerModel(nn.Linear(4, 3))
    >>> server.configure_fit(None, {"lr": 0.1})
    >>> server.train_batch(embeddings=torch.ones(2, 4), labels=torch.tensor([0, 2]))
    >>> server.num_examples
    2
    """

    @remote(embeddings=EMBEDDINGS, labels=LABELS)
    def train_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        self.train_on(embeddings, labels)
