"""examples/dsl_vs_csl end to end through Flower's own runtimes: `flwr run` against a
local simulation SuperLink, and against a localhost deployment (SuperLink + 2 SuperNodes).

Every process a test starts, directly or through Flower (the detached local SuperLink,
SuperExecs, ServerApp/ClientApp/simulation processes, Ray), is killed in the fixture's
teardown: descendants of the processes started here, plus any process whose command line
names this test's FLWR_HOME, Ray temp dir or one of its ports. FLWR_HOME and RAY_TMPDIR
point into temporary directories, so nothing is left in ~/.flwr or /tmp/ray.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from conftest import RAY_START_UP_FAILURES, certificate_files, empty_rounds
from splitflower.app import service_from_run_config
from splitflower.errors import ConfigError, ResultsFileError
from splitflower.wire import DEFAULT_MAX_MESSAGE_BYTES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # a dependency of flwr


REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "dsl_vs_csl"
BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, flower-supernode
RUN_CONFIG = "dataset='synthetic' synthetic-size=512 num-server-rounds=1 num-clients=2"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) for every live process."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        table[int(entry)] = (int(fields[1]), fields[0], cmdline)
    return table


class Flower:
    """Starts Flower processes with an isolated environment and kills them all afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="sfray-"))  # short: Ray's socket paths must stay short
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "RAY_TMPDIR": str(self.ray_tmp),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "GRPC_VERBOSITY": "ERROR",
        }
        self.started: list[subprocess.Popen[bytes]] = []
        self.logs: dict[str, Path] = {}
        self.patterns = [re.escape(str(self.home)), re.escape(str(self.ray_tmp))]

    def watch_port(self, port: int) -> None:
        """Also kill, at teardown, any process whose command line names this port."""
        self.patterns.append(rf"(?:127\.0\.0\.1:|--port ){port}(?!\d)")

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def run(self, name: str, *args: str, timeout: float) -> int:
        proc = self.start(name, *args)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(args)} ran past {timeout}s\n{self.tail()}")

    def use_local_superlink_ports(self) -> None:
        """Have `flwr run ... local` start its detached SuperLink on free ports, killed at cleanup."""
        http_port, control_port = _free_ports(2)
        self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
        self.env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
        self.watch_port(http_port)
        self.watch_port(control_port)

    def flwr_run_local(self, name: str, run_config: str, timeout: float) -> int:
        """`flwr run APP local` in simulation with two SuperNodes, one CPU each."""
        federation = "num-supernodes=2 client-resources-num-cpus=1"
        arguments = ("run", str(APP), "local", "--stream", "--run-config", run_config)
        return self.run(name, "flwr", *arguments, "--federation-config", federation, timeout=timeout)

    def flwr_run_local_status(self, name: str, run_config: str, timeout: float) -> str:
        """`flwr run APP local` and the status of the run it created; one more run if Ray's local
        node missed its start-up window (that says nothing about splitflower, and happens on a
        loaded 2-core machine)."""
        status = self._new_run_status(name, run_config, timeout)
        if not status.startswith("finished:completed") and any(s in self.tail(20_000) for s in RAY_START_UP_FAILURES):
            status = self._new_run_status(f"{name}-retry", run_config, timeout)
        return status

    def _new_run_status(self, name: str, run_config: str, timeout: float) -> str:
        before = {run["run-id"] for run in self.runs("local")}
        rc = self.flwr_run_local(name, run_config, timeout)
        assert rc == 0, self.tail()
        new = {run["run-id"]: run for run in self.runs("local") if run["run-id"] not in before}
        assert len(new) == 1, f"expected one new run, got {new}\n{self.tail()}"
        run = next(iter(new.values()))
        return f"{run['status']} {run.get('status-details', '')}".strip()

    def runs(self, superlink: str) -> list[dict[str, Any]]:
        """Every run ``superlink`` has seen, as `flwr ls` lists them."""
        done = subprocess.run(
            [str(BIN / "flwr"), "ls", superlink, "--format", "json"], env=self.env, capture_output=True, timeout=60
        )
        assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")
        runs: list[dict[str, Any]] = json.loads(done.stdout)["runs"]
        return runs

    def run_status(self, superlink: str) -> tuple[str, str]:
        """(status, details) of the only run on ``superlink``: `flwr run` exits 0 even when the run fails."""
        runs = self.runs(superlink)
        assert len(runs) == 1, runs
        return runs[0]["status"], runs[0].get("status-details", "")

    def tail(self, chars: int = 3000) -> str:
        parts = [f"----- {name}.log\n{log.read_text(errors='replace')[-chars:]}" for name, log in self.logs.items()]
        return "\n".join(parts)

    def _targets(self) -> set[int]:
        table = _process_table()
        pattern = re.compile("|".join(self.patterns))
        found = {p.pid for p in self.started if p.pid in table}
        found |= {pid for pid, (_, _, cmd) in table.items() if pattern.search(cmd)}
        grew = True
        while grew:  # and every descendant of those
            more = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
            found |= more
            grew = bool(more)
        protected, pid = set(), os.getpid()
        while pid > 1 and pid in table:  # never this process or its ancestors
            protected.add(pid)
            pid = table[pid][0]
        return {p for p in found - protected if table[p][1] != "Z"}

    def cleanup(self) -> list[str]:
        """Terminate (then kill) everything; return the command lines that survived."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
            targets = self._targets()
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while targets and time.monotonic() < deadline:
                for proc in self.started:
                    proc.poll()  # reap our own children
                time.sleep(0.2)
                targets = self._targets()
            if not targets:
                break
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        table = _process_table()
        return [table[p][2] for p in self._targets() if p in table]


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[Flower]:
    env = Flower(tmp_path)
    try:
        yield env
    finally:
        survivors = env.cleanup()
        assert not survivors, f"processes survived cleanup: {survivors}"


def _check_results(path: Path, log: str) -> dict[str, Any]:
    assert path.is_file(), f"no results JSON at {path}\n{log}"
    results = json.loads(path.read_text())
    assert results["schema"] == "splitflower.results/1"
    assert results["config"]["dataset"] == "synthetic" and results["config"]["clients"] == 2
    assert [r["round"] for r in results["rounds"]] == [1]
    entry = results["rounds"][0]
    assert entry["failed_clients"] == [] and entry["num_examples"] == 512
    assert 0.0 <= results["final"]["test_accuracy"] <= 1.0
    return results


@pytest.mark.slow
@pytest.mark.timeout(420)  # room for one retry of Ray's start-up
def test_flwr_run_local_simulation(flower: Flower) -> None:
    """`flwr run` starts a detached local SuperLink (simulation runtime) on the ports we give it.

    The sequential strategy, whose Ray run this is (the parallel ones run on Ray in the
    deployment below and in test_flower_app_algorithms.py): the client segment each client
    hands on crosses Ray's actors, a client at a time."""
    flower.use_local_superlink_ports()
    out = flower.tmp / "simulation-results.json"
    run_config = f"{RUN_CONFIG} strategy='sequential' out='{out}'"
    status = flower.flwr_run_local_status("flwr-run", run_config, timeout=180)
    assert status.startswith("finished:completed"), f"{status}\n{flower.tail()}"
    assert _check_results(out, flower.tail())["config"]["strategy"] == "sequential"


