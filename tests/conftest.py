"""Shared fixtures: a live split-learning service on loopback and helpers to reach it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

for _key, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ("HF_HUB_OFFLINE", "1"),
    ("GRPC_VERBOSITY", "ERROR"),
):
    os.environ.setdefault(_key, _value)

from splitflower.proxy import ServerModelProxy  # noqa: E402
from splitflower.scheduling import ImmediateScheduler, Scheduler  # noqa: E402
from splitflower.server_model import ServerModel  # noqa: E402
from splitflower.service import SplitService  # noqa: E402


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    # Tests run client and server in one process on 2 cores: keep torch from oversubscribing.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def service() -> Iterator[SplitService]:
    svc = SplitService(port=0, max_message_bytes=4 * 1024 * 1024, sequence_timeout=5.0)
    svc.start()
    yield svc
    svc.stop(grace=0)


def connect(
    service: SplitService, model: ServerModel | Scheduler, client: object = "client-0", **proxy_options: object
) -> ServerModelProxy:
    """Open a session for ``client`` on ``model`` and return a proxy holding its token."""
    scheduler = model if isinstance(model, Scheduler) else ImmediateScheduler(model)
    token, _ = service.open_session(client, scheduler)
    options: dict[str, object] = {"max_message_bytes": service.max_message_bytes, **proxy_options}
    return ServerModelProxy(service.address, token, **options)  # type: ignore[arg-type]
