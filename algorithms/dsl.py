"""Decoupled split learning (DSL, Algorithm 1 of the paper): nothing flows back per batch.

The client trains its segment with a local auxiliary classifier and streams the cut
activations and labels to the server fire-and-forget; the server trains on the true loss.
Options from the paper's section III.C: ``lam`` > 0 mixes the server's gradient into the
client's objective (``L_aux + lam * L``; it needs the gradient back, so each batch waits for
it), and ``head`` picks the auxiliary head (``linear``, ``pooled``, ``mlp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from splitflower.algorithms.csl import CSLServerModel
from splitflower.algorithms.fedsl import FedSLServerModel
from splitflower.client import Client
from splitflower.errors import ConfigError
from splitflower.supervised import AUX_HEADS
from splitflower.wire import MAX_IN_FLIGHT

__all__ = ["DSLClient", "DSLOptions", "DSLServerModel"]


@dataclass(frozen=True)
class DSLOptions:
    """``window``: batches sent but not yet acknowledged by the server (pipelining); 0 waits
    for the server after every batch, as a single-process implementation does. ``lam``:
    weight of the server's loss in the client's objective (0 = pure DSL; > 0 waits for the
    gradient every batch, whatever ``window`` says). ``head``: the auxiliary head."""

    window: int = 8
    lam: float = 0.0
    head: Literal["linear", "pooled", "mlp"] = "linear"

    def __post_init__(self) -> None:
        if not 0 <= self.window <= MAX_IN_FLIGHT:
            raise ConfigError(f"window must be 0 (blocking) to {MAX_IN_FLIGHT}, got {self.window}")
        if self.lam < 0:
            raise ConfigError(f"lam must be 0 (pure DSL) or more, got {self.lam}")


class DSLClient(Client):
    """Local auxiliary loss (by default one linear layer on the flattened cut activations),
    plus ``lam`` times the server's loss when ``lam`` > 0. ``aux_head=`` takes any module
    from the cut activations to class logits instead of the one the ``head`` option names.

    Example
    -------
    >>> from splitflower.data import synthetic
    >>> data = synthetic(8, 2, input_shape=(1, 4, 4), num_classes=3)[0]
    >>> head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    >>> DSLClient(nn.Conv2d(1, 2, 3, padding=1), data, aux_head=head).model["aux_head"] is head
    True
    """

    Options = DSLOptions

    def __init__(self, segment: nn.Module, *args: Any, aux_head: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(segment, *args, **kwargs)
        head = aux_head or AUX_HEADS[self.options.head](self.cut_shape, self.train_data.num_classes)
        self.add_part("aux_head", head)
        self.max_in_flight = max(self.options.window, 1)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        z = self.segment(x)
        proxy, lam = self.server_model_proxy, self.options.lam
        if lam:  # L_aux + lam * L: the server's gradient of L comes back
            grad = proxy.forward_backward.future(embeddings=z, labels=y)
        else:
            (proxy.train_batch.send if self.options.window else proxy.train_batch)(embeddings=z, labels=y)
        loss = self.loss_fn(self.model["aux_head"](z), y)
        if lam:
            self.step([loss, lam * z], [None, grad.result()])
        else:
            self.step(loss)
        return {"aux_loss": loss.item()}


class DSLServerModel(FedSLServerModel, CSLServerModel):
    """Train the server segment on the activations it receives and reply with nothing
    (FedSL's ``train_batch``); ``lam`` > 0 calls CSL's ``forward_backward`` instead, for
    the gradient.

    Example
    -------
    >>> from splitflower.server_model import remote_methods
    >>> sorted(remote_methods(DSLServerModel))
    ['forward_backward', 'predict', 'train_batch']
    """
