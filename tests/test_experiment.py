"""End to end under Flower: the CLI, the results file, and a client dying mid-round."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord

from conftest import ThreadBackend, run_cli, simulate
from splitflower import _fork, cli, simulation
from splitflower._client_errors import raised_by_client
from splitflower.algorithms.csl import CSLClient
from splitflower.app import _fit_then_close, _fork_handlers_warning
from splitflower.checkpoint import load_model, save_model
from splitflower.cli import STALLED_EXIT_CODE, build_parser
from splitflower.data import synthetic
from splitflower.errors import (
    ConfigError,
    DatasetError,
    ExperimentFailedError,
    IncompatibleStrategyError,
    ResultsFileError,
    RunInterruptedError,
    ServerUnavailableError,
)
from splitflower.experiment import Experiment, ExperimentConfig
from splitflower.report import load_results
from splitflower.results import check_results_path, partial_results_path, summarise_round, write_results
from splitflower.server_model import FitResult
from splitflower.simulation import (
    CRASHED_EXIT_CODE,
    INTERRUPTED_EXIT_CODE,
    NOT_ENDED,
    _Progress,
    run_experiment,
    stopped_early,
)
from splitflower.strategy import NO_REPLY, SplitResult
from splitflower.wire import ConfigKey

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _activation_bytes(results: dict[str, Any]) -> int:
    """Payload of cut-layer tensors (embeddings and their gradients), labels and control aside."""
    return sum(
        b
        for r in results["rounds"]
        for k, b in r["payload_bytes_by_tensor"].items()
        if not k.endswith(":labels") and ":predict:" not in k
    )


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_cli_dsl_and_csl_on_fashion_mnist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process, its clients on threads: the figures are the point here, not Ray's start
    # (the CLI's runs under Ray are tested in test_algorithms_cli.py).
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    common = ["--strategy", "parallel", "--dataset", "fashion-mnist", "--model", "lenet5", "--clients", "3"]
    runs = {}
    for algorithm in ("dsl", "csl"):
        out = tmp_path / f"{algorithm}.json"
        argv = ["run", "--attempts", "1", "--algorithm", algorithm, *common, "--rounds", "2", "--out", str(out)]
        assert cli.main(argv) == 0
        assert "test acc" in capsys.readouterr().out  # the final table
        runs[algorithm] = json.loads(out.read_text())
    dsl, csl = runs["dsl"], runs["csl"]
    for results in (dsl, csl):
        assert results["schema"] == "splitflower.results/1"
        assert results["final"]["test_accuracy"] > 0.80, results["final"]
        assert {"torch", "flwr", "grpcio"} <= set(results["versions"])
        first = results["rounds"][0]
        assert set(first["memory"]) >= {"client_peak_tally_bytes", "server_peak_tally_bytes", "client_peak_rss_bytes"}
        assert set(first["time"]) == {"client_compute_s", "server_compute_s", "communication_wait_s"}
    for r in dsl["rounds"]:
        per_batch = [c["wire"]["by_method"]["train_batch"] for c in r["clients"]]
        assert all(m["down_payload_bytes"] == 0 for m in per_batch)
    assert 2 * _activation_bytes(dsl) == _activation_bytes(csl)


def test_cli_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 3)", "(default: dsl)", "(default: fashion-mnist)", "(default: 0.01)", "(default: 64)"):
        assert shown in text, shown


def test_cli_defaults_are_the_experiment_config_s() -> None:
    # The CLI does not import ExperimentConfig (its supervisor imports neither torch nor Flower).
    given, defaults = vars(build_parser().parse_args(["run"])), asdict(ExperimentConfig())
    shared = given.keys() & defaults.keys()
    assert len(shared) > 20 and {name: given[name] for name in shared} == {name: defaults[name] for name in shared}


def test_the_console_script_finds_an_algorithm_in_the_folder_it_runs_in(tmp_path: Path) -> None:
    # The console script's sys.path starts at the venv's bin/, not the working folder.
    (tmp_path / "mine.py").write_text("from splitflower.algorithms import ALGORITHMS\nCSL = ALGORITHMS['csl']\n")
    script = Path(sys.executable).parent / "splitflower"
    command = [str(script), "run", "--attempts", "1", "--algorithm", "mine:CSL", "--clients", "0"]
    command += ["--out", "new/sub/results.json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "clients must be at least 1, got 0" in done.stderr and "mine" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "new").exists(), "a failed command leaves no folder behind"


SUPERVISOR = """
import sys
import splitflower.cli
# Each attempt reports what it was given, and that it did not start (so that a second runs).
splitflower.cli._ATTEMPT_COMMAND = (sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)")
status = splitflower.cli.main(sys.argv[1:])
print("status", status, "heavy", sorted({"torch", "flwr", "ray"} & set(sys.modules)))
"""


def test_the_supervisor_of_splitflower_run_starts_attempts_without_importing_torch_or_flower() -> None:
    command = [sys.executable, "-c", SUPERVISOR, "run", "--dataset", "synthetic", "--attempts", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    lines = done.stdout.splitlines()
    assert lines == ["['run', '--dataset', 'synthetic', '--attempts', '2']"] * 2 + ["status 3 heavy []"], done.stderr
    assert "did not start (attempt 1 of 2)" in done.stderr


def test_every_public_name_and_module_of_the_package_resolves() -> None:
    import splitflower

    assert set(splitflower.__all__) == {*splitflower._EXPORTS, "__version__"}
    for name in splitflower.__all__:
        assert getattr(splitflower, name) is not None, name
    package = Path(splitflower.__file__).parent
    subpackages = {p.parent.name for p in package.glob("[!_]*/__init__.py")} | {"algorithms", "strategies"}
    on_disk = {p.stem for p in package.glob("[!_]*.py")} | subpackages
    assert set(splitflower._SUBMODULES) == on_disk
    for name in on_disk:
        assert getattr(splitflower, name).__name__ == f"splitflower.{name}"
    assert set(splitflower.__all__) | on_disk <= set(dir(splitflower))
    with pytest.raises(AttributeError, match="has no attribute 'Clinet'"):
        splitflower.Clinet  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.slow
def test_cli_rejects_bad_input_clearly(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitflower.cli",
            "run",
            "--partition",
            "dirichlet:-1",
            "--clients",
            "0",
            "--dataset",
            "synthetic",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "clients must be at least 1, got 0" in done.stderr
    assert "dirichlet" in done.stderr


def test_config_validation_names_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig(algorithm="nope", model="vgg", rounds=0, lr=-1.0).validate()
    message = str(caught.value)
    for fragment in (
        "algorithm must be one of",
        "model must be one of",
        "rounds must be at least 1",
        "lr must be positive",
    ):
        assert fragment in message
    with pytest.raises(IncompatibleStrategyError):
        from splitflower.algorithms import Algorithm
        from splitflower.algorithms.csl import CSLServerModel

        Algorithm("x", CSLClient, CSLServerModel, "sequential", ("sequential",)).check_strategy("parallel")


def test_config_refuses_numbers_that_are_not_finite_a_negative_seed_and_an_unknown_device() -> None:
    config = ExperimentConfig(lr=math.inf, momentum=math.nan, seed=-1, device="gpu0")
    with pytest.raises(ConfigError) as caught:
        config.validate()
    message = str(caught.value)
    for fragment in (
        "lr must be a finite number",
        "momentum must be a finite number",
        "seed must be in",
        "torch device",
    ):
        assert fragment in message


def test_config_refuses_a_diverging_momentum_and_more_synthetic_examples_than_there_are() -> None:
    with pytest.raises(ConfigError, match=r"momentum must be below 1 \(SGD diverges at 1 or more\), got 2.0"):
        ExperimentConfig(momentum=2.0).validate()
    config = ExperimentConfig(dataset="synthetic", synthetic_size=256, train_size=300, test_size=65)
    with pytest.raises(ConfigError) as caught:
        config.validate()
    assert "train_size must be at most the 256 examples the synthetic dataset of synthetic_size 256" in str(
        caught.value
    )
    assert "test_size must be at most the 64 examples" in str(caught.value)
    Experiment(replace(config, train_size=256, test_size=64))  # the most there are: built


def test_a_partition_that_cannot_be_made_fails_before_any_client_starts() -> None:
    message = r"^4 clients \(--clients\) need a training example each, but --train-size 3 keeps only 3; "
    with pytest.raises(DatasetError, match=message + "give at most 3 clients or a larger --train-size$"):
        Experiment(ExperimentConfig(dataset="synthetic", clients=4, train_size=3))


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_config_refuses_a_device_torch_cannot_allocate_on_here() -> None:
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig(dataset="synthetic", device="mps").validate()
    assert "device 'mps': torch cannot allocate a tensor on it on this machine (" in str(caught.value)
    with pytest.raises(ConfigError, match=r"device 'meta' holds no data"):
        ExperimentConfig(dataset="synthetic", device="meta").validate()


def test_config_refuses_a_cuda_device_this_machine_does_not_have(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\), the last cuda:1"):
        ExperimentConfig(dataset="synthetic", device="cuda:2").validate()
    assert ExperimentConfig(dataset="synthetic", device="cuda:1").validate().device == "cuda:1"


def test_config_refuses_a_data_root_the_dataset_does_not_read() -> None:
    with pytest.raises(ConfigError, match=r"data_root '/data' is given, but dataset 'synthetic' reads no files"):
        ExperimentConfig(dataset="synthetic", data_root="/data").validate()
    assert ExperimentConfig(dataset="cifar10", data_root="/data").validate().data_root == "/data"


def test_a_run_whose_clients_all_failed_exits_1_not_the_bad_input_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(args: Any, run_argv: Any) -> int:
        raise ExperimentFailedError("round(s) [1] trained on no client")

    monkeypatch.setattr(cli, "_run", fail)
    assert cli.main(["run", "--attempts", "1", "--dataset", "synthetic"]) == CRASHED_EXIT_CODE == 1
    assert capsys.readouterr().err == "splitflower: error: round(s) [1] trained on no client\n"


_OWN_PREDICT = """
import torch
from torch import nn
from splitflower.algorithms import Algorithm, CSLClient
from splitflower.server_model import remote
from splitflower.supervised import EMBEDDINGS, SupervisedServerModel

