"""The trained weights a run saves: they give the accuracy the run reported, and only such a
file is read back."""

from __future__ import annotations

import functools
import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord

from conftest import ThreadBackend, empty_rounds
from splitflower import checkpoint, cli
from splitflower.checkpoint import ModelWriter, SavedModel, check_resumable, load_model, resumed_config, save_model
from splitflower.errors import ConfigError, ResultsFileError
from splitflower.experiment import Experiment, ExperimentConfig
from splitflower.report import load_results
from splitflower.results import summarise_rounds
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
    trained.rounds.update(empty_rounds(1))
    good = save_model(tmp_path / "m.pt", config, trained)
    assert load_model(good).client["segment.w"].tolist() == [1.0, 1.0]
    (tmp_path / "noise.pt").write_bytes(b"\x00\xffnot a zip")
    (tmp_path / "text.sh").write_text("hello world\n")  # read by the old format's pickle: a KeyError
    (tmp_path / "results.json").write_text('{"schema": "splitflower.results/1"}')
    torch.save({"schema": "other/1"}, tmp_path / "other.pt")
    torch.save(
        {"schema": "splitflower.model/1", "config": {}, "rounds": 1, "client": {"w": 1}, "server": {}},
        tmp_path / "bad.pt",
    )
    entry = load_model(good).history[0]
    histories = {
        "gap.pt": json.dumps([entry, {**entry, "round": 3}]),
        "text.pt": "not json",
        "list.pt": ["x"],
        "bare.pt": '[{"round": 1}, {"round": 2}, {"round": 3}]',
        "bool.pt": json.dumps([{**entry, "round": True}, {**entry, "round": 2}, {**entry, "round": 3}]),
    }
    for name, history in histories.items():
        torch.save({**torch.load(good, weights_only=True), "rounds": 3, "history": history}, tmp_path / name)
    configs: dict[str, dict[str, object]] = {
        "clients.pt": {"clients": "x"},
        "options.pt": {"options": 5},
        "field.pt": {"colour": "red"},
    }
    for name, changed in configs.items():
        stored = torch.load(good, weights_only=True)
        torch.save({**stored, "config": {**stored["config"], **changed}}, tmp_path / name)

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (print, ("code ran",))

    (tmp_path / "code.pt").write_bytes(pickle.dumps(Payload(), protocol=2))
    cases = {
        "noise.pt": r"noise.pt is not a splitflower model file \(",
        "text.sh": r"text.sh is not a splitflower model file \(torch.load found no safely loadable weights",
        "results.json": r"results.json is not a splitflower model file .* give a file that --save-model",
        "other.pt": r"expected schema 'splitflower.model/1', got 'other/1'",
        "bad.pt": r"its 'client' is not a dict of tensors",
        "code.pt": r"code.pt is not a splitflower model file \(",
        "gap.pt": r"its 'history' is not the JSON list .* up to 3 \(round numbers found: \[1, 3\]\)",
        "text.pt": r"its 'history' is not the JSON list .* \(round numbers found: -\)",
        "list.pt": r"its 'history' is not the JSON list",
        "bare.pt": r"round numbers found: \[1, 2, 3\]; entries lack \['bytes', 'clients', 'failed_clients'",
        "bool.pt": r"round numbers found: \[True, 2, 3\]\)",
        "missing.pt": r"cannot read model file .*missing.pt",
        "clients.pt": r"the config saved in .*clients.pt is not valid: (.|\n)*clients must be int, got .x.",
        "options.pt": r"the config saved in .*options.pt does not fit this splitflower's ExperimentConfig",
        "field.pt": r"the config saved in .*field.pt does not fit .*colour",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_model(tmp_path / name)
    # An algorithm of the user's own need not be importable to read the weights back.
    stored = torch.load(good, weights_only=True)
    torch.save({**stored, "config": {**stored["config"], "algorithm": "not_here:ALGO"}}, tmp_path / "own.pt")
    assert load_model(tmp_path / "own.pt").client["segment.w"].tolist() == [1.0, 1.0]


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
    keep = cli._model_keeper(functools.partial(save_model, tmp_path / "a-file" / "model.pt"), unsaved)
    result = SplitResult(arrays=ArrayRecord({"segment.w": torch.ones(1)}), server_arrays=ArrayRecord({}))
    result.rounds.update(empty_rounds(1))
    keep(ExperimentConfig(), result)
    assert len(unsaved) == 1
    assert "splitflower: error: the trained weights are not kept: cannot write the model" in capsys.readouterr().err


# A request gathered on the flush timeout (a client thread late on a loaded machine) changes the
# batch, so the two runs would differ by it: the timeout is long enough never to fire here.
SYNTHETIC_RUN = ["--dataset", "synthetic", "--clients", "3", "--train-size", "384", "--test-size", "128"]
SYNTHETIC_RUN += ["--flush-timeout", "30"]


@pytest.mark.parametrize(
    ("algorithm", "strategy", "extra"),
    [
        ("csl", "sequential", ""),
        ("dsl", "splitfed-v1", ""),
        ("csl", "sequential", "--hand-over-optimizer"),
        # Mixup (the server model's draws), and clients that are never averaged (sync_every 0),
        # decoders and all: each gets its own back.
        ("locfedmix", "batched", "--option combo=5"),
        ("csl", "parallel", ""),  # one shared server model, a request of each client in turn
    ],
)
def test_a_resumed_run_ends_with_the_weights_of_the_run_that_went_straight_through(
    algorithm: str, strategy: str, extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    run = ["run", "--attempts", "1", *SYNTHETIC_RUN, "--algorithm", algorithm, "--strategy", strategy, *extra.split()]
    straight, halfway, resumed = tmp_path / "straight", tmp_path / "halfway", tmp_path / "resumed"
    assert cli.main([*run, "--rounds", "3", "--save-model", f"{straight}.pt", "--out", f"{straight}.json"]) == 0
    assert cli.main([*run, "--rounds", "2", "--save-model", f"{halfway}.pt"]) == 0
    # The config comes from the file; an option that agrees with it may be given all the same.
    again = ["--resume", f"{halfway}.pt", "--rounds", "3", "--algorithm", algorithm, "--test-size", "128"]
    assert (
        cli.main(["run", "--attempts", "1", *again, "--save-model", f"{resumed}.pt", "--out", f"{resumed}.json"]) == 0
    )
    expected, got = load_model(f"{straight}.pt"), load_model(f"{resumed}.pt")
    assert got.rounds == 3 and got.config == expected.config
    torch.testing.assert_close(got.client, expected.client, rtol=0, atol=0)
    torch.testing.assert_close(got.server, expected.server, rtol=0, atol=0)
    # The results go on from the saved run's rounds: one curve from round 1, as if straight through.
    results, straight_results = load_results(f"{resumed}.json"), load_results(f"{straight}.json")
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    accuracy = [[r["test_accuracy"] for r in run["rounds"]] for run in (results, straight_results)]
    assert accuracy[0] == accuracy[1]
    assert results["resumed_from"] == {"path": f"{halfway}.pt", "rounds": 2, "carried_rounds": 2, "changed": {}}
    assert results["final"] == straight_results["final"]
    assert [r["round"] for r in got.history] == [1, 2, 3], "and a file saved on resuming keeps them for the next"
    # What the strategy carried (the momentum handed on, the clients' own states) made these cases equal.
    carried = {name.partition(":")[0].partition(".")[0] for name in load_model(f"{halfway}.pt").strategy_state or {}}
    assert carried == ({"optimizer"} if "hand-over" in extra else {"client"} if "combo=5" in extra else set())


def test_a_resumed_run_says_which_settings_it_changed_from_the_saved_run_s(tmp_path: Path) -> None:
    config = ExperimentConfig(dataset="synthetic", train_size=64, test_size=64, rounds=2)
    saved = load_model(_saved(tmp_path, config))
    assert saved.resumed_from(resumed_config(saved, {"rounds": 4})) == {
        "path": str(tmp_path / "saved.pt"),
        "rounds": 2,
        "carried_rounds": 2,
        "changed": {},
    }
    changed = resumed_config(saved, {"rounds": 4, "test_size": 32, "link": "10mbit/50mbit/20ms"})
    assert saved.resumed_from(changed)["changed"] == {"test_size": [64, 32], "link": ["", "10mbit/50mbit/20ms"]}


def _saved(tmp_path: Path, config: ExperimentConfig, rounds: int = 2) -> Path:
    experiment = Experiment(config.validate())
    trained = SplitResult(
        arrays=ArrayRecord(experiment.initial_client_weights()),
        server_arrays=ArrayRecord(experiment.make_server_model().get_fit_result().weights),
    )
    trained.rounds.update(empty_rounds(rounds))
    return save_model(tmp_path / "saved.pt", experiment.config, trained)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--lr", "0.05", "--seed", "3"],
            "another config: lr 0.05 (saved with 0.01); seed 3 (saved with 0). A resumed",
        ),
        (["--rounds", "2"], "already holds the weights after round 2, and the run would end at round 2; give a last"),
        ([], "already holds the weights after round 2, and the run would end at round 2"),  # the saved run's own
        (["--option", "window=2"], "options ('window=2',) (saved with ())"),
    ],
)
def test_a_resume_that_would_not_train_on_as_saved_is_refused_before_it_starts(
    options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = _saved(tmp_path, ExperimentConfig(dataset="synthetic", train_size=64, test_size=64, rounds=2))
    assert cli.main(["run", "--attempts", "1", "--resume", str(saved), *options]) == 2
    assert message in capsys.readouterr().err


def test_what_a_model_file_does_not_hold_stops_a_resume(tmp_path: Path) -> None:
    base = ExperimentConfig(dataset="synthetic", train_size=64, test_size=64, rounds=3)
    cases = {
        "hand_over_optimizer": replace(base, algorithm="csl", strategy="sequential", hand_over_optimizer=True),
        "keep state of their own between rounds": replace(base, algorithm="locfedmix", options=("sync_every=2",)),
    }
    for problem, config in cases.items():
        path = _saved(tmp_path, config)
        torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "strategy"}, path)  # older
        saved = load_model(path)
        with pytest.raises(ConfigError, match=f"cannot resume .*saved.pt:\n  - .*{problem}"):
            check_resumable(Experiment(resumed_config(saved, {})), saved)
    # A file that holds the clients' own states resumes (the round-trip: the resume tests above).
    saved = load_model(_saved(tmp_path, cases["keep state of their own between rounds"]))
    check_resumable(Experiment(resumed_config(saved, {})), replace(saved, strategy_state={"client:0:w": torch.ones(1)}))
    # A hand-over run whose optimizer keeps no state (momentum 0) hands on nothing, and resumes.
    no_momentum = replace(cases["hand_over_optimizer"], momentum=0.0)
    saved = load_model(_saved(tmp_path, no_momentum))
    assert saved.strategy_state == {}
    check_resumable(Experiment(resumed_config(saved, {})), saved)
    saved = load_model(_saved(tmp_path, replace(base, algorithm="csl")))
    given_state = replace(saved, strategy_state={"optimizer.0.momentum_buffer": torch.zeros(2)})
    with pytest.raises(
        ConfigError, match=r"the strategy cannot carry on from the file's state: ParallelStrategy carries only clients'"
    ):
        check_resumable(Experiment(resumed_config(saved, {})), given_state)
    other = Experiment(replace(base, algorithm="csl", model="resnet20", cut="1").validate())
    with pytest.raises(ConfigError, match=r"the client's weights lack \['segment\.") as raised:
        check_resumable(other, saved)
    assert "the server's weights" in str(raised.value)
    assert "its config differs from the saved one: model 'resnet20' (saved with 'lenet5'); cut '1'" in str(raised.value)


