"""Algorithms end to end through `splitflower run`, tiny and synthetic.

Every algorithm runs under its own strategy in test_flower_app_algorithms.py on Flower's
runtime with the clients on threads. On Ray, locfedmix (batched) and streamsl (splitfed-v1)
run there under `flwr run`, dsl (sequential, and parallel in a deployment) in
test_flower_apps.py, and csl's server model in the user's algorithm below. Each Ray
simulation costs about 20 s here (CI's --durations report shows it), so the cases here add
what those lack: the sequential strategy and dsl's options from the CLI (in this process, the
clients on threads: the CLI's path is the point, and its start under Ray is tested below),
and an algorithm and a strategy of the user's own, on Ray, whose actors must import the
user's module.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from conftest import ThreadBackend, run_cli
from splitflower import cli

CASES = [
    ("dsl", "sequential", ["--option", "lam=0.5", "--option", "head=mlp"]),
]


@pytest.mark.parametrize(("algorithm", "strategy", "extra"), CASES, ids=[f"{a}-{s}" for a, s, _ in CASES])
def test_splitflower_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str, strategy: str, extra: list[str]
) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    out = tmp_path / "results.json"
    argv = ["run", "--attempts", "1", "--algorithm", algorithm, "--strategy", strategy, "--dataset", "synthetic"]
    argv += ["--train-size", "192", "--clients", "2", "--rounds", "1", *extra, "--out", str(out)]
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(argv) == 0
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler, "a run in this process leaves its handler as it was"
    results = json.loads(out.read_text())
    assert results["config"]["algorithm"] == algorithm and results["config"]["strategy"] == strategy
    assert [r["round"] for r in results["rounds"]] == [1]
    for entry in results["rounds"]:
        assert entry["failed_clients"] == [] and entry["num_examples"] == 192
    assert 0.0 <= results["final"]["test_accuracy"] <= 1.0
    if algorithm == "ushaped":  # what the wire manifest recorded: no labels, no logits
        sent = results["rounds"][0]["payload_bytes_by_tensor"]
        assert set(sent) == {"up:forward:embeddings", "down:forward:_", "up:backward:grad", "down:backward:_"}


USER_ALGORITHM = """
import torch
from splitflower.algorithms import Algorithm
from splitflower.algorithms.csl import CSLServerModel
from splitflower.client import Client
from splitflower.strategies import ParallelStrategy


class HalfPrecisionClient(Client):
    def train_step(self, x, y):
        z = self.segment(x)
        self.step(z, self.server_model_proxy.forward_backward(embeddings=z.half(), labels=y).float())
        return {}


class HalfPrecisionServer(CSLServerModel):
    def forward_backward(self, embeddings, labels):
        return super().forward_backward(embeddings=embeddings.float(), labels=labels).half()


HALF = Algorithm("half", HalfPrecisionClient, HalfPrecisionServer)


class OneServerModelEach(ParallelStrategy):
    def num_server_models(self, num_clients):
        return num_clients

    def assign(self, index, num_clients):
        return index
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_an_algorithm_and_a_strategy_of_the_user_s_own_run_without_changing_the_package(tmp_path: Path) -> None:
    (tmp_path / "my_algorithms.py").write_text(USER_ALGORITHM)
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "splitflower.cli", "run", "--algorithm", "my_algorithms:HALF"]
    command += ["--strategy", "my_algorithms:OneServerModelEach", "--dataset", "synthetic", "--train-size", "64"]
    command += ["--clients", "2", "--rounds", "1", "--out", str(out)]
    done = run_cli(command, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["config"]["algorithm"] == "my_algorithms:HALF"
    assert results["config"]["strategy"] == "my_algorithms:OneServerModelEach"
    assert [m["num_examples"] for m in results["rounds"][0]["server_models"]] == [32, 32], "a server model each"
    manifest = results["rounds"][0]["clients"][0]["wire"]["manifest"]  # each client's is alike
    dtypes = {(entry["direction"], entry["name"], entry["dtype"]) for entry in manifest}
    assert dtypes == {("up", "embeddings", "float16"), ("up", "labels", "int64"), ("down", "_", "float16")}