def _wait_healthy(flower: Flower, proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"flower-superlink exited with {proc.returncode}\n{flower.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"flower-superlink not healthy after {timeout}s\n{flower.tail()}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flwr_run_localhost_deployment(flower: Flower) -> None:
    """SuperLink + 2 SuperNodes on localhost; every message starts a fresh ClientApp process."""
    link_port, *node_ports = _free_ports(3)
    for port in (link_port, *node_ports):
        flower.watch_port(port)
    link = flower.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port))
    _wait_healthy(flower, link, link_port)
    pems = certificate_files(flower.tmp, ("server", "client"))
    for i, port in enumerate(node_ports):
        flower.start(
            f"supernode-{i}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--port",
            str(port),
            "--node-config",
            f"partition-id={i} num-partitions={len(node_ports)} "
            f"sf-tls-client-certificate='{pems['client-cert']}' sf-tls-client-private-key='{pems['client-key']}'",
        )
    # Flower 1.41 reads SuperLink connections from $FLWR_HOME/config.toml: `flwr run APP localhost`.
    (flower.home / "config.toml").write_text(
        f'[superlink]\ndefault = "localhost"\n\n'
        f'[superlink.localhost]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    out, model = flower.tmp / "deployment-results.json", flower.tmp / "deployment-model.pt"
    assert _flwr_run_localhost(flower, "flwr-run", f"{RUN_CONFIG} out='{out}' model-out='{model}'") == 0, flower.tail()
    status, details = flower.run_status("localhost")
    assert status == "finished:completed", f"{details}\n{flower.tail()}"
    results = _check_results(out, flower.tail())
    _check_saved_model(model, results)
    # A second run trains on from those weights: round 2, on the SuperNodes that ran round 1,
    # over mutual TLS: each SuperNode presents the certificate its node config names (the
    # first run, without TLS, left it unused).
    resumed = flower.tmp / "resumed-results.json"
    mutual_tls = (
        f"sf-tls-certificate='{pems['server-cert']}' sf-tls-private-key='{pems['server-key']}' "
        f"sf-tls-root-certificates='{pems['server-cert']}' sf-tls-client-ca='{pems['client-cert']}'"
    )
    run_config = RUN_CONFIG.replace("num-server-rounds=1", "num-server-rounds=2") + " " + mutual_tls
    rc = _flwr_run_localhost(flower, "flwr-run-resumed", f"{run_config} out='{resumed}' resume-from='{model}'")
    assert rc == 0, flower.tail()
    trained_on = json.loads(resumed.read_text())
    assert [r["round"] for r in trained_on["rounds"]] == [1, 2], flower.tail()
    assert trained_on["rounds"][0] == results["rounds"][0], "the first run's round, carried on"
    assert trained_on["resumed_from"] == {"path": str(model), "rounds": 1, "carried_rounds": 1, "changed": {}}
    assert trained_on["rounds"][1]["failed_clients"] == [] and trained_on["rounds"][1]["num_examples"] == 512


def _flwr_run_localhost(flower: Flower, name: str, run_config: str) -> int:
    return flower.run(name, "flwr", "run", str(APP), "localhost", "--stream", "--run-config", run_config, timeout=180)


def _check_saved_model(path: Path, results: dict[str, Any]) -> None:
    """The weights the ServerApp saved give the accuracy it reported."""
    from splitflower.checkpoint import load_model

    saved = load_model(path)
    assert saved.config == results["config"]
    (x, y), *_ = saved.experiment().test.batches(100_000, shuffle=False)
    with torch.no_grad():
        accuracy = (saved.network()(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(results["final"]["test_accuracy"])


# ------------------------------------------------------------------ the app's own checks (fast)
@pytest.fixture
def task(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(APP))
    import dsl_vs_csl.task

    return dsl_vs_csl.task


def test_example_pyproject_defaults_make_a_valid_config(task: Any) -> None:
    with (APP / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)
    flwr = project["tool"]["flwr"]
    assert "federations" not in flwr  # Flower 1.41 would migrate it to config.toml and rewrite the file
    run_config = flwr["app"]["config"]
    server = task.experiment_config(run_config)
    assert (server.algorithm, server.strategy, server.clients, server.rounds) == ("dsl", "parallel", 2, 2)
    client = task.experiment_config(run_config, {"partition-id": 1, "num-partitions": 2})
    assert client.clients == 2 and client.lr == 0.01 and client.cut == "s"
    with pytest.raises(ConfigError, match="'num-partitions' is 3 but run config 'num-clients' is 2"):
        task.experiment_config(run_config, {"partition-id": 1, "num-partitions": 3})  # one SuperNode too many
    assert task.experiment_config({**run_config, "strategy": "", "data-root": ""}).data_root is None
    handing = task.experiment_config({**run_config, "strategy": "sequential", "hand-over-optimizer": True})
    assert handing.hand_over_optimizer


def test_the_example_declares_every_service_key_the_readme_tells_users_to_set() -> None:
    with (APP / "pyproject.toml").open("rb") as f:
        run_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    tls = ("sf-tls-certificate", "sf-tls-private-key", "sf-tls-root-certificates", "sf-tls-client-ca")
    lan_and_tls = ("sf-advertised-host", "sf-max-message-bytes", "sf-node-wait-timeout", *tls)
    assert set(lan_and_tls) <= set(run_config), "Flower refuses --run-config overrides of undeclared keys"
    service = service_from_run_config(run_config)  # the declared defaults mean "unset"
    assert service.tls is None and service.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES


def test_example_app_refuses_a_results_path_before_training(task: Any, tmp_path: Path) -> None:
    import dsl_vs_csl.server_app as server_app

    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"dataset": "synthetic", "out": str(tmp_path)},
    )
    with pytest.raises(ResultsFileError, match="is a directory"):
        server_app._strategy(context)


def test_example_config_names_every_bad_value(task: Any) -> None:
    bad = {"lr": -1.0, "batch-size": "64", "algorithm": "nope", "num-clients": True, "synthetic-size": 0, "out": ""}
    bad["cut"] = True
    with pytest.raises(ConfigError) as info:
        task.experiment_config(bad, {"num-partitions": 0})
    message = str(info.value)
    for fragment in (
        "'batch-size' must be int",
        "'num-clients' must be int",
        "'algorithm' must be one of",
        "'lr' must be positive",
        "'synthetic-size' must be at least 1",
        "'cut' must be s, m, d",
        "'out' must be",
        "'num-partitions'",
    ):
        assert fragment in message, message


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "60", True])
def test_a_round_timeout_that_is_not_a_positive_number_of_seconds_is_refused(bad: Any) -> None:
    from splitflower.app import build_server_app, round_timeout_from_run_config

    expected = f"must be a positive, finite number of seconds, got {re.escape(repr(bad))}"
    with pytest.raises(ConfigError, match=f"^round_timeout {expected}"):
        build_server_app(lambda _: None, lambda _: None, initial_client_weights=lambda _: {}, round_timeout=bad)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigError, match=f"^run config 'sf-round-timeout' {expected}"):
        round_timeout_from_run_config({"sf-round-timeout": bad})
    assert round_timeout_from_run_config({"sf-round-timeout": 90}) == 90.0
    assert round_timeout_from_run_config({"sf-round-timeout": ""}) == round_timeout_from_run_config({}) == 3600.0


