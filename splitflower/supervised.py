"""Pieces shared by supervised split-learning algorithms: argument specs, heads, predict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from splitflower.server_model import FLOATING, ServerModel, TensorSpec, local, remote

__all__ = ["AUX_HEADS", "EMBEDDINGS", "LABELS", "SupervisedServerModel", "linear_head", "mlp_head", "pooled_head"]

EMBEDDINGS = TensorSpec(dtypes=FLOATING, shape=("batch", ...), finite=True)
"""Cut-layer activations: one row per example, finite (a NaN would spread to every client's model)."""
LABELS = TensorSpec(dtypes=(torch.int64,), shape=("batch",), high="num_classes")
"""Class indices, one per example, below the server model's ``num_classes`` (a negative one is
the loss function's to judge: cross-entropy ignores -100)."""


def linear_head(cut_shape: Sequence[int], num_classes: int) -> nn.Module:
    """One fully connected layer on the flattened cut activations (the DSL paper's head)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(cut_shape), num_classes))


def pooled_head(cut_shape: Sequence[int], num_classes: int, side: int = 2) -> nn.Module:
    """Average-pool the cut activations to ``side`` x ``side`` per channel, then one linear layer."""
    pool = nn.AdaptiveAvgPool2d(side) if len(cut_shape) == 3 else nn.Identity()
    features = cut_shape[0] * side * side if len(cut_shape) == 3 else math.prod(cut_shape)
    return nn.Sequential(pool, nn.Flatten(), nn.Linear(features, num_classes))


def mlp_head(cut_shape: Sequence[int], num_classes: int, hidden: int = 128) -> nn.Module:
    """A small MLP on the flattened cut activations: linear, ReLU, linear."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(cut_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


AUX_HEADS = {"linear": linear_head, "pooled": pooled_head, "mlp": mlp_head}
"""Auxiliary heads by name (DSL's ``head`` option)."""


class SupervisedServerModel(ServerModel):
    """A server segment ending in class logits: adds a local :meth:`train_on` and a remote ``predict``.

    Example
    -------
    >>> server = SupervisedServerModel(nn.Linear(8, 3))
    >>> server.predict(embeddings=torch.zeros(2, 8)).shape
    torch.Size([2, 3])
    """

    num_classes: int | None = None
    """Width of the model's logits, which :data:`LABELS` bounds: set by a subclass or by whoever
    builds the model (an :class:`~splitflower.experiment.Experiment` sets its dataset's), or learned
    from the first :meth:`model_output` when the loss is the default cross-entropy and the
    output is ``[batch, classes]`` (otherwise labels are not bounded: a binary or regression
    head's targets are not class indices). Until it is known, the labels of a call are checked
    once its forward has run, before the loss: that call's forward may have updated batch-norm
    statistics, and under a batching strategy the first batch fails as a whole."""

    @local
    def model_output(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        """``self.model(embeddings)``, which may set :attr:`num_classes`; the int64 ``labels`` of
        the call that sets it are checked against it (see :data:`LABELS`). Floating embeddings of another dtype are
        cast to the model's (a client may send float16 to halve the bytes; the gradient of the
        embeddings then comes back in float16 too)."""
        if embeddings.is_floating_point():
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), embeddings.dtype)
            embeddings = embeddings.to(dtype)
        out = self.model(embeddings)
        if (
            self.num_classes is None
            and self.loss_fn is nn.functional.cross_entropy
            and isinstance(out, torch.Tensor)
            and out.dim() == 2
        ):
            self.num_classes = out.shape[1]
            # Schedulers check LABELS before each later call; this call's came before the width was known.
            if labels is not None and labels.dtype is torch.int64:
                LABELS.check_values("labels", labels, self)
        return out

    @local
    def train_on(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the task loss; returns the loss."""
        loss = self.loss_fn(self.model_output(embeddings, labels), labels)
        self.step(loss, num_examples=len(labels))
        return loss

    @remote(embeddings=EMBEDDINGS)
    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits for cut-layer activations, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model_output(embeddings)
        finally:
            self.model.train(was_training)
