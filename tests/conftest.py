"""Shared fixtures: a live split-learning service on loopback and helpers to reach it."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from unittest import mock

import pytest
import torch

import splitflower  # noqa: F401 - before flwr imports grpc: it turns gRPC's fork handlers off (see _fork)

for _key, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ("HF_HUB_OFFLINE", "1"),  # (GRPC_VERBOSITY: importing splitflower above sets it)
):
    os.environ.setdefault(_key, _value)

from flwr.app import Array, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.client_app import ClientAppException  # noqa: E402
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor  # noqa: E402
from ray import cloudpickle  # noqa: E402

from splitflower._logs import FLOWER_LEVEL_ENV  # noqa: E402
from splitflower.app import build_client_app  # noqa: E402
from splitflower.client import Client  # noqa: E402
from splitflower.data import client_partition  # noqa: E402
from splitflower.experiment import Experiment, ExperimentConfig  # noqa: E402
from splitflower.proxy import ServerModelProxy  # noqa: E402
from splitflower.scheduling import ImmediateScheduler, Scheduler  # noqa: E402
from splitflower.server_model import ServerModel, sgd  # noqa: E402
from splitflower.service import SplitService  # noqa: E402
from splitflower.simulation import _backend_config  # noqa: E402

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


@pytest.fixture(autouse=True)
def _flower_logging_as_it_was() -> Iterator[None]:
    # A test that runs the CLI in this process quiets Flower's logger and tells the processes
    # it starts to (splitflower._logs): no later test may inherit that.
    os.environ.pop(FLOWER_LEVEL_ENV, None)
    flower = logging.getLogger("flwr")
    level, propagate = flower.level, flower.propagate
    yield
    os.environ.pop(FLOWER_LEVEL_ENV, None)
    flower.setLevel(level)
    flower.propagate = propagate


@pytest.fixture(autouse=True)
def _no_actor_memory_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process runs (ThreadBackend) train clients as threads sharing this process's memory, so
    # the estimate of Ray actors' memory does not apply; runs in fresh processes keep it.
    monkeypatch.setattr("splitflower._host_memory._available_memory_bytes", lambda: None)


@pytest.fixture
def service() -> Iterator[SplitService]:
    svc = SplitService(port=0, max_message_bytes=4 * 1024 * 1024, sequence_timeout=5.0)
    svc.start()
    yield svc
    svc.stop(grace=0)


# Ray's local node missed its start-up window now and then here (twice in a row in the
# fresh-clone CI runs at 7caa95e and 9979991), most likely its raylet or GCS aborted by gRPC's
# fork handlers, now off (splitflower._fork); a retry stays for other causes, and costs little.
RAY_ATTEMPTS = 3


_ARRAY_PARSING = threading.Lock()
_FLOWER_ARRAY_NUMPY = Array.numpy


@functools.wraps(_FLOWER_ARRAY_NUMPY)
def _array_numpy_alone(self: Array) -> Any:
    with _ARRAY_PARSING:
        return _FLOWER_ARRAY_NUMPY(self)


def _parse_arrays_one_at_a_time() -> None:
    """Make :meth:`flwr.app.Array.numpy` parse one array at a time in this process, for the
    rest of the session (the server's own loads included, which costs nothing there).

    Client threads share one interpreter, which Ray's actor processes do not. CPython 3.11
    keeps the AST constructor's recursion depth per interpreter: it sets it when it starts
    building a tree and checks it at the end, so a thread switch mid-build (a garbage
    collection running a finalizer) to another thread that builds one ends in "SystemError:
    AST constructor recursion depth mismatch". ``np.load`` parses each array's header with
    ``ast.literal_eval``, and every client thread loads its weights at once (CI at a32a0fb:
    a client failed so, and its round ran 30 s on the batching flush timeout). Only this
    parse is covered: client code that parses Python itself on client threads is not.
    """
    Array.numpy = _array_numpy_alone  # type: ignore[method-assign]


class ThreadBackend(Backend):
    """Flower's simulation backend with Ray's actors replaced by threads of this process.

    Everything else is Flower's own simulation runtime (its LinkState, InMemoryGrid, message
    workers and their error replies). Each ClientApp call goes through the method Flower's Ray
    actors run (:class:`VirtualClientEngineActor`), on a pickled copy of the app, message and
    context, and its reply and context come back pickled, as between Ray's processes; so state
    a client keeps anywhere but ``context.state`` is lost between calls here too (module
    globals aside: the threads share them). A ClientApp that raises anything gets Flower's
    error reply. Threads share what processes do not, the interpreter's AST state among it,
    so arrays are parsed one at a time (:func:`_parse_arrays_one_at_a_time`). A simulation
    costs a second or two instead of Ray's 15-20 s of start-up, so strategies and algorithms
    run under Flower in the fast suite; Ray itself is under test
    wherever ``splitflower run`` or ``flwr run`` runs.
    """

    runs = 0  # backends built: a simulation that did not use this one is caught (see simulate)

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        # As many workers as Ray would have actors: the node's CPUs over each client's.
        cpus = float(cast(Any, backend_config["init_args"])["num_cpus"])
        self._workers = max(1, int(cpus // float(cast(Any, backend_config["client_resources"])["num_cpus"])))
        self._app: bytes | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        _parse_arrays_one_at_a_time()
        self._app = cloudpickle.dumps(app_fn)
        ThreadBackend.runs += 1

    @property
    def num_workers(self) -> int:
        return self._workers

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self._app is None:
            raise RuntimeError("ThreadBackend.build was not called")
        message, context = cloudpickle.loads(cloudpickle.dumps((message, context)))
        try:
            _, reply, context = VirtualClientEngineActor().run(cloudpickle.loads(self._app), message, "", context)
        except ClientAppException:
            raise
        except BaseException as err:  # SystemExit, say: Ray's actor would die, and the call fail
            # with it (Flower's error code would be UNKNOWN there); either way an error reply.
            raise ClientAppException(f"{type(err).__name__}: {err}") from err
        returned: tuple[Message, Context] = cloudpickle.loads(cloudpickle.dumps((reply, context)))
        return returned


# A round whose client never replies ends after this long (instead of Flower's hour) in simulate.
SIMULATION_ROUND_TIMEOUT_S = 120.0


def simulate(
    config: ExperimentConfig,
    client_cls: type[Client] | None = None,
    round_timeout: float = SIMULATION_ROUND_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Run ``config`` under Flower's simulation runtime on a :class:`ThreadBackend`, with the
    experiment's own ClientApp, or ``client_cls`` as every node's client; returns the
    strategy's raw round records."""
    experiment = Experiment(config)

    def make_client(context: Context) -> Client:
        assert client_cls is not None
        partition_id = int(context.node_config["partition-id"])
        data = client_partition(experiment.train, partition_id, config.clients, config.partition)
        return client_cls(copy.deepcopy(experiment.bottom), data, optimizer=sgd(), client_id=partition_id)

    records: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    strategy = experiment.make_strategy()
    server_app = experiment.server_app(
        strategy, lambda *_: None, lambda _, r: records.append(r), errors.append, round_timeout
    )
    runs = ThreadBackend.runs
    with mock.patch("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend):
        try:
            run_simulation(
                server_app=server_app,
                client_app=experiment.client_app() if client_cls is None else build_client_app(make_client),
                num_supernodes=config.clients,
                backend_config=_backend_config(config),
            )
        except Exception as err:  # noqa: BLE001 - re-raised, with the ServerApp's own error as cause
            raise RuntimeError(f"the simulation failed; the ServerApp's error: {errors[:1]}") from (errors or [err])[0]
    if errors:
        raise RuntimeError(f"the ServerApp failed: {errors[0]!r}") from errors[0]
    if ThreadBackend.runs != runs + 1:
        raise RuntimeError("the simulation did not run on ThreadBackend: Flower no longer builds RayBackend there")
    if len(records) != config.rounds:
        raise RuntimeError(f"{len(records)} of {config.rounds} rounds ran; see the log above")
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


def empty_rounds(count: int) -> dict[int, dict[str, Any]]:
    """Round records (as a SplitResult holds them) of rounds 1..``count`` in which no client
    reported: what a saved model's history needs where a test trains nothing."""
    return {r: {"round": r, "seconds": 0.0, "clients": [], "server_models": []} for r in range(1, count + 1)}


def self_signed_certificate() -> tuple[bytes, bytes]:
    """A fresh self-signed certificate for localhost and 127.0.0.1 (its own CA), and its key, in PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def certificate_files(folder: Path, parties: tuple[str, ...]) -> dict[str, Path]:
    """For each party a fresh self-signed certificate and its key, written as PEM files
    ``<party>-cert.pem`` and ``<party>-key.pem`` in ``folder``: their paths, by that stem."""
    files = {}
    for party in parties:
        for kind, pem in zip(("cert", "key"), self_signed_certificate(), strict=True):
            files[f"{party}-{kind}"] = folder / f"{party}-{kind}.pem"
            files[f"{party}-{kind}"].write_bytes(pem)
    return files
