"""SplitAvg (Pal et al., 2021): one batch of all clients' embeddings, one mean gradient back.

Under the ``batched`` strategy the server trains on the embeddings of every client of a
call concatenated into one batch, then returns to each of them the mean over the clients
of their cut-layer gradients (each of its own mean loss): the same tensor for every
client, a broadcast rather than one gradient per client. Clients whose batch has another
size (a last, smaller batch) are averaged among themselves.
"""

from __future__ import annotations

import torch

from splitflower.algorithms.csl import CSLClient, CSLServerModel
from splitflower.server_model import remote
from splitflower.supervised import EMBEDDINGS, LABELS

__all__ = ["SplitAvgClient", "SplitAvgServerModel"]


class SplitAvgClient(CSLClient):
    """A CSL client: forward, send, backpropagate the (averaged) gradient it gets back.

    Example
    -------
    >>> SplitAvgClient.Options.__name__
    'CSLOptions'
    """


class SplitAvgServerModel(CSLServerModel):
    """Trains on the concatenated batch; returns the clients' mean cut-layer gradient.

    Example
    -------
    >>> from torch import nn
    >>> server = SplitAvgServerModel(nn.Linear(4, 3))
    >>> server.configure_fit(None, {"lr": 0.1})
    >>> server.forward_backward(embeddings=torch.ones(2, 4), labels=torch.tensor([0, 1])).shape
    torch.Size([2, 4])
    """

    @remote(embeddings=EMBEDDINGS, labels=LABELS)
    def forward_backward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        grad = self.call_context.own_mean_grad(super().forward_backward(embeddings, labels))
        if grad is None:
            return None
        grads = grad.split(self.call_context.sizes or [len(grad)])  # called directly: one caller
        return torch.cat([torch.stack([g for g in grads if g.shape == own.shape]).mean(0) for own in grads])
