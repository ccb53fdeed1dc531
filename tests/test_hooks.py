"""What a subclass of an algorithm overrides: a gradient hook, and options that extend its base's."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from splitflower.algorithms.csl import CSLClient, CSLOptions, CSLServerModel
from splitflower.data import synthetic
from splitflower.errors import AlgorithmError

MAX_NORM = 1e-3
LR = 1.0


def _update_norm(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return float(torch.stack([(after[k] - before[k]).norm() for k in before]).norm())


class ClippedClient(CSLClient):
    def before_optimizer_step(self) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)


class ClippedServer(CSLServerModel):
    def before_optimizer_step(self) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)


def test_a_client_clips_its_gradients_before_the_optimizer_steps() -> None:
    data = synthetic(8, 8, num_classes=3, input_shape=(1, 2, 2))[0]
    norms = {}
    for cls in (CSLClient, ClippedClient):
        torch.manual_seed(0)
        client = cls(nn.Linear(4, 3), data)
        client.optimizer = torch.optim.SGD(client.model.parameters(), lr=LR)
        before = copy.deepcopy(client.model.state_dict())
        client.step(client.segment(torch.randn(2, 4)), torch.ones(2, 3))
        norms[cls] = _update_norm(before, client.model.state_dict())
    assert norms[CSLClient] > 10 * MAX_NORM, "the unclipped step must be larger, or the test proves nothing"
    assert 0 < norms[ClippedClient] <= LR * MAX_NORM * (1 + 1e-4)


def test_a_server_model_clips_its_gradients_before_the_optimizer_steps() -> None:
    norms = {}
    for cls in (CSLServerModel, ClippedServer):
        torch.manual_seed(0)
        server = cls(nn.Linear(4, 3))
        server.configure_fit(None, {"lr": LR})
        before = copy.deepcopy(server.model.state_dict())
        server.forward_backward(embeddings=torch.randn(8, 4), labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        norms[cls] = _update_norm(before, server.model.state_dict())
    assert norms[CSLServerModel] > 10 * MAX_NORM, "the unclipped step must be larger, or the test proves nothing"
    assert 0 < norms[ClippedServer] <= LR * MAX_NORM * (1 + 1e-4)


def test_a_subclass_s_options_must_extend_those_its_base_reads() -> None:
    @dataclass
    class Unrelated:
        smoothing: float = 0.1

    for options in (Unrelated, None):
        with pytest.raises(AlgorithmError, match=r"Smoothed.Options must subclass CSLClient.Options \(CSLOptions\)"):
            type("Smoothed", (CSLClient,), {"Options": options})

    @dataclass(frozen=True)
    class Extended(CSLOptions):
        smoothing: float = 0.1

    smoothed = type("Smoothed", (CSLClient,), {"Options": Extended})
    client = smoothed(nn.Linear(4, 3), synthetic(8, 8, num_classes=3, input_shape=(1, 2, 2))[0])
    assert (client.options.window, client.options.smoothing) == (1, 0.1)