class Uninformed(SupervisedServerModel):
    def __init__(self, model, **kwargs):
        super().__init__(nn.ModuleDict({"top": model, "extra": nn.Linear(1, 1)}), **kwargs)

    @remote(embeddings=EMBEDDINGS)
    @torch.no_grad()
    def predict(self, embeddings):
        return self.model["top"](embeddings) * 0.0  # every logit 0: loss ln(classes), class 0 predicted

UNINFORMED = Algorithm("uninformed", CSLClient, Uninformed, "parallel", ("parallel",))
"""


def test_central_evaluation_runs_the_algorithm_s_own_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "uninformed.py").write_text(_OWN_PREDICT)
    monkeypatch.syspath_prepend(str(tmp_path))
    experiment = Experiment(ExperimentConfig(algorithm="uninformed:UNINFORMED", dataset="synthetic", test_size=200))
    server_weights = ArrayRecord(experiment.make_server_model().get_fit_result().weights)
    client_weights = ArrayRecord(experiment.initial_client_weights())
    before = torch.random.get_rng_state()
    figures = experiment.evaluate(1, client_weights, server_weights)
    assert torch.equal(torch.random.get_rng_state(), before), "evaluating does not reseed the run's RNG"
    assert figures["test_loss"] == pytest.approx(math.log(experiment.test.num_classes))
    assert figures["test_accuracy"] == pytest.approx(float((experiment.test.labels == 0).float().mean()))


def test_a_client_s_error_is_said_as_the_error_its_own_code_raised() -> None:
    # As the strategy says it when a round trained on no client (see test_replies.py).
    traceback = "\x1b[36mTraceback ...\n  ...\nDatasetError: partition 3 is empty\x1b[0m\n"
    assert raised_by_client(traceback) == "DatasetError: partition 3 is empty"
    # Flower's own wrapping of an exception raised in a ClientApp
    wrapped = "<class 'splitflower.errors.ConfigError'>:<'smoothing must be below 1, got 2'>"
    assert raised_by_client(wrapped) == "ConfigError: smoothing must be below 1, got 2"
    # Ray's traceback of a ClientAppException whose cause was the algorithm's own error
    ray = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m\n"
        'Traceback (most recent call last):\n  File "proxy.py", line 327, in _blocking\n'
        "TypeError: new(): invalid data type 'str'\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "splitflower.errors.UnknownMethodError: forward: M.forward does not exist\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "flwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: forward: M.forward does not exist'>"
    )
    assert raised_by_client(ray) == "UnknownMethodError: forward: M.forward does not exist"
    # Flower's wrapper alone (no traceback of the cause) keeps the cause's message, not its type
    bare = "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
    bare += "Message: x < 0'>"
    assert raised_by_client(bare) == "x < 0"


def test_results_are_strict_json_and_a_failed_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "results.json"
    write_results({"final": {"test_loss": math.nan, "test_accuracy": 0.5}}, out)
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == {
        "final": {"test_loss": None, "test_accuracy": 0.5}
    }
    with pytest.raises(ResultsFileError, match="is a directory"):
        write_results({}, tmp_path)
    with pytest.raises(ResultsFileError, match="cannot write"):
        check_results_path(out / "below-a-file.json")
    with pytest.raises(TypeError):
        write_results({"x": object()}, out)  # not JSON: refused before anything is written
    with monkeypatch.context() as patched:
        patched.setattr(Path, "replace", _fail_to_replace)
        with pytest.raises(ResultsFileError, match="cannot write results"):
            write_results({"final": {}}, out)
    assert json.loads(out.read_text())["final"]["test_accuracy"] == 0.5, "the old file stays"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"], "no temporary file is left"


def test_a_results_path_is_checked_without_creating_folders_and_a_failed_write_removes_those_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "new" / "sub" / "results.json"
    assert check_results_path(out) == out
    assert not list(tmp_path.iterdir()), "a check creates nothing"
    with monkeypatch.context() as patched:
        patched.setattr(Path, "replace", _fail_to_replace)
        with pytest.raises(ResultsFileError, match="No space left on device"):
            write_results({}, out)
    assert not list(tmp_path.iterdir()), "the folders made for a failed write are removed"
    assert json.loads(write_results({"final": {}}, out).read_text()) == {"final": {}}


def test_a_results_path_below_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "env.sh").touch()
    for below in ("env.sh/results.json", "env.sh/new/results.json"):
        message = f"cannot write results to '{tmp_path / below}': '{tmp_path / 'env.sh'}' is not a directory"
        with pytest.raises(ResultsFileError, match=re.escape(message) + "$"):
            check_results_path(tmp_path / below)


def _fail_to_replace(self: Path, target: Path) -> Path:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("strategy", ["parallel", "splitfed-v2"])
def test_only_a_strategy_that_hands_segments_on_hands_optimizers_on(strategy: str) -> None:
    with pytest.raises(ConfigError, match=f"hands the client segment on \\(sequential\\), got '{strategy}'"):
        ExperimentConfig(algorithm="csl", strategy=strategy, hand_over_optimizer=True).validate()
    config = ExperimentConfig(algorithm="csl", strategy="sequential", hand_over_optimizer=True).validate()
    assert config.hand_over_optimizer


class NeverTrains(CSLClient):
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise ValueError("no data today")


def test_a_strategy_stops_at_a_round_no_client_trained_in() -> None:
    config = ExperimentConfig(algorithm="csl", dataset="synthetic", clients=2, rounds=2, train_size=64).validate()
    with pytest.raises(RuntimeError) as raised:
        simulate(config, NeverTrains)
    error = raised.value.__cause__
    assert isinstance(error, ExperimentFailedError), raised.value
    assert re.search(r"round 1 trained on no client \(2 failed or were left out\).*no data today$", str(error))


class DiesAfterTwoBatches(CSLClient):
    """A CSL client whose second partition crashes mid-round (raising ``crash``)."""

    crash: type[BaseException] = RuntimeError

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        self.steps = getattr(self, "steps", 0) + 1
        if self.config.get(ConfigKey.CLIENT_INDEX) == 1 and self.steps > 2:
            raise self.crash("client crashed")
        return super().train_step(x, y)


class ExitsAfterTwoBatches(DiesAfterTwoBatches):
    """Ends its process instead (under Ray the actor dies; the node still gets an error reply)."""

    crash = SystemExit


_TWO_CLIENTS_BATCHED = ExperimentConfig(
    algorithm="csl",
    strategy="parallel",
    dataset="synthetic",
    clients=2,
    rounds=1,
    batching=True,
    synthetic_size=512,  # 2 clients x 4 batches of 64
)


@pytest.mark.parametrize("client", [DiesAfterTwoBatches, ExitsAfterTwoBatches], ids=["raises", "exits"])
def test_client_dying_mid_round_under_batching_still_finishes_the_round(client: type[DiesAfterTwoBatches]) -> None:
    config = replace(_TWO_CLIENTS_BATCHED, flush_timeout=0.5)
    records = [summarise_round(r) for r in simulate(config, client)]
    assert len(records) == 1
    round_one = records[0]
    assert len(round_one["failed_clients"]) == 1
    assert "client crashed" in next(c["error"] for c in round_one["clients"] if "error" in c)
    assert round_one["num_examples"] == 256  # the surviving client's whole partition
    assert 0.0 <= round_one["test_accuracy"] <= 1.0


class SecondIsSlow(CSLClient):
    """A CSL client that, as client 1, takes longer over each batch than the flush timeout."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        if self.config.get(ConfigKey.CLIENT_INDEX) == 1:
            time.sleep(0.25)
        return super().train_step(x, y)


