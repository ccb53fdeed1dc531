"""``splitflower reproduce dsl-paper``: per-cell results, resuming, and the report built from them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import ThreadBackend
from splitflower import reproduce
from splitflower.checkpoint import load_model
from splitflower.cli import build_parser
from splitflower.errors import DEFAULT_ATTEMPTS, STALLED_EXIT_CODE, CellFailedError, ConfigError, SimulationStartError
from splitflower.experiment import ExperimentConfig
from splitflower.paper_report import build_report, load_cells
from splitflower.report import load_results
from splitflower.reproduce import PAPER_HYPERPARAMETERS, SCALES, cell_filename, grid_configs, run_grid
from splitflower.results import results_document, write_results

TINY = {"datasets": ("synthetic",), "cuts": ("s",), "clients": (2,), "epochs": 1, "train_size": 256, "test_size": 64}


def _fake_round(config: ExperimentConfig, number: int) -> dict[str, Any]:
    """A round entry shaped like summarise_round's: DSL sends nothing back and holds less."""
    up = 1000 * config.clients
    down = 0 if config.algorithm == "dsl" else up
    return {
        "round": number,
        "seconds": 2.0,
        "test_accuracy": 0.5 + 0.1 * number,
        "test_loss": 1.0,
        "bytes": {"up_payload_bytes": up, "down_payload_bytes": down},
        "payload_bytes_by_tensor": {"up:m:embeddings": up - 10, "up:m:labels": 10},
        "memory": {
            "client_peak_tally_bytes": 400 if config.algorithm == "dsl" else 1000,
            "server_peak_tally_bytes": 500,
        },
        "time": {"client_compute_s": 1.0, "server_compute_s": 0.5, "communication_wait_s": 0.25},
    }


class _FakeRunner:
    def __init__(self, fail: str = "", error: type[Exception] = CellFailedError) -> None:
        self.ran: list[str] = []
        self.fail, self.error = fail, error

    def __call__(self, config: ExperimentConfig, path: str, extra: dict[str, Any]) -> None:
        self.ran.append(Path(path).name)
        if config.algorithm == self.fail:
            raise self.error("deliberate failure")
        rounds = [_fake_round(config, r) for r in range(1, config.rounds + 1)]
        document = results_document(config, rounds, 1.0)
        document["reproduce"] = extra
        write_results(document, path)


def test_grid_covers_algorithms_cuts_and_clients_with_the_papers_hyperparameters() -> None:
    configs = grid_configs(SCALES["small"])
    assert {(c.algorithm, c.cut, c.clients) for c in configs} == {
        (a, k, n) for a in ("csl", "dsl") for k in ("s", "m", "d") for n in (1, 5, 10)
    }
    for config in configs:
        assert {k: getattr(config, k) for k in PAPER_HYPERPARAMETERS} == PAPER_HYPERPARAMETERS
        assert config.model == SCALES["small"].model
        assert config.rounds == SCALES["small"].epochs
    assert len({cell_filename(c) for c in configs}) == len(configs)
    paper = grid_configs(SCALES["paper"], data_root="/data", cuts=("s",), clients=(1,))
    assert {c.dataset for c in paper} == {"cifar10", "cifar100"}
    assert {c.model for c in paper} == {"resnet110"}
    assert {c.dataset for c in grid_configs(SCALES["paper"], cuts=("s",), clients=(1,))} == {"fashion-mnist"}