def test_a_bad_round_timeout_in_the_run_config_fails_the_run_before_its_service_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from splitflower.app import build_server_app
    from splitflower.service import SplitService

    started: list[SplitService] = []
    monkeypatch.setattr(SplitService, "start", lambda self: started.append(self))
    errors: list[BaseException] = []
    app = build_server_app(lambda _: None, lambda _: None, initial_client_weights=lambda _: {}, on_error=errors.append)  # type: ignore[arg-type, return-value]
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"sf-round-timeout": -5})
    with pytest.raises(ConfigError, match="run config 'sf-round-timeout' must be a positive"):
        app(None, context)  # type: ignore[arg-type]
    assert started == [] and len(errors) == 1 and isinstance(errors[0], ConfigError)
    context.run_config.update({"sf-round-timeout": 60, "sf-node-wait-timeout": "soon"})
    with pytest.raises(ConfigError, match=r"run config 'sf-node-wait-timeout' must be a positive.*got 'soon'"):
        app(None, context)  # type: ignore[arg-type]
    context.run_config.update({"sf-node-wait-timeout": 20, "num-server-rounds": "three"})
    with pytest.raises(ConfigError, match=r"run config 'num-server-rounds' must be a whole number .*got 'three'"):
        app(None, context)  # type: ignore[arg-type]
    assert started == []


