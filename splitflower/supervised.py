"""Pieces shared by supervised split-learning algorithms: argument specs, heads, predict."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from splitflower.server_model import FLOATING, ServerModel, TensorSpec, remote

__all__ = ["EMBEDDINGS", "LABELS", "SupervisedServerModel", "linear_head"]

EMBEDDINGS = TensorSpec(dtypes=FLOATING, shape=("batch", ...))
LABELS = TensorSpec(dtypes=(torch.int64,), shape=("batch",))


def linear_head(cut_shape: Sequence[int], num_classes: int) -> nn.Module:
    """One fully connected layer on the flattened cut activations (the DSL paper's head)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(cut_shape), num_classes))


class SupervisedServerModel(ServerModel):
    """A server segment ending in class logits: adds :meth:`train_on` and a remote ``predict``.

    Example
    -------
    >>> server = SupervisedServerModel(nn.Linear(8, 3))
    >>> server.predict(embeddings=torch.zeros(2, 8)).shape
    torch.Size([2, 3])
    """

    def train_on(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the task loss; returns the loss."""
        loss = self.loss_fn(self.model(embeddings), labels)
        self.step(loss, num_examples=len(labels))
        return loss

    @remote(embeddings=EMBEDDINGS)
    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits for cut-layer activations, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(embeddings)
        finally:
            self.model.train(was_training)
