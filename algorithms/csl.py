"""Conventional split learning (CSL): the gradient of the cut activations flows back."""

from __future__ import annotations

import torch

from splitflower.client import Client
from splitflower.server_model import remote
from splitflower.supervised import EMBEDDINGS, LABELS, SupervisedServerModel

__all__ = ["CSLClient", "CSLServerModel"]


class CSLClient(Client):
    """Forward the segment, let the server do the rest, backpropagate its dL/dz."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        z = self.segment(x)
        grad = self.server_model_proxy.forward_backward(embeddings=z, labels=y)
        self.optimizer.zero_grad()
        z.backward(grad)
        self.optimizer.step()
        return {}


class CSLServerModel(SupervisedServerModel):
    """Forward, loss, backward and step on the server; return dL/dz to the client."""

    @remote(embeddings=EMBEDDINGS, labels=LABELS)
    def forward_backward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        embeddings = embeddings.detach().requires_grad_()
        self.train_on(embeddings, labels)
        return embeddings.grad