def test_batched_rounds_say_how_whole_their_batches_were(caplog: pytest.LogCaptureFixture) -> None:
    config = ExperimentConfig(
        algorithm="csl", strategy="parallel", dataset="synthetic", clients=2, rounds=1, batching=True
    )
    whole = replace(config, flush_timeout=30.0, synthetic_size=512)  # 2 clients x 4 batches of 64
    (batching,) = [server["batching"] for server in simulate(whole, CSLClient)[0]["server_models"]]
    assert batching == {"calls": 4, "requests": 8, "timeout_flushes": 0}
    assert "flush timeout" not in caplog.text
    slow = replace(config, flush_timeout=0.05, synthetic_size=256)
    (batching,) = [server["batching"] for server in simulate(slow, SecondIsSlow)[0]["server_models"]]
    assert batching["timeout_flushes"] >= 1 and batching["requests"] == 4 < 2 * batching["calls"], batching
    assert "batched calls ran on the flush timeout (0.05 s) without every client's request" in caplog.text


class SecondCannotStart(CSLClient):
    """A CSL client that fails to start as partition 1: before its proxy exists, so it tells
    its server model nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("client_id") == 1:
            raise RuntimeError("client crashed before training")
        super().__init__(*args, **kwargs)


def test_a_client_that_fails_before_it_starts_holds_no_batch_till_the_flush_timeout() -> None:
    # Its error reply closes its session as it comes: without that, the first batch would wait
    # the flush timeout for it (a timeout flush), and the round 60 s.
    (record,) = simulate(replace(_TWO_CLIENTS_BATCHED, flush_timeout=60.0), SecondCannotStart)
    (batching,) = [server["batching"] for server in record["server_models"]]
    assert batching == {"calls": 4, "requests": 4, "timeout_flushes": 0}
    assert len(summarise_round(record)["failed_clients"]) == 1


class RepliesLate(CSLClient):
    """A CSL client that starts training only after the round's timeout if its index is
    ``late_index``."""

    late_index = 0

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        if config.get(ConfigKey.CLIENT_INDEX) == self.late_index:
            time.sleep(LATE_BY_S)
        return super().fit(weights, config)


class FirstRepliesLate(RepliesLate):
    late_index = 0


class SecondRepliesLate(RepliesLate):
    late_index = 1


ROUND_TIMEOUT_S, LATE_BY_S = 3.0, 4.0  # the punctual clients need well under a second


# Sequential: the late client is the first, so that the next one trains after it timed out (in
# turn: this simulation has one worker, so the next client starts when the late one's sleep ends).
@pytest.mark.parametrize(("strategy", "client"), [("parallel", SecondRepliesLate), ("sequential", FirstRepliesLate)])
def test_a_client_that_does_not_reply_in_time_is_recorded_as_failed_and_the_round_goes_on(
    strategy: str, client: type[RepliesLate], caplog: pytest.LogCaptureFixture
) -> None:
    config = ExperimentConfig(
        algorithm="csl", strategy=strategy, dataset="synthetic", clients=2, rounds=1, synthetic_size=256
    )
    with caplog.at_level("WARNING", logger="splitflower.strategy"):
        (record,) = simulate(config.validate(), client, round_timeout=ROUND_TIMEOUT_S)
    round_one = summarise_round(record)
    (late,) = [c for c in round_one["clients"] if "error" in c]
    assert round_one["failed_clients"] == [late["node_id"]] and late["index"] == client.late_index
    assert "no reply before the round's timeout" in late["error"]
    punctual = config.synthetic_size // 2
    assert round_one["num_examples"] == punctual
    # Its session was closed at the timeout: the late client, training on, reached no server model.
    assert sum(s["num_examples"] for s in round_one["server_models"]) == punctual
    assert f"round 1: client {late['node_id']}: no reply" in caplog.text


class _IdleServerModel:
    def __init__(self, num_examples: int) -> None:
        self.num_examples = num_examples


class _FakeStrategy:
    def __init__(self, num_examples: int) -> None:
        self.server_models = [_IdleServerModel(num_examples)]


@pytest.mark.parametrize(("trained", "stalls"), [(0, 1), (5, 0)])
def test_progress_reports_a_start_that_never_reaches_a_server_model_once(trained: int, stalls: int) -> None:
    said: list[str] = []
    stalled: list[str] = []
    progress = _Progress(
        _FakeStrategy(trained),  # type: ignore[arg-type]
        total=10,
        rounds=1,
        say=said.append,
        every=0.01,
        startup_timeout=0.05,
        on_stall=stalled.append,
    )
    with progress:
        time.sleep(0.4)
    assert len(stalled) == stalls
    if stalls:
        assert "Ray's local node most likely failed to start" in stalled[0]
    assert said, "progress lines keep coming while the round runs"


@pytest.mark.parametrize(("trained", "line"), [(0, "no example has reached a server model yet"), (5, "5/10")])
def test_progress_says_whether_any_example_has_reached_a_server_model(trained: int, line: str) -> None:
    said: list[str] = []
    with _Progress(_FakeStrategy(trained), total=10, rounds=1, say=said.append, every=0.01):  # type: ignore[arg-type]
        time.sleep(0.1)
    assert said and all(line in s for s in said), said


def _output_once_it_ends(process: subprocess.Popen[str], after: str) -> tuple[str, str]:
    """The stdout and stderr of ``process``, which must end within a minute of ``after``."""
    try:
        return process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the run did not end within 60 s of {after}")


def _fake_run_script(tmp_path: Path, fake_simulation: str) -> Path:
    """A script running `splitflower` whose Flower run_simulation is ``fake_simulation`` (source
    defining ``def fake_simulation(**kwargs)``), each attempt in a fresh interpreter running it."""
    script = tmp_path / "fake_run.py"
    script.write_text(
        f"import sys, threading, time, flwr.simulation\n{fake_simulation}\n"
        "flwr.simulation.run_simulation = fake_simulation\n"
        "import splitflower.cli\n"
        "splitflower.cli._ATTEMPT_COMMAND = (sys.executable, __file__)\n"
        "raise SystemExit(splitflower.cli.main(sys.argv[1:]))\n"
    )
    return script


def _cli_over_fake_simulation(
    tmp_path: Path, fake_simulation: str, *options: str, attempts: int = 1
) -> subprocess.CompletedProcess[str]:
    """`splitflower run` over :func:`_fake_run_script`; it must end well within its 110 s."""
    script = _fake_run_script(tmp_path, fake_simulation)
    command = ["run", "--dataset", "synthetic", "--clients", "1", "--rounds", "1", "--attempts", str(attempts)]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script), *command, *options], capture_output=True, text=True, timeout=110, check=False
    )
    assert time.monotonic() - started < 100
    return done


@pytest.mark.slow
def test_cli_exits_when_the_simulation_never_starts(tmp_path: Path) -> None:
    # Stand in for Flower's simulation hanging after Ray's node failed to start.
    hang = "def fake_simulation(**kwargs):\n    time.sleep(120)"
    done = _cli_over_fake_simulation(tmp_path, hang, "--startup-timeout", "1")
    assert done.returncode == STALLED_EXIT_CODE, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no client reached a server model" in done.stderr


@pytest.mark.slow
def test_cli_starts_a_simulation_that_crashed_before_any_client_again_in_a_fresh_process(tmp_path: Path) -> None:
    # Stand in for Flower after Ray failed to start: run_simulation raises, and the ServerApp
    # thread it started (not a daemon) keeps waiting for replies.
    crash = (
        "def fake_simulation(**kwargs):\n"
        "    print('attempt in process', __import__('os').getpid(), flush=True)\n"
        "    threading.Thread(target=time.sleep, args=(120,)).start()\n"
        "    raise RuntimeError('Simulation Runtime crashed.')"
    )
    done = _cli_over_fake_simulation(tmp_path, crash, attempts=2)
    assert done.returncode == STALLED_EXIT_CODE, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.count("RuntimeError: Simulation Runtime crashed.") == 2, "each attempt shows the traceback"
    assert "before any client reached a server model" in done.stderr
    assert "the simulation did not start (attempt 1 of 2); starting it again in a fresh process" in done.stderr
    assert "attempt 2 of 2" not in done.stderr, "no third attempt"
    processes = {line.split()[-1] for line in done.stdout.splitlines() if line.startswith("attempt in process")}
    assert len(processes) == 2, "each attempt runs in a process of its own"


@pytest.mark.slow
def test_cli_reports_an_error_of_the_server_app_at_once_without_retrying(tmp_path: Path) -> None:
    (tmp_path / "bad_algorithm.py").write_text(
        "from splitflower.algorithms import Algorithm, CSLClient, CSLServerModel\n"
        "class Unbuildable(CSLServerModel):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise TypeError('this server model cannot be built')\n"
        "BAD = Algorithm('bad', CSLClient, Unbuildable)\n"
    )
    command = [sys.executable, "-m", "splitflower.cli", "run", "--algorithm", "bad_algorithm:BAD"]
    done = run_cli([*command, "--dataset", "synthetic", "--train-size", "64", "--clients", "1"], cwd=tmp_path)
    assert done.returncode == CRASHED_EXIT_CODE, done.stdout[-2000:] + done.stderr[-2000:]
    assert "TypeError: this server model cannot be built" in done.stderr
    assert "did not start" not in done.stderr, "a bug of the user's is not Ray failing to start"


@pytest.mark.slow
def test_terminating_splitflower_run_stops_its_attempt_as_ctrl_c_does(tmp_path: Path) -> None:
    # As `kill`, `timeout` or `docker stop` do: SIGTERM to the command started, not to its attempt.
    thread_simulation = _THREAD_SIMULATION.format(tests=str(Path(__file__).parent))
    says_its_process = "\nprint('attempt in process', __import__('os').getpid(), flush=True)"
    script = _fake_run_script(tmp_path, thread_simulation + says_its_process)
    out = tmp_path / "results.json"
    options = ["--dataset", "synthetic", "--clients", "2", "--rounds", "500", "--train-size", "256", "--out", str(out)]
    command = [sys.executable, str(script), "run", *options, "--attempts", "2"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        child = 0
        for line in parent.stdout:
            if line.startswith("attempt in process"):
                child = int(line.split()[-1])
            if line.startswith("round 2/500"):
                break
        parent.send_signal(signal.SIGTERM)
        stdout, stderr = _output_once_it_ends(parent, "SIGTERM")
    assert parent.returncode == INTERRUPTED_EXIT_CODE, stdout[-2000:] + stderr[-2000:]
    assert load_results(tmp_path / "results.partial.json")["incomplete"]["rounds_recorded"] >= 2
    assert child, "the attempt said its process"
    with pytest.raises(ProcessLookupError):  # the attempt ended with the command
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


def test_cli_refuses_a_startup_timeout_that_is_not_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--startup-timeout", "0"])
    assert "expected a positive number of seconds, got '0'" in capsys.readouterr().err


def test_a_failed_round_s_own_error_is_reported_when_closing_the_proxy_fails_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class FailsToFit(CSLClient):
        def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
            raise ValueError("the round's own failure")

    class Unreachable:
        def close(self) -> None:
            raise ServerUnavailableError("<finish>: split-learning service unreachable")

    client = FailsToFit(torch.nn.Linear(4, 3), synthetic(8, 8, num_classes=3, input_shape=(1, 2, 2))[0])
    with pytest.raises(ValueError, match="the round's own failure"):
        _fit_then_close(client, Unreachable(), ArrayRecord(), {})  # type: ignore[arg-type]
    assert "closing the proxy after a failed round failed too: <finish>: split-learning service" in caplog.text


def test_weights_that_fail_to_load_still_close_the_proxy() -> None:
    class Closes:
        closed = False

        def close(self) -> None:
            self.closed = True

    unloadable = ArrayRecord({"w": Array(dtype="float32", shape=(1,), stype="not-numpy", data=bytes(4))})
    client = CSLClient(torch.nn.Linear(4, 3), synthetic(8, 8, num_classes=3, input_shape=(1, 2, 2))[0])
    proxy = Closes()
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        _fit_then_close(client, proxy, unloadable, {})  # type: ignore[arg-type]
    assert proxy.closed, "its server model would wait for it till the flush timeout"


_FAILS_IN_ROUND_2 = """
from splitflower.algorithms import Algorithm, CSLClient
from splitflower.algorithms.csl import CSLServerModel
from splitflower.wire import ConfigKey