def _planned(flags: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[list[ExperimentConfig], dict[str, object]]:
    """The cells ``splitflower reproduce dsl-paper --cuts s *flags`` would run, and how."""
    planned: list[ExperimentConfig] = []
    asked: dict[str, object] = {}

    def plan_only(configs: list[ExperimentConfig], *args: object, **kwargs: object) -> list[object]:
        planned.extend(configs)
        asked.update(kwargs)
        return []

    monkeypatch.setattr(reproduce, "run_grid", plan_only)
    args = build_parser().parse_args(["reproduce", "dsl-paper", "--cuts", "s", "--no-report", *flags])
    assert reproduce.reproduce_main(args) == 0
    return planned, asked


@pytest.mark.parametrize("flag", [[], ["--hand-over-optimizer"]])
def test_reproduce_can_hand_the_client_optimizer_on(flag: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    planned, _ = _planned(["--clients", "5", *flag], monkeypatch)
    assert planned and {c.hand_over_optimizer for c in planned} == {bool(flag)}


@pytest.mark.parametrize(("flag", "attempts"), [([], DEFAULT_ATTEMPTS), (["--attempts", "5"], 5)])
def test_reproduce_starts_a_failing_cell_as_often_as_asked(
    flag: list[str], attempts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, asked = _planned(flag, monkeypatch)
    assert asked["attempts"] == attempts


def test_bad_grid_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="cut must be one of"):
        grid_configs(SCALES["small"], cuts=("x",))
    with pytest.raises(ConfigError, match="train_size must be at least 0"):
        grid_configs(SCALES["small"], train_size=-1)


def test_grid_writes_one_file_per_cell_and_skips_finished_cells(tmp_path: Path) -> None:
    configs = grid_configs(SCALES["small"], **TINY)  # type: ignore[arg-type]
    first = _FakeRunner()
    outcomes = run_grid(configs, tmp_path, runner=first, say=lambda _: None)
    assert [o.status for o in outcomes] == ["ran", "ran"]
    assert sorted(first.ran) == sorted(p.name for p in tmp_path.glob("*.json"))
    stored = json.loads((tmp_path / cell_filename(configs[0])).read_text())
    assert stored["reproduce"]["grid"] == "dsl-paper"
    again = _FakeRunner()
    assert [o.status for o in run_grid(configs, tmp_path, runner=again, say=lambda _: None)] == ["skipped"] * 2
    assert again.ran == []
    # A file written before the flush timeout's default changed, or before request_order existed, is this
    # cell's all the same: its clients train one at a time, so nothing is batched or ordered.
    stored["config"]["flush_timeout"] = 0.05
    del stored["config"]["request_order"]
    (tmp_path / cell_filename(configs[0])).write_text(json.dumps(stored))
    assert run_grid(configs, tmp_path, runner=again, say=lambda _: None)[0].status == "skipped"


@pytest.mark.parametrize(("error", "tries"), [(SimulationStartError, DEFAULT_ATTEMPTS), (CellFailedError, 1)])
def test_a_failed_cell_is_reported_and_the_grid_goes_on(tmp_path: Path, error: type[Exception], tries: int) -> None:
    configs = grid_configs(SCALES["small"], **TINY)  # type: ignore[arg-type]
    runner = _FakeRunner(fail="csl", error=error)
    said: list[str] = []
    outcomes = run_grid(configs, tmp_path, runner=runner, say=said.append)
    assert [(o.config.algorithm, o.status) for o in outcomes] == [("csl", "failed"), ("dsl", "ran")]
    assert f"{error.__name__}: deliberate failure" in outcomes[0].error
    # Only a start that failed is tried again: a crash or a timeout would fail the same way.
    assert runner.ran.count(cell_filename(configs[0])) == tries
    assert sum("did not start" in line and "trying again" in line for line in said) == tries - 1
    # The rerun retries only the failed cell.
    retry = _FakeRunner()
    run_grid(configs, tmp_path, runner=retry, say=lambda _: None)
    assert retry.ran == [cell_filename(configs[0])]


def test_a_file_from_another_configuration_is_not_taken_as_done(tmp_path: Path) -> None:
    configs = grid_configs(SCALES["small"], **TINY)  # type: ignore[arg-type]
    run_grid(configs, tmp_path, runner=_FakeRunner(), say=lambda _: None)
    other = grid_configs(SCALES["small"], **{**TINY, "epochs": 2})  # type: ignore[arg-type]
    for config in other[:-1]:  # only the last cell's file is another configuration's
        (tmp_path / cell_filename(config)).unlink()
    runner = _FakeRunner()
    with pytest.raises(ConfigError, match=r"different configuration \(differs in \['rounds'\]\)"):
        run_grid(other, tmp_path, runner=runner, say=lambda _: None)
    assert runner.ran == [], "refused before any cell ran"
    for not_results in ("[1, 2]", '{"config": "csl"}'):  # JSON, but not what a cell writes
        (tmp_path / cell_filename(other[-1])).write_text(not_results)
        with pytest.raises(ConfigError, match="is not a splitflower results file"):
            run_grid(other, tmp_path, runner=runner, say=lambda _: None)


def test_report_and_figures_are_built_from_the_files(tmp_path: Path) -> None:
    configs = grid_configs(SCALES["small"], **{**TINY, "cuts": ("s", "d"), "epochs": 2})  # type: ignore[arg-type]
    run_grid(configs, tmp_path, runner=_FakeRunner(), say=lambda _: None)
    (tmp_path / "extra-memory.json").write_text(
        json.dumps(
            {"title": "Extra table", "command": "cmd", "commit": "abc", "columns": ["a", "b"], "rows": [[1, 0.5]]}
        )
    )
    (tmp_path / "notes.md").write_text("Hand-written notes.\n")
    written = build_report(tmp_path)
    names = {p.name for p in written}
    for figure in ("accuracy", "communication", "memory", "time"):
        assert any(n.startswith("fig") and figure in n and n.endswith(".png") for n in names), figure
    for path in written:
        assert path.stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    cells = load_cells(tmp_path)
    assert len(cells) == len(configs)  # extra-*.json is not a cell
    fake_csl, fake_dsl = _fake_round(configs[0], 1), _fake_round(configs[1], 1)
    total_ratio = fake_dsl["bytes"]["up_payload_bytes"] / (2 * fake_csl["bytes"]["up_payload_bytes"])
    assert f"total {total_ratio:.3f}" in report
    client_ratio = fake_dsl["memory"]["client_peak_tally_bytes"] / fake_csl["memory"]["client_peak_tally_bytes"]
    assert f"client {client_ratio:.3f}" in report
    assert "DSL - CSL final test accuracy: 0.000" in report  # the fake gives both the same accuracy
    assert "## Extra table" in report and "Hand-written notes." in report
    assert report.count("| synthetic | 2 |") == 4 * 2  # four per-cell tables, two cuts


@pytest.mark.slow
def test_reproduce_command_on_a_tiny_grid(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "splitflower.cli",
        "reproduce",
        "dsl-paper",
        "--datasets",
        "synthetic",
        "--algorithms",
        "dsl",
        "--cuts",
        "s",
        "--clients",
        "1",
        "--epochs",
        "1",
        "--train-size",
        "256",
        "--test-size",
        "64",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cells = sorted(tmp_path.glob("synthetic-*.json"))
    assert [p.name for p in cells] == ["synthetic-dsl-s-n1.json"]
    for path in cells:
        results = json.loads(path.read_text())
        assert results["config"]["train_size"] == 256 and len(results["rounds"]) == 1
        assert results["rounds"][0]["num_examples"] == 256
    assert (tmp_path / "report.md").is_file() and list(tmp_path.glob("fig7-time-*.png"))
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done already") == 1


class _ExitingProcess:
    """Stands in for a cell's process that exits at once with ``code`` (None: still running
    when its time is up, and killed)."""

    code: int | None = 0

    def __init__(self, **_: object) -> None:
        self.exitcode: int | None = None

    def start(self) -> None:
        self.exitcode = self.code

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        self.exitcode = -9


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        (STALLED_EXIT_CODE, SimulationStartError, "did not start .exit code 3"),
        (1, CellFailedError, "exited with code 1"),
        (None, CellFailedError, "did not finish within 5s and was stopped"),
    ],
)
def test_a_cell_process_says_whether_its_simulation_failed_to_start(
    code: int | None, error: type[Exception], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = type("Context", (), {"Process": type("Exits", (_ExitingProcess,), {"code": code})})
    monkeypatch.setattr(reproduce.multiprocessing, "get_context", lambda _: context)
    config = grid_configs(SCALES["small"], **TINY)[0]  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        reproduce.run_cell_process(config, "unused.json", {}, timeout=5)


def test_a_cell_stopped_midway_trains_on_from_the_last_round_it_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    flwr_logger = logging.getLogger("flwr")
    monkeypatch.setattr(flwr_logger, "level", flwr_logger.level)  # the cell quietens it
    (cell,) = grid_configs(
        SCALES["small"], datasets=("synthetic",), algorithms=("dsl",), cuts=("s",), clients=(2,), epochs=3,
        train_size=256, test_size=64,
    )  # fmt: skip
    straight, stopped = tmp_path / "straight.json", tmp_path / "stopped.json"
    reproduce._run_cell(cell, str(straight), {})
    # A run stopped after round 1 leaves its weights (and rounds) after round 1 and no results file.
    reproduce._run_cell(replace(cell, rounds=1), str(stopped), {})
    stopped.unlink()
    reproduce._run_cell(cell, str(stopped), {})
    results = load_results(stopped)
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3] and results["resumed_from"]["rounds"] == 1
    expected, got = load_model(straight.with_suffix(".pt")), load_model(stopped.with_suffix(".pt"))
    torch.testing.assert_close(got.client, expected.client, rtol=0, atol=0)
    torch.testing.assert_close(got.server, expected.server, rtol=0, atol=0)
    # Stopped after its last round's weights but before its results: they come from the weights' file.
    stopped.unlink()
    reproduce._run_cell(cell, str(stopped), {})
    assert load_results(stopped)["rounds"] == results["rounds"]
    with pytest.raises(ConfigError, match=r"stopped.pt holds the weights of a different configuration \(after round 3"):
        reproduce._run_cell(replace(cell, lr=0.5), str(stopped), {})


def test_a_grid_folder_below_a_file_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    configs = grid_configs(SCALES["small"], **TINY)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"cannot use .*afile/grid.* as the grid's folder"):
        run_grid(configs, tmp_path / "afile" / "grid", runner=_FakeRunner(), say=lambda _: None)


def test_a_report_of_a_folder_without_results_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from splitflower import cli

    assert cli.main(["reproduce", "dsl-paper", "--report-only", "--out", str(tmp_path)]) == 2
    assert "holds no results files of a grid to report on" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no empty report written"
