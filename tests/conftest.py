"""Shared fixtures: a live split-learning service on loopback and helpers to reach it."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

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

from flwr.app import Context  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from splitflower.app import build_client_app  # noqa: E402
from splitflower.client import Client  # noqa: E402
from splitflower.data import client_partition  # noqa: E402
from splitflower.experiment import Experiment, ExperimentConfig, _Progress  # noqa: E402
from splitflower.proxy import ServerModelProxy  # noqa: E402
from splitflower.scheduling import ImmediateScheduler, Scheduler  # noqa: E402
from splitflower.server_model import ServerModel, sgd  # noqa: E402
from splitflower.service import SplitService  # noqa: E402

# A tiny simulation's first client reaches its server model about 10 s after the simulation
# starts here; when Ray's node misses its start-up, nothing ever does, and the run is retried
# after this long instead of after the whole attempt's timeout.
STARTUP_TIMEOUT_S = 60.0
REPO_ROOT = Path(__file__).resolve().parent.parent


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


# Ray's local node misses its start-up window now and then on a loaded 2-core machine (twice
# in a row in the fresh-clone CI runs at 7caa95e and 9979991); such a failure takes seconds,
# so a third try costs little.
RAY_ATTEMPTS = 3


def simulate(config: ExperimentConfig, client_cls: type[Client], timeout: float = 240) -> list[dict[str, Any]]:
    """Run ``config`` as a Flower simulation whose clients are ``client_cls`` (defined in a
    test module); returns the strategy's raw round records.

    Each simulation runs in a fresh process (Ray started a second time in one process can
    time out while its new node starts), which is ended whatever happens: when Ray's node
    misses its start-up window, Flower's ServerApp thread waits for replies forever and the
    process would never exit by itself. Such a failure, or a hang, is tried again, up to
    :data:`RAY_ATTEMPTS` times in all.
    """
    context = multiprocessing.get_context("spawn")
    for attempt in range(1, RAY_ATTEMPTS + 1):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_simulate_child, args=(sender, config, client_cls), daemon=True)
        process.start()
        sender.close()
        outcome: tuple[str, Any]
        try:
            outcome = receiver.recv() if receiver.poll(timeout) else ("hung", f"no result within {timeout:.0f}s")
        except EOFError:
            outcome = ("error", f"the simulation process died (exit code {process.exitcode})")
        finally:
            receiver.close()
            process.terminate()
            process.join(10)
            if process.is_alive():
                process.kill()
        kind, value = outcome[0], cast(Any, outcome[1])
        if kind == "ok" and len(value) == config.rounds:
            records: list[dict[str, Any]] = value
            return records
        problem = f"{len(value)} of {config.rounds} rounds ran" if kind == "ok" else value
        # Ray's local node sometimes misses its 30 s start-up window on a loaded 2-core
        # machine ("Simulation Runtime crashed", missing rounds, a hang): not splitflower's doing.
        retryable = kind in ("ok", "hung") or "Ending simulation" in value
        if attempt == RAY_ATTEMPTS or not retryable:
            raise RuntimeError(f"simulation failed ({kind}): {problem}")
    raise AssertionError("unreachable")


def _simulate_child(sender: Connection, config: ExperimentConfig, client_cls: type[Client]) -> None:
    try:
        sender.send(("ok", _simulate_here(config, client_cls, sender)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which decides
        sender.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        sender.close()
        os._exit(0)  # Flower's ServerApp thread may be stuck: do not wait for it


def _simulate_here(config: ExperimentConfig, client_cls: type[Client], sender: Connection) -> list[dict[str, Any]]:
    from ray import cloudpickle

    # Ray actors cannot import tests/: ship the test's classes and this helper by value.
    cloudpickle.register_pickle_by_value(sys.modules[client_cls.__module__])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    experiment = Experiment(config)

    def make_client(context: Context) -> Client:
        partition_id = int(context.node_config["partition-id"])
        data = client_partition(experiment.train, partition_id, config.clients, config.partition)
        return client_cls(copy.deepcopy(experiment.bottom), data, optimizer=sgd(), client_id=partition_id)

    records: list[dict[str, Any]] = []
    strategy = experiment.make_strategy()

    def report_hang(message: str) -> None:
        sender.send(("hung", message))
        os._exit(0)

    # The experiment's own start-up watch: the run is retried when no client ever starts.
    progress = _Progress(
        strategy, 0, config.rounds, lambda _: None, startup_timeout=STARTUP_TIMEOUT_S, on_stall=report_hang
    )

    def on_round(server_round: int, record: dict[str, Any]) -> None:
        records.append(record)
        progress.round = server_round + 1

    with progress:
        run_simulation(
            server_app=experiment.server_app(strategy, lambda *_: None, on_round),
            client_app=build_client_app(make_client),
            num_supernodes=config.clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": config.clients, "include_dashboard": False},
            },
        )
    return records


def connect(
    service: SplitService, model: ServerModel | Scheduler, client: object = "client-0", **proxy_options: object
) -> ServerModelProxy:
    """Open a session for ``client`` on ``model`` and return a proxy holding its token."""
    scheduler = model if isinstance(model, Scheduler) else ImmediateScheduler(model)
    token, _ = service.open_session(client, scheduler)
    options: dict[str, object] = {"max_message_bytes": service.max_message_bytes, **proxy_options}
    return ServerModelProxy(service.address, token, **options)  # type: ignore[arg-type]


RAY_START_UP_FAILURES = ("The current node timed out during startup", "Timed out waiting for file")


def run_cli(
    command: list[str],
    attempt_timeout: float = 180,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a ``splitflower run`` command, which starts the simulation again, up to
    :data:`RAY_ATTEMPTS` times, while it fails to start (Ray's local node missing its
    start-up window); the whole is bounded by ``attempt_timeout`` per attempt."""
    command = [*command, "--startup-timeout", str(startup_timeout), "--attempts", str(RAY_ATTEMPTS)]
    timeout = attempt_timeout * RAY_ATTEMPTS
    # A session of its own, so that a timeout ends the attempt the command runs, not only the command.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            return subprocess.CompletedProcess(command, -9, stdout, f"timed out after {timeout}s\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_fresh_interpreter(
    code: str, *args: str, drop: frozenset[str] = frozenset(), env: dict[str, str] | None = None, timeout: float = 180
) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter, without the variables in ``drop`` and with ``env``
    added, and return the JSON object its last line of output holds."""
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