from splitflower.strategies import ParallelStrategy

class FailsInRound2(CSLServerModel):
    def configure_fit(self, weights, config):
        if config[ConfigKey.SERVER_ROUND] == 2:  # central evaluation says the round too
            raise RuntimeError("the server model's disk is full")
        super().configure_fit(weights, config)

FAILS = Algorithm("fails-in-round-2", CSLClient, FailsInRound2, "parallel", ("parallel",))

class ClientFailsInRound2(CSLClient):
    def fit(self, weights, config):
        if config[ConfigKey.SERVER_ROUND] == 2:
            raise RuntimeError("the client's disk is full")
        return super().fit(weights, config)

CLIENTS_FAIL = Algorithm("clients-fail-in-round-2", ClientFailsInRound2, CSLServerModel, "parallel", ("parallel",))

class NoSuchServerModel(ParallelStrategy):
    def assign(self, index, num_clients):
        return 5
"""


def test_a_run_that_fails_midway_keeps_the_rounds_it_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fails_in_round_2.py").write_text(_FAILS_IN_ROUND_2)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(
        algorithm="fails_in_round_2:FAILS", dataset="synthetic", clients=2, rounds=3, train_size=128, test_size=64
    ).validate()
    kept: list[tuple[ExperimentConfig, SplitResult]] = []
    with pytest.raises(ExperimentFailedError) as raised:
        run_experiment(config, say=lambda _: None, keep_model=lambda *kept_now: kept.append(kept_now))
    (kept_config, recorded), *_ = kept  # the weights after the last round recorded
    assert kept_config == config and list(recorded.rounds) == [1] and len(kept) == 1
    initial = Experiment(config).initial_client_weights()
    trained = recorded.arrays.to_torch_state_dict()
    assert not all(torch.equal(trained[name], initial[name]) for name in initial), "round 1's weights, trained"
    message = "the run stopped after 1 of 3 rounds: RuntimeError: the server model's disk is full"
    assert str(raised.value) == message
    partial = raised.value.partial_results
    assert partial is not None
    assert [entry["round"] for entry in partial["rounds"]] == [1]
    assert partial["incomplete"] == {
        "error": message.split(": ", 1)[1],
        "rounds_recorded": 1,
        "rounds_planned": 3,
        "last_round": 1,
    }
    assert partial["rounds"][0]["num_examples"] == 128
    # Resumed from round 1's weights, it fails in round 2 again: no new round, so no partial file
    # (it would only repeat the saved run's rounds), as in the example app.
    saved = load_model(save_model(tmp_path / "round-1.pt", config, recorded))
    with pytest.raises(ExperimentFailedError, match="the run stopped after 1 of 3 rounds") as again:
        run_experiment(config, say=lambda _: None, resume=saved)
    assert again.value.partial_results is None

    # The CLI keeps them beside the results file it was asked for (which it never writes), then
    # ends its process: the ServerApp's thread may still be waiting for replies.
    out = tmp_path / "runs" / "results.json"
    ended = _end_the_cli_process_with(raised.value, monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["run", "--attempts", "1", "--dataset", "synthetic", "--out", str(out)])
    assert ended == [(CRASHED_EXIT_CODE, f"splitflower: error: {message}")]
    shown = capsys.readouterr()
    assert "Traceback (most recent call last)" in shown.err, "where the server model's code raised is shown"
    assert f"written to {out.with_name('results.partial.json')} (marked incomplete)" in shown.out
    on_disk = load_results(out.with_name("results.partial.json"))
    assert on_disk["incomplete"]["rounds_recorded"] == 1 and on_disk["rounds"] == partial["rounds"]
    assert not out.exists()

    interrupted = RunInterruptedError("interrupted after 1 of 3 rounds", partial)
    ended = _end_the_cli_process_with(interrupted, monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["run", "--attempts", "1", "--dataset", "synthetic"])
    assert ended == [(INTERRUPTED_EXIT_CODE, "splitflower: interrupted after 1 of 3 rounds")]
    assert "the 1 recorded round(s) are not kept (give --out FILE.json to keep them)" in capsys.readouterr().out
    assert isinstance(interrupted, KeyboardInterrupt), "no `except Exception` swallows a user's Ctrl-C"
    copied = pickle.loads(pickle.dumps(interrupted))
    assert copied.partial_results == partial and str(copied) == str(interrupted)

    # Nothing that goes wrong while keeping them (a closed pipe, a second Ctrl-C) keeps the process alive.
    for trouble in (BrokenPipeError(32, "Broken pipe"), KeyboardInterrupt()):
        ended = _end_the_cli_process_with(raised.value, monkeypatch)
        monkeypatch.setattr(cli, "_keep_partial_results", _raiser(trouble))
        with pytest.raises(SystemExit):
            cli.main(["run", "--attempts", "1", "--dataset", "synthetic", "--out", str(out)])
        assert ended == [(CRASHED_EXIT_CODE, f"splitflower: error: {message}")]


def _raiser(error: BaseException) -> Any:
    def fail(*_: Any, **__: Any) -> None:
        raise error

    return fail


def test_a_strategy_that_fails_before_any_round_is_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fails_in_round_2.py").write_text(_FAILS_IN_ROUND_2)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(
        strategy="fails_in_round_2:NoSuchServerModel", dataset="synthetic", clients=2, rounds=2, train_size=64
    ).validate()
    with pytest.raises(ConfigError, match=r"^NoSuchServerModel.assign\(0, 2\) returned 5"):
        run_experiment(config, say=lambda _: None)


def _end_the_cli_process_with(error: BaseException, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Make the run raise ``error`` and record how its process would end."""
    ended: list[tuple[int, str]] = []

    def end_process(code: int, message: str) -> None:
        ended.append((code, message))
        raise SystemExit(code)

    def run(*_: Any, **__: Any) -> dict[str, Any]:
        raise error

    monkeypatch.setattr(simulation, "_end_process", end_process)
    monkeypatch.setattr(simulation, "run_experiment", run)
    return ended