def test_resuming_through_the_api_checks_the_config_and_the_rounds_too(tmp_path: Path) -> None:
    base = ExperimentConfig(algorithm="csl", dataset="synthetic", train_size=64, test_size=64, rounds=3)
    saved = load_model(_saved(tmp_path, base, rounds=3))
    with pytest.raises(ConfigError) as raised:
        check_resumable(Experiment(replace(base, lr=0.5).validate()), saved)
    assert "its config differs from the saved one: lr 0.5 (saved with 0.01)" in str(raised.value)
    assert "already holds the weights after round 3, and the run would end at round 3" in str(raised.value)
    check_resumable(Experiment(replace(base, rounds=4, test_size=32).validate()), saved)
    with pytest.raises(ConfigError, match=r"cannot resume with \['learning_rate'\]: not ExperimentConfig fields"):
        resumed_config(saved, {"learning_rate": 0.1})
    assert resumed_config(saved, {"rounds": 5, "options": []}).rounds == 5, "a list of options is the same as a tuple"
    # The flush timeout changes nothing where no request is gathered (files saved with the older 0.05 s resume).
    arrival = load_model(_saved(tmp_path, replace(base, request_order="arrival"), rounds=3))
    assert resumed_config(arrival, {"rounds": 4, "flush_timeout": 0.05}).flush_timeout == 0.05
    for gathering in (replace(base, batching=True), base):  # batched; a request of each client in turn
        saved_gathering = load_model(_saved(tmp_path, gathering, rounds=3))
        with pytest.raises(ConfigError, match=r"flush_timeout 0.05 \(saved with 1.0\)"):
            resumed_config(saved_gathering, {"rounds": 4, "flush_timeout": 0.05})
    # A file written before request_order existed ran its requests as they arrived, and resumes so.
    older = _saved(tmp_path, base, rounds=3)
    document = torch.load(older, weights_only=True)
    del document["config"]["request_order"]
    torch.save(document, older)
    assert resumed_config(load_model(older), {"rounds": 4}).request_order == "arrival"
    torch.save(
        {"schema": "splitflower.model/1", "config": {}, "rounds": -1, "client": {}, "server": {}}, tmp_path / "n.pt"
    )
    with pytest.raises(ConfigError, match=r"lacks its 'config' or its 'rounds' \(a round number >= 0\)"):
        load_model(tmp_path / "n.pt")