def test_the_run_config_sets_how_long_a_round_waits_for_its_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitflower.app import build_server_app
    from splitflower.service import SplitService
    from splitflower.strategies import ParallelStrategy

    monkeypatch.setattr(SplitService, "start", lambda self: None)
    strategy = ParallelStrategy(node_wait_timeout=45.0)
    waited: list[float] = []
    monkeypatch.setattr(strategy, "start", lambda *_, **__: waited.append(strategy.node_wait_timeout))
    app = build_server_app(lambda _: strategy, lambda _: None, initial_client_weights=lambda _: {})  # type: ignore[arg-type, return-value]
    with (APP / "pyproject.toml").open("rb") as f:
        example_default = tomllib.load(f)["tool"]["flwr"]["app"]["config"]["sf-node-wait-timeout"]
    # Unset, or the example app's declared default: the strategy's own.
    for run_config, expected in (
        ({}, 45.0),
        ({"sf-node-wait-timeout": example_default}, 45.0),
        ({"sf-node-wait-timeout": 20}, 20.0),
    ):
        app(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))  # type: ignore[arg-type]
        assert waited.pop() == expected


class _StopsInRound2:
    """A strategy that records round 1, then fails, as one whose server model broke would."""

    last_recorded: Any = None

    def start(self, *_: Any, **__: Any) -> Any:
        from splitflower.strategy import SplitResult

        self.last_recorded = SplitResult(rounds={1: dict(_ONE_ROUND[0])})
        raise RuntimeError("the server model's disk is full")


