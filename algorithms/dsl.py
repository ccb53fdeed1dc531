"""Decoupled split learning (DSL, Algorithm 1 of the paper): nothing flows back per batch.

The client trains its segment with a local auxiliary classifier and streams the cut
activations and labels to the server fire-and-forget; the server trains on the true loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitflower.client import Client
from splitflower.server_model import remote
from splitflower.split import cut_shape
from splitflower.supervised import EMBEDDINGS, LABELS, SupervisedServerModel, linear_head

__all__ = ["DSLClient", "DSLOptions", "DSLServerModel"]


@dataclass(frozen=True)
class DSLOptions:
    """``window``: batches sent but not yet acknowledged by the server (pipelining); 0 waits
    for the server after every batch, as a single-process implementation does."""

    window: int = 8

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window must be 0 (blocking) or more, got {self.window}")


class DSLClient(Client):
    """Local auxiliary loss (by default one linear layer on the flattened cut activations)."""

    Options = DSLOptions

    def __init__(self, segment: nn.Module, *args: Any, aux_head: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(segment, *args, **kwargs)
        data = self.train_data
        head = aux_head or linear_head(cut_shape(segment, data.input_shape), data.num_classes)
        self.model["aux_head"] = head.to(self.device)
        self.max_in_flight = max(self.options.window, 1)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        z = self.segment(x)
        train_batch = self.server_model_proxy.train_batch
        (train_batch.send if self.options.window else train_batch)(embeddings=z, labels=y)
        loss = self.loss_fn(self.model["aux_head"](z), y)
        self.step(loss)
        return {"aux_loss": loss.item()}


class DSLServerModel(SupervisedServerModel):
    """Train the server segment on the activations it receives; reply with nothing."""

    @remote(embeddings=EMBEDDINGS, labels=LABELS)
    def train_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        self.train_on(embeddings, labels)