def test_a_run_saved_round_after_round_summarises_each_round_once_and_keeps_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ExperimentConfig(algorithm="csl", dataset="synthetic", train_size=64, test_size=64).validate()
    path = _saved(tmp_path, config, rounds=2)
    resumed = load_model(path)
    summarised: list[int] = []
    real = checkpoint.summarise_round

    def counted(record: dict[str, Any]) -> dict[str, Any]:
        summarised.append(record["round"])
        return real(record)

    monkeypatch.setattr(checkpoint, "summarise_round", counted)
    write = ModelWriter(path, resumed=resumed)
    result = SplitResult(arrays=ArrayRecord(resumed.client), server_arrays=ArrayRecord(resumed.server))
    for last in (3, 4, 5):  # a resumed run saving after each of its rounds
        result.rounds[last] = {"round": last, "seconds": float(last), "clients": [], "server_models": []}
        write(config, result)
        history = load_model(path).history
        assert [entry["round"] for entry in history] == list(range(1, last + 1))
        assert list(history[:2]) == list(resumed.history), "the saved run's entries are carried as they were"
        assert history[-1] == summarise_rounds({last: result.rounds[last]})[0]
    assert summarised == [3, 4, 5], "each round summarised once, not again at every later save"
    result.rounds[5] = {**result.rounds[5], "seconds": 9.0}  # another record for a round: summarised anew
    write(config, result)
    assert load_model(path).history[-1]["seconds"] == 9.0
    # What it writes is what save_model writes.
    one_off = save_model(tmp_path / "one-off.pt", config, result, resumed=resumed)
    assert torch.load(one_off, weights_only=True)["history"] == torch.load(path, weights_only=True)["history"]


def test_results_and_weights_aimed_at_one_file_or_a_folder_are_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ["run", "--attempts", "1", "--dataset", "synthetic", "--train-size", "64", "--test-size", "64"]
    same = str(tmp_path / "run.out")
    assert cli.main([*run, "--out", same, "--save-model", same]) == 2
    assert "--out and --save-model both name" in capsys.readouterr().err
    assert cli.main([*run, "--save-model", str(tmp_path)]) == 2
    assert "is a directory; give a file name such as model.pt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_a_resumed_run_s_entries_follow_the_saved_ones_as_they_are_given() -> None:
    # As given, not copied: a writer that encodes each entry object once (results.ProgressWriter)
    # then encodes each of a resumed run's rounds once too.
    saved = SavedModel({}, 2, {}, {}, history=({"round": 1}, {"round": 2}))
    own = [{"round": 3}, {"round": 4}]
    carried = saved.carry_on(own)
    assert carried == [{"round": 1}, {"round": 2}, {"round": 3}, {"round": 4}]
    assert all(entry is given for entry, given in zip(carried[2:], own, strict=True))