_ONE_ROUND: list[dict[str, Any]] = []


@pytest.fixture
def one_round() -> dict[str, Any]:
    """A real round record (2 synthetic clients, CSL), made once."""
    if not _ONE_ROUND:
        from conftest import simulate
        from splitflower.experiment import ExperimentConfig

        config = ExperimentConfig(dataset="synthetic", clients=2, rounds=1, train_size=128, test_size=64).validate()
        _ONE_ROUND.extend(simulate(config))
    return _ONE_ROUND[0]


def test_a_failed_example_run_keeps_the_rounds_it_recorded_beside_its_results_file(
    task: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_round: dict[str, Any]
) -> None:
    import dsl_vs_csl.run_files as run_files
    from splitflower.app import build_server_app
    from splitflower.service import SplitService

    monkeypatch.setattr(SplitService, "start", lambda self: None)
    out = tmp_path / "results.json"
    run_config: dict[str, bool | float | int | str] = {"dataset": "synthetic", "num-server-rounds": 3, "out": str(out)}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    run_files.start_run(context)  # as the example's strategy factory does, which this app replaces
    kept: list[tuple[dict[int, Any], BaseException]] = []

    def keep_then_fail(_: Context, rounds: dict[int, Any], error: BaseException) -> None:
        kept.append((rounds, error))
        raise OSError(28, "No space left on device")

    failing_too = build_server_app(
        lambda _: _StopsInRound2(),  # type: ignore[arg-type, return-value]
        lambda _: None,  # type: ignore[arg-type, return-value]
        initial_client_weights=lambda _: {},
        on_stopped=keep_then_fail,
    )
    with pytest.raises(RuntimeError, match="disk is full"):  # not the keeper's OSError
        failing_too(None, context)  # type: ignore[arg-type]
    assert [list(rounds) for rounds, _ in kept] == [[1]] and "disk is full" in str(kept[0][1])

    app = build_server_app(
        lambda _: _StopsInRound2(),  # type: ignore[arg-type, return-value]
        lambda _: None,  # type: ignore[arg-type, return-value]
        initial_client_weights=lambda _: {},
        on_stopped=run_files.write_partial,
    )
    with pytest.raises(RuntimeError, match="disk is full"):
        app(None, context)  # type: ignore[arg-type]
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert partial["incomplete"] == {
        "error": "RuntimeError: the server model's disk is full",
        "rounds_recorded": 1,
        "rounds_planned": 3,
        "last_round": 1,
    }
    assert [entry["round"] for entry in partial["rounds"]] == [1] and partial["rounds"][0]["num_examples"] == 128
    assert not out.exists(), "the results file is never given half a run"


