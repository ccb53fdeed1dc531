"""The trained weights a run saves: they give the accuracy the run reported, and only such a
file is read back."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from conftest import ThreadBackend
from splitflower import cli
from splitflower.checkpoint import load_model, save_model
from splitflower.errors import ConfigError, ResultsFileError
from splitflower.experiment import Experiment, ExperimentConfig
from splitflower.report import load_results
from splitflower.strategy import SplitResult


@pytest.mark.parametrize("algorithm", ["dsl", "ushaped"])
def test_the_saved_model_gives_the_accuracy_the_run_reported(
    algorithm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    out, model = tmp_path / "results.json", tmp_path / "models" / f"{algorithm}.pt"
    options = ["--dataset", "synthetic", "--clients", "2", "--rounds", "2", "--train-size", "256"]
    options += ["--test-size", "200", "--algorithm", algorithm, "--out", str(out), "--save-model", str(model)]
    assert cli.main(["run", "--attempts", "1", *options]) == 0
    results, saved = load_results(out), load_model(model)
    assert saved.rounds == 2 and saved.config == results["config"]
    network = saved.network()
    (x, y), *rest = saved.experiment().test.batches(1000, shuffle=False)
    assert not rest
    with torch.no_grad():
        accuracy = (network(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(results["final"]["test_accuracy"])
    assert not network.training


def test_only_a_model_file_is_read_back(tmp_path: Path) -> None:
    config = ExperimentConfig(dataset="synthetic")
    trained = SplitResult(
        arrays=ArrayRecord({"segment.w": torch.ones(2)}), server_arrays=ArrayRecord({"b": torch.zeros(1)})
    )
    trained.rounds[1] = {}
    good = save_model(tmp_path / "m.pt", config, trained)
    assert load_model(good).client["segment.w"].tolist() == [1.0, 1.0]
    (tmp_path / "noise.pt").write_bytes(b"\x00\xffnot a zip")
    torch.save({"schema": "other/1"}, tmp_path / "other.pt")
    torch.save(
        {"schema": "splitflower.model/1", "config": {}, "rounds": 1, "client": {"w": 1}, "server": {}},
        tmp_path / "bad.pt",
    )

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (print, ("code ran",))

    (tmp_path / "code.pt").write_bytes(pickle.dumps(Payload(), protocol=2))
    cases = {
        "noise.pt": r"noise.pt is not a splitflower model file \(",
        "other.pt": r"expected schema 'splitflower.model/1', got 'other/1'",
        "bad.pt": r"its 'client' is not a dict of tensors",
        "code.pt": r"code.pt is not a splitflower model file \(",
        "missing.pt": r"cannot read model file .*missing.pt",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_model(tmp_path / name)


def test_weights_that_do_not_fit_the_model_say_which_part(tmp_path: Path) -> None:
    experiment = Experiment(ExperimentConfig(dataset="synthetic", train_size=64, test_size=64).validate())
    client = experiment.initial_client_weights()
    server = experiment.make_server_model().get_fit_result().weights
    experiment.assemble(client, server)
    with pytest.raises(ConfigError, match="the weights do not fit the server segment of this experiment's model"):
        experiment.assemble(client, {**server, "unexpected": torch.zeros(1)})


def test_weights_that_cannot_be_written_are_said_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").touch()
    unsaved: list[ResultsFileError] = []
    keep = cli._model_keeper(tmp_path / "a-file" / "model.pt", unsaved)
    result = SplitResult(arrays=ArrayRecord({"segment.w": torch.ones(1)}), server_arrays=ArrayRecord({}))
    result.rounds[1] = {}
    keep(ExperimentConfig(), result)
    assert len(unsaved) == 1
    assert "splitflower: error: the trained weights are not kept: cannot write the model" in capsys.readouterr().err
