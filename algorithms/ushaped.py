"""U-shaped split learning: the client keeps the first and the last layers.

Labels and logits never leave the client. The client sends its cut activations; the
server runs the middle and returns its output, keeping that caller's graph; the client
runs its tail, computes the loss, and sends back the gradient of the server's output; the
server backpropagates and steps, and returns the gradient of the cut activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitflower.client import Client
from splitflower.server_model import FLOATING, ServerModel, TensorSpec, remote
from splitflower.supervised import EMBEDDINGS

__all__ = ["UShapedClient", "UShapedServerModel"]

_FEATURES = TensorSpec(dtypes=FLOATING, shape=("batch", ...), finite=True)


class UShapedClient(Client):
    """Holds ``tail`` (the model's last layer(s)) as ``self.model["tail"]`` beside the segment.

    Example
    -------
    >>> from splitflower.data import synthetic
    >>> data = synthetic(8, 8, num_classes=3, input_shape=(1, 4, 4))[0]
    >>> sorted(UShapedClient(nn.Flatten(), data, tail=nn.Linear(16, 3)).model)
    ['segment', 'tail']
    """

    def __init__(self, segment: nn.Module, *args: Any, tail: nn.Module, **kwargs: Any) -> None:
        super().__init__(segment, *args, **kwargs)
        self.add_part("tail", tail)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        z = self.segment(x)
        h = torch.as_tensor(self.server_model_proxy.forward(embeddings=z)).requires_grad_()
        loss = self.loss_fn(self.model["tail"](h), y)
        (h_grad,) = torch.autograd.grad(loss, h, retain_graph=True)
        self.step([loss, z], [None, self.server_model_proxy.backward(grad=h_grad)])
        return {"loss": loss.item()}


class UShapedServerModel(ServerModel):
    """The middle of the network; keeps each caller's graph from ``forward`` to ``backward``.

    Example
    -------
    >>> from splitflower.server_model import remote_methods
    >>> sorted(remote_methods(UShapedServerModel))
    ['backward', 'forward']
    """

    @remote(embeddings=EMBEDDINGS)
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        z = embeddings.detach().requires_grad_()
        h = self.model(z)
        self.keep(z, h)
        return h.detach()

    @remote(grad=_FEATURES)
    def backward(self, grad: torch.Tensor) -> torch.Tensor | None:
        z, h = self.take_kept("forward")
        self.step(h, grad=grad, num_examples=len(z))
        return z.grad