def test_the_example_keeps_the_rounds_so_far_beside_its_results_file_while_it_runs(
    task: Any, tmp_path: Path, one_round: dict[str, Any]
) -> None:
    import dsl_vs_csl.run_files as run_files
    import dsl_vs_csl.server_app as server_app
    from splitflower.simulation import NOT_ENDED
    from splitflower.strategy import SplitResult

    out, progress = tmp_path / "results.json", tmp_path / "results.partial.json"
    run_config: dict[str, bool | float | int | str] = {"dataset": "synthetic", "num-server-rounds": 2, "out": str(out)}
    context = Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app._strategy(context)
    run_files.after_round(context, SplitResult(rounds={1: dict(one_round)}))
    kept = json.loads(progress.read_text())
    assert kept["incomplete"]["error"] == NOT_ENDED and [entry["round"] for entry in kept["rounds"]] == [1]

    both = SplitResult(rounds={1: dict(one_round), 2: {**one_round, "round": 2}})
    run_files.after_round(context, both)  # the last round: the results file follows instead
    assert [entry["round"] for entry in json.loads(progress.read_text())["rounds"]] == [1]
    run_files.write_results_file(context, both)
    assert [entry["round"] for entry in json.loads(out.read_text())["rounds"]] == [1, 2]
    assert "incomplete" not in json.loads(out.read_text()) and not progress.exists()


def test_the_example_summarises_each_round_once_while_it_keeps_the_rounds_so_far(
    task: Any, tmp_path: Path, one_round: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dsl_vs_csl.run_files as run_files
    import dsl_vs_csl.server_app as server_app
    from splitflower import results
    from splitflower.strategy import SplitResult

    summarised: list[int] = []

    def counted(record: dict[str, Any]) -> dict[str, Any]:
        summarised.append(record["round"])
        return results.summarise_round(record)

    monkeypatch.setattr(run_files, "summarise_round", counted)
    run_config: dict[str, bool | float | int | str] = {
        "dataset": "synthetic",
        "num-server-rounds": 5,
        "out": str(tmp_path / "results.json"),
    }
    context = Context(run_id=4, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app._strategy(context)
    result = SplitResult()
    for last in (1, 2, 3, 4):  # a run keeping its rounds so far after each of them
        result.rounds[last] = {**one_round, "round": last}
        run_files.after_round(context, result)
        kept = json.loads((tmp_path / "results.partial.json").read_text())
        assert [entry["round"] for entry in kept["rounds"]] == list(range(1, last + 1))
    assert summarised == [1, 2, 3, 4], "each round summarised once, not again after every later round"


def test_the_example_refuses_to_resume_weights_of_another_config_before_training(task: Any, tmp_path: Path) -> None:
    import dsl_vs_csl.server_app as server_app
    from splitflower.checkpoint import save_model
    from splitflower.errors import ConfigError
    from splitflower.strategy import SplitResult

    run_config: dict[str, bool | float | int | str] = {"dataset": "synthetic", "num-server-rounds": 2}
    experiment = task.load_experiment(task.experiment_config(run_config))
    saved = SplitResult(
        arrays=ArrayRecord(experiment.initial_client_weights()),
        server_arrays=ArrayRecord(experiment.make_server_model().get_fit_result().weights),
        rounds=empty_rounds(1),
    )
    model = save_model(tmp_path / "model.pt", experiment.config, saved)
    run_config |= {"out": str(tmp_path / "r.json"), "resume-from": str(model), "lr": 0.5}
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(
        ConfigError, match=r"cannot resume .*model.pt:\n  - its config differs from the saved one: lr 0.5"
    ):
        server_app._strategy(context)
    assert not (tmp_path / "r.json").exists()