def test_partial_results_sit_beside_the_results_file() -> None:
    assert partial_results_path("runs/dsl.json") == Path("runs/dsl.partial.json")
    assert partial_results_path("dsl") == Path("dsl.partial.json")
    error = stopped_early(ExperimentConfig(rounds=5), [], 1.0, ValueError("bad"))
    assert error.partial_results is None and str(error) == "the run stopped after 0 of 5 rounds: ValueError: bad"


_THREAD_SIMULATION = """
import sys
from unittest import mock
sys.path.insert(0, {tests!r})
from conftest import ThreadBackend
from flwr.simulation.run_simulation import run_simulation as real_simulation

def fake_simulation(**kwargs):
    with mock.patch("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend):
        real_simulation(**kwargs)
"""


@pytest.mark.slow
def test_ctrl_c_ends_a_run_at_once_keeping_the_rounds_it_recorded(tmp_path: Path) -> None:
    # Flower's simulation on threads (Ray's start-up aside, the same runtime): Ctrl-C reaches
    # its main thread while the ServerApp's thread goes on waiting for replies.
    script = _fake_run_script(tmp_path, _THREAD_SIMULATION.format(tests=str(Path(__file__).parent)))
    out, model = tmp_path / "results.json", tmp_path / "model.pt"
    options = ["--dataset", "synthetic", "--clients", "2", "--rounds", "500", "--train-size", "256", "--out", str(out)]
    options += ["--save-model", str(model)]
    command = [sys.executable, str(script), "run", *options, "--attempts", "1"]
    # As from a terminal: Ctrl-C is not ignored there, as it is in a job a script started with `&`.
    as_at_a_terminal = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_at_a_terminal
    ) as run:
        assert run.stdout is not None
        for line in run.stdout:
            if line.startswith("round 2/500"):
                break
        run.send_signal(signal.SIGINT)
        started = time.monotonic()
        stdout, stderr = _output_once_it_ends(run, "Ctrl-C")
    assert run.returncode == INTERRUPTED_EXIT_CODE == 130, stdout[-2000:] + stderr[-2000:]
    assert time.monotonic() - started < 30
    assert re.search(r"splitflower: interrupted after \d+ of 500 rounds", stderr), stderr[-2000:]
    partial = load_results(tmp_path / "results.partial.json")
    assert partial["incomplete"]["error"] == "interrupted (KeyboardInterrupt)"
    assert partial["incomplete"]["rounds_recorded"] >= 2 and not out.exists()
    saved = load_model(model).rounds
    assert saved == partial["incomplete"]["rounds_recorded"], "the weights of the last round recorded are kept too"


