"""LocFedMix-SL (Oh et al., WWW 2022, section 3.4 and Algorithm 4), each technique switchable.

Techniques as the paper numbers them: (1) parallel smashed-data forward and (2) global
gradient back to the clients come from the strategy (``batched``: the server sees every
client's batch in one call; ``sequential`` gives vanilla SL, combination 1); (3) smashed-data
mixup on the server (``mixup``, ``n_s``, ``alpha``); (4) a local InfoPro-style decoder whose
reconstruction gradient the client adds to the global one (``decoder``); (5) federated
averaging of the client segment and decoder every ``sync_every`` rounds (0: never).
``combo=K`` sets (3), (4) and (5) as in row K of the paper's Table 3 (combination 1 is
combination 4's settings run under ``--strategy sequential``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitflower.client import Client
from splitflower.errors import ConfigError
from splitflower.server_model import remote
from splitflower.supervised import EMBEDDINGS, LABELS, SupervisedServerModel

__all__ = ["LocFedMixClient", "LocFedMixOptions", "LocFedMixServerModel", "TABLE3_COMBOS", "infopro_decoder"]

TABLE3_COMBOS: Mapping[int, tuple[bool, bool, int]] = {
    # combination: (mixup (3), decoder (4), sync_every (5)); (1) and (2) always on.
    1: (False, False, 1),  # vanilla SL: run under the sequential strategy
    2: (True, False, 0),
    3: (False, True, 0),
    4: (False, False, 1),  # SplitFed
    5: (True, True, 0),
    6: (True, False, 1),
    7: (False, True, 1),  # LocSplitFed + (2)
    8: (True, True, 1),  # LocFedMix-SL
}


@dataclass(frozen=True)
class LocFedMixOptions:
    """``combo``: a row of Table 3 (1-8) that sets ``mixup``, ``decoder`` and ``sync_every``;
    giving one of those as well is refused unless it agrees. Without a combo they default to
    row 8 (LocFedMix-SL). ``n_s``: other clients each sample is mixed with (0: all others in
    the call); ``alpha``: lambda ~ Beta(alpha, alpha), 1 = uniform.

    Example
    -------
    >>> LocFedMixOptions(combo=4)
    LocFedMixOptions(combo=4, mixup=False, n_s=0, alpha=1.0, decoder=False, sync_every=1)
    """

    combo: int = 0
    mixup: bool | None = None
    n_s: int = 0
    alpha: float = 1.0
    decoder: bool | None = None
    sync_every: int | None = None

    def __post_init__(self) -> None:
        if self.combo and self.combo not in TABLE3_COMBOS:
            raise ConfigError(f"combo must be 0 (use mixup/decoder/sync_every) or 1..8, got {self.combo}")
        for name, ok, need in (
            ("n_s", self.n_s >= 0, ">= 0"),
            ("sync_every", (self.sync_every or 0) >= 0, ">= 0"),
            ("alpha", self.alpha > 0, "> 0"),
        ):
            if not ok:
                raise ConfigError(f"{name} must be {need}, got {getattr(self, name)}")
        for name, value in zip(("mixup", "decoder", "sync_every"), TABLE3_COMBOS[self.combo or 8], strict=True):
            given = getattr(self, name)
            if self.combo and given is not None and given != value:
                raise ConfigError(
                    f"combo={self.combo} sets {name}={value}, but {name}={given} was also given; "
                    f"drop one of them (or use combo=0 to choose each technique)"
                )
            object.__setattr__(self, name, value if given is None else given)


def infopro_decoder(cut: Sequence[int], input_shape: Sequence[int], width: int = 32) -> nn.Module:
    """InfoPro-style decoder: interpolate to the input size, two convolutions, batch norm,
    ReLU, sigmoid (the paper's section 4)."""
    return nn.Sequential(
        nn.Upsample(size=tuple(input_shape[1:]), mode="bilinear", align_corners=False),
        nn.Conv2d(cut[0], width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, input_shape[0], 3, padding=1),
        nn.Sigmoid(),
    )


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """The batch rescaled to [0, 1], the range of the decoder's sigmoid (inputs are normalised)."""
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)


class LocFedMixClient(Client):
    """Combines the server's gradient with its decoder's (4); adopts the averaged segment
    and decoder every ``sync_every`` rounds and keeps its own in between (5).

    Example
    -------
    >>> from splitflower.data import synthetic
    >>> segment = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2))
    >>> client = LocFedMixClient(segment, synthetic(8, 8)[0], options=LocFedMixOptions(combo=7))
    >>> sorted(client.model), client.sync_every
    (['decoder', 'segment'], 1)
    """

    Options = LocFedMixOptions

    def __init__(self, segment: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(segment, *args, **kwargs)
        self.sync_every = int(self.options.sync_every or 0)
        if self.options.decoder:
            self.add_part("decoder", infopro_decoder(self.cut_shape, self.train_data.input_shape))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        z = self.segment(x)
        grad = self.server_model_proxy.forward_backward.future(embeddings=z, labels=y)
        local = [nn.functional.mse_loss(self.model["decoder"](z), _unit_range(x))] if self.options.decoder else []
        self.step([z, *local], [grad.result(), *[None] * len(local)])
        return {"reconstruction_loss": local[0].item()} if local else {}


class LocFedMixServerModel(SupervisedServerModel):
    """Trains on the clients' smashed data plus its mixups (3); returns each client's dL_i/ds_i (2).

    Example
    -------
    >>> server = LocFedMixServerModel(nn.Linear(4, 3), options=LocFedMixOptions(combo=6))
    >>> server.options.mixup, server.options.decoder, server.options.n_s
    (True, False, 0)
    """

    Options = LocFedMixOptions

    @remote(embeddings=EMBEDDINGS, labels=LABELS)
    def forward_backward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        s = embeddings.detach().requires_grad_()
        logits = self.model_output(s, labels)
        targets = nn.functional.one_hot(labels, logits.shape[1]).to(s.dtype)
        if self.options.mixup and len(self.call_context.callers) > 1:
            mixed, mixed_targets = self._mix(s.detach(), targets)
            logits, targets = torch.cat([logits, self.model_output(mixed)]), torch.cat([targets, mixed_targets])
        # eq. (6): sum_i delta_i (L_i + sum over n_s partners of the mixed loss), delta_i = rows_i / rows
        self.step(nn.functional.cross_entropy(logits, targets, reduction="sum") / len(s), num_examples=len(s))
        return self.call_context.own_mean_grad(s.grad)

    def _mix(self, s: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row mixed with a random row of each of ``n_s`` other callers (eq. 5)."""
        rows = self.call_context.rows_of_other_callers(self.options.n_s or None)
        lam = torch.distributions.Beta(self.options.alpha, self.options.alpha).sample(rows.shape).to(s)
        mixed = torch.lerp(s[rows], s.unsqueeze(1), lam.view(*lam.shape, *[1] * (s.dim() - 1)))
        return mixed.flatten(0, 1), torch.lerp(targets[rows], targets.unsqueeze(1), lam.unsqueeze(-1)).flatten(0, 1)