_RAY_LIKE_SIMULATION = (
    _THREAD_SIMULATION
    + """
import signal
threads_simulation = fake_simulation

def fake_simulation(**kwargs):
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as Ray's driver does
    threads_simulation(**kwargs)
"""
)


@pytest.mark.slow
def test_sigterm_to_the_run_s_own_process_stops_it_as_ctrl_c_does_however_often_it_comes(tmp_path: Path) -> None:
    # `timeout` and Slurm signal the whole process group: with --attempts 1 that is the run's
    # process, which may get a second SIGTERM while it keeps what it recorded.
    script = _fake_run_script(tmp_path, _RAY_LIKE_SIMULATION.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "results.json"
    options = ["--dataset", "synthetic", "--clients", "2", "--rounds", "500", "--train-size", "256", "--out", str(out)]
    command = [sys.executable, str(script), "run", *options, "--attempts", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        assert run.stdout is not None
        for line in run.stdout:
            if line.startswith("round 2/500"):
                break
        for _ in range(3):
            run.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        stdout, stderr = _output_once_it_ends(run, "SIGTERM")
    assert run.returncode == INTERRUPTED_EXIT_CODE, stdout[-2000:] + stderr[-2000:]
    partial = load_results(tmp_path / "results.partial.json")
    assert partial["incomplete"]["error"] == "interrupted (KeyboardInterrupt)", "not the progress file of a killed run"
    assert partial["incomplete"]["rounds_recorded"] >= 2 and not out.exists()


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_weights_written_after_its_last_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _fake_run_script(tmp_path, _THREAD_SIMULATION.format(tests=str(Path(__file__).parent)))
    model, killed = tmp_path / "model.pt", tmp_path / "killed.json"
    options = ["--dataset", "synthetic", "--clients", "2", "--rounds", "500", "--train-size", "256"]
    command = [sys.executable, str(script), "run", *options, "--save-model", str(model), "--attempts", "1"]
    command += ["--out", str(killed)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True) as run:
        assert run.stdout is not None
        said = 0
        for line in run.stdout:
            if line.startswith("round "):
                said = int(line.split()[1].split("/")[0])
                if said == 3:
                    break
        os.killpg(run.pid, signal.SIGKILL)  # as a power cut would: nothing of the run's own runs after it
        run.communicate(timeout=60)
    saved = load_model(model)
    assert said == 3 and saved.rounds >= 3, "the weights of every round said are on disk"
    assert [entry["round"] for entry in saved.history] == list(range(1, saved.rounds + 1))
    # The rounds too, as they were written after each round (not the weights' round, the one before it).
    so_far = load_results(tmp_path / "killed.partial.json")
    assert not killed.exists() and so_far["incomplete"]["error"] == NOT_ENDED
    assert so_far["rounds"] == list(saved.history[: len(so_far["rounds"])]) and len(so_far["rounds"]) >= 3
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    out, last = tmp_path / "resumed.json", saved.rounds + 1
    resumed = ["run", "--attempts", "1", "--resume", str(model), "--rounds", str(last), "--save-model", str(model)]
    assert cli.main([*resumed, "--out", str(out)]) == 0
    assert [entry["round"] for entry in load_results(out)["rounds"]] == list(range(1, last + 1))
    assert load_model(model).rounds == last
    assert not (tmp_path / "resumed.partial.json").exists(), "a run that ended well leaves only its results"


def test_the_rounds_so_far_are_handed_on_after_every_round_but_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(algorithm="csl", dataset="synthetic", clients=2, rounds=3, train_size=128, test_size=64)
    so_far: list[dict[str, Any]] = []
    results = run_experiment(config, say=lambda _: None, keep_progress=so_far.append)
    assert [[r["round"] for r in document["rounds"]] for document in so_far] == [[1], [1, 2]]
    for document in so_far:
        assert document["incomplete"] == {
            "error": NOT_ENDED,
            "rounds_recorded": len(document["rounds"]),
            "rounds_planned": 3,
            "last_round": len(document["rounds"]),
        }
        assert document["rounds"] == results["rounds"][: len(document["rounds"])]
        assert document["config"] == results["config"] and document["clients_at_once"] == 2
    assert "incomplete" not in results


def test_a_round_that_stops_the_run_is_recorded_but_its_weights_are_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fails_in_round_2.py").write_text(_FAILS_IN_ROUND_2)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(
        algorithm="fails_in_round_2:CLIENTS_FAIL", dataset="synthetic", clients=2, rounds=3, train_size=128
    )
    written: list[tuple[str, int]] = []
    with pytest.raises(ExperimentFailedError, match="round 2 trained on no client") as raised:
        run_experiment(
            config,
            say=lambda _: None,
            keep_model=lambda _, result: written.append(("end", result.last_round)),
            checkpoint=lambda _, result: written.append(("after round", result.last_round)),
        )
    assert written == [("after round", 1), ("end", 1)], "round 2's weights are never written"
    assert raised.value.partial_results is not None
    assert [entry["round"] for entry in raised.value.partial_results["rounds"]] == [1, 2], "but it is recorded"


def test_weights_are_written_after_every_kth_round_and_at_the_end(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(dataset="synthetic", clients=2, rounds=5, train_size=128, test_size=64)
    written: list[tuple[str, int]] = []
    run_experiment(
        config,
        say=lambda _: None,
        keep_model=lambda _, result: written.append(("end", result.last_round)),
        checkpoint=lambda _, result: written.append(("after round", result.last_round)),
        checkpoint_every=2,
    )
    assert written == [("after round", 2), ("after round", 4), ("end", 5)]
    with pytest.raises(ConfigError, match="checkpoint_every must be a whole number >= 1, got 0"):
        run_experiment(config, checkpoint_every=0)

    # A write after a round that fails (a full disk) is said, and the run goes on.
    def disk_full(_: ExperimentConfig, result: SplitResult) -> None:
        raise ResultsFileError(f"cannot write the model after round {result.last_round}: no space left")

    with caplog.at_level(logging.WARNING):
        results = run_experiment(replace(config, rounds=2), say=lambda _: None, checkpoint=disk_full)
    assert [entry["round"] for entry in results["rounds"]] == [1, 2]
    assert "the weights after round 1 are not kept: cannot write the model after round 1" in caplog.text
    assert cli.main(["run", "--attempts", "1", "--dataset", "synthetic", "--save-every", "2"]) == 2
    assert "--save-every says how often --save-model writes the weights; give --save-model" in capsys.readouterr().err


def test_a_resumed_run_that_stops_counts_the_rounds_of_the_run_it_resumed() -> None:
    config = ExperimentConfig(dataset="synthetic", rounds=5).validate()
    resumed = {"resumed_from": {"path": "saved.pt", "rounds": 2}}
    error = stopped_early(config, [{"round": 3, "test_accuracy": 0.5}], 1.0, RuntimeError("disk full"), **resumed)
    assert str(error) == "the run stopped after 3 of 5 rounds: RuntimeError: disk full"
    assert error.partial_results is not None
    assert error.partial_results["incomplete"]["last_round"] == 3
    assert error.partial_results["resumed_from"] == resumed["resumed_from"]
    interrupted = stopped_early(config, [], 1.0, KeyboardInterrupt(), **resumed)
    assert str(interrupted) == "interrupted after 2 of 5 rounds" and interrupted.partial_results is None


_ONE_CLIENT_BREAKS = """
from splitflower.algorithms import Algorithm, CSLClient, CSLServerModel

class BreaksOnSecond(CSLClient):
    def train_step(self, x, y):
        if self.client_id == 1:
            raise ValueError("no data on this device")
        return super().train_step(x, y)

BREAKS = Algorithm("breaks", BreaksOnSecond, CSLServerModel, "sequential", ("sequential",))
"""


def test_each_round_s_line_names_the_clients_that_failed_and_what_they_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "breaks.py").write_text(_ONE_CLIENT_BREAKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(algorithm="breaks:BREAKS", dataset="synthetic", clients=2, rounds=2, train_size=128)
    said: list[str] = []
    results = run_experiment(replace(config, test_size=64), say=said.append)
    assert [len(entry["failed_clients"]) for entry in results["rounds"]] == [1, 1]
    failures = [line for line in said if "failed" in line]
    # (on Ray, whose traceback names the error's type: "ValueError: no data on this device")
    assert failures == ["  client 1 failed: no data on this device"] * 2, said
    assert said.index(failures[0]) == 1 + next(i for i, line in enumerate(said) if line.startswith("round 1/2"))


def test_a_round_line_names_only_the_failures_the_strategy_s_log_does_not() -> None:
    clients = [
        {"node_id": 11, "index": 0, "error": "<class 'ValueError'>:<'bad batch'>"},
        {"node_id": 12, "index": 1, "error": NO_REPLY},  # logged by the strategy as it happens
        {"node_id": 13, "index": 2, "left_out": "no ArrayRecord"},  # likewise
        {"node_id": 14, "index": -1, "error": "RuntimeError: lost"},
    ]
    assert simulation._failure_lines({"clients": clients}) == [
        "  client 0 failed: ValueError: bad batch",
        "  node 14 failed: RuntimeError: lost",
    ]


def test_a_run_whose_clients_do_not_all_fit_in_memory_trains_them_fewer_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    monkeypatch.setattr(simulation, "clients_at_once_in_memory", lambda wanted: (2, f"only 2 of {wanted}"))
    config = ExperimentConfig(algorithm="csl", dataset="synthetic", clients=3, rounds=1, train_size=192, test_size=64)
    said: list[str] = []
    results = run_experiment(config, say=said.append)
    assert results["clients_at_once"] == 2
    assert [line for line in said if line.startswith("splitflower: warning: only 2 of 3")], said
    (entry,) = results["rounds"]
    assert entry["num_examples"] == 192 and not entry["failed_clients"], "the third client trained after one finished"
    (server,) = entry["server_models"]
    assert server["in_client_order"]["requests"] == 3 and server["in_client_order"]["timeout_flushes"] >= 1
    # Told how many fit, the run trusts it: every client trains at once again, and every cycle is whole.
    said.clear()
    results = run_experiment(replace(config, flush_timeout=30.0), say=said.append, clients_at_once=3)
    assert results["clients_at_once"] == 3 and not [line for line in said if "warning" in line]
    assert results["rounds"][0]["server_models"][0]["in_client_order"]["timeout_flushes"] == 0
    with pytest.raises(ConfigError, match="clients_at_once must be a whole number >= 1, got 0"):
        run_experiment(config, clients_at_once=0)


def test_the_cli_s_defaults_and_choices_are_the_config_s() -> None:
    from splitflower.cli import build_parser
    from splitflower.scheduling import REQUEST_ORDERS

    parser = build_parser()
    args = parser.parse_args(["run"])
    defaults = ExperimentConfig()
    differing = {
        f.name: (getattr(args, f.name), getattr(defaults, f.name))
        for f in fields(ExperimentConfig)
        if hasattr(args, f.name) and getattr(args, f.name) != getattr(defaults, f.name)
    }
    assert differing == {}, "the CLI's default differs from ExperimentConfig's (CLI, config)"
    for order in REQUEST_ORDERS:
        assert parser.parse_args(["run", "--request-order", order]).request_order == order


def _grpc_imported_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if grpc had been imported before splitflower, nothing said of it yet."""
    monkeypatch.setattr(_fork, "_left_on", True)
    monkeypatch.setattr(_fork, "_warned", False)


def test_a_run_in_a_process_that_imported_grpc_first_warns_of_gRPCs_fork_handlers_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    config = ExperimentConfig(algorithm="dsl", dataset="synthetic", clients=1, rounds=1, train_size=64, test_size=32)
    said: list[str] = []
    run_experiment(config, say=said.append)
    assert not [line for line in said if "fork handlers" in line], said
    _grpc_imported_first(monkeypatch)
    run_experiment(config, say=said.append)
    run_experiment(config, say=said.append)
    (warning,) = [line for line in said if "fork handlers" in line]
    assert warning.startswith("splitflower: warning:") and f"{_fork.GRPC_FORK_SUPPORT_ENV}=0" in warning
    assert "fork handlers" not in caplog.text  # said by the CLI's run, not logged by its ServerApp as well


def test_a_flower_server_app_logs_the_fork_handlers_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As under `flwr run`, whose processes import grpc long before the app.
    _grpc_imported_first(monkeypatch)
    config = ExperimentConfig(algorithm="dsl", dataset="synthetic", clients=1, rounds=1, train_size=64, test_size=32)
    with caplog.at_level(logging.WARNING, logger="splitflower.app"):
        simulate(config)
    (warning,) = [r.getMessage() for r in caplog.records if "fork handlers" in r.getMessage()]
    assert warning.startswith("[server] grpc was imported before splitflower"), warning
    assert f"{_fork.GRPC_FORK_SUPPORT_ENV}=0" in warning


def test_a_server_app_under_the_deployment_runtime_does_not_warn_of_fork_handlers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its process forks nothing, and Flower starts its own processes by vfork: no handler runs.
    from flwr.superlink.grid.http_grid import HttpGrid  # the deployment runtime's grid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the simulation's

    _grpc_imported_first(monkeypatch)
    assert _fork_handlers_warning(HttpGrid.__new__(HttpGrid)) is None
    assert "fork handlers" in (_fork_handlers_warning(InMemoryGrid.__new__(InMemoryGrid)) or "")
