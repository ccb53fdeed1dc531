"""The supporting pieces: results reports, worker pools, compute thread, run-config parsing."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from conftest import REPO_ROOT, certificate_files
from splitflower import cli
from splitflower._tensor_record import tensor_record
from splitflower._threads import StickyExecutor
from splitflower.app import (
    _handed_optimizer_state,
    _proxy_from_config,
    client_certificate_from_node_config,
    service_from_run_config,
)
from splitflower.client import Client
from splitflower.codec import encode_reply
from splitflower.compute import ComputeThread
from splitflower.data import synthetic
from splitflower.errors import ConfigError, ResultsFileError
from splitflower.report import check_plot_path, comparison_table, load_results, plot_results
from splitflower.service import SplitService
from splitflower.strategies import ParallelStrategy
from splitflower.strategy import RoundPlan
from splitflower.wire import ConfigKey, RecordKey


def _results(algorithm: str, up: int, down: int, accuracy: float) -> dict[str, Any]:
    round_entry = {
        "round": 1,
        "test_accuracy": accuracy,
        "bytes": {"up_payload_bytes": up, "down_payload_bytes": down},
        "memory": {"client_peak_tally_bytes": 2e6, "server_peak_tally_bytes": 3e6},
        "time": {"client_compute_s": 1.0, "server_compute_s": 2.0, "communication_wait_s": 0.5},
    }
    return {
        "schema": "splitflower.results/1",
        "config": {"algorithm": algorithm, "strategy": "parallel"},
        "wall_s": 10.0,
        "rounds": [round_entry],
    }


def test_comparison_table_and_plot(tmp_path: Path) -> None:
    dsl, csl = _results("dsl", 100_000_000, 0, 0.87), _results("csl", 100_000_000, 100_000_000, 0.86)
    table = comparison_table([dsl, csl]).splitlines()
    assert table[2].startswith("dsl/parallel") and "100.0000" in table[2]
    label, *ratios = re.split(r"\s{2,}", table[-1])
    assert label == "dsl/parallel / csl/parallel"
    assert ratios[:3] == ["1.012", "1.000", "0.000"], "accuracy, up and down, each DSL / CSL"
    _, *reverse = re.split(r"\s{2,}", comparison_table([csl, dsl]).splitlines()[-1])
    assert reverse[1:3] == ["1.000", "inf"], "CSL's bytes down over DSL's none"
    _, *both_none = re.split(r"\s{2,}", comparison_table([dsl, dsl]).splitlines()[-1])
    assert both_none[2] == "-", "no bytes down over no bytes down"
    png = plot_results([dsl, csl], tmp_path / "plots" / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_of_the_same_algorithm_and_strategy_are_told_apart() -> None:
    runs = [_results("csl", 1, 1, 0.5) for _ in range(3)]
    runs[0]["config"].update(dataset="synthetic", seed=0)
    runs[1]["config"].update(dataset="fashion-mnist", seed=0)
    runs[2]["config"].update(dataset="fashion-mnist", seed=0)
    rows = [re.split(r"\s{2,}", line)[0] for line in comparison_table(runs).splitlines()[2:]]
    assert rows[:3] == [
        "csl/parallel dataset=synthetic",
        "csl/parallel dataset=fashion-mnist #2",
        "csl/parallel dataset=fashion-mnist #3",
    ]
    assert rows[3] == "csl/parallel dataset=synthetic / csl/parallel dataset=fashion-mnist #3"
    linked, other, unlinked = (_results(a, 1, 1, 0.5) for a in ("csl", "dsl", "csl"))
    linked["config"]["link"] = "10mbit/50mbit/20ms"
    unlinked["config"]["link"] = ""
    labels = [re.split(r"\s{2,}", line)[0] for line in comparison_table([linked, other, unlinked]).splitlines()[2:5]]
    assert labels == ["csl/parallel link=10mbit/50mbit/20ms", "dsl/parallel", "csl/parallel link="]
    reordered = [_results("csl", 1, 1, 0.5) for _ in range(2)]
    reordered[0]["config"]["options"], reordered[1]["config"]["options"] = ["a=1", "b=2"], ["b=2", "a=1"]
    labels = [re.split(r"\s{2,}", line)[0] for line in comparison_table(reordered).splitlines()[2:4]]
    assert labels == ["csl/parallel #1", "csl/parallel #2"], "the order of options is no difference"
    partial = _results("csl", 1, 1, 0.5)
    partial["incomplete"] = {"error": "RuntimeError: x", "rounds_recorded": 1, "rounds_planned": 3}
    labels = [re.split(r"\s{2,}", line)[0] for line in comparison_table([partial, other]).splitlines()[2:4]]
    assert labels == ["csl/parallel (incomplete: 1 of 3 rounds)", "dsl/parallel"]
    partial["incomplete"] |= {"last_round": 2}  # a resumed run: its one round was round 2
    labels = [re.split(r"\s{2,}", line)[0] for line in comparison_table([partial, other]).splitlines()[2:4]]
    assert labels[0] == "csl/parallel (incomplete: 2 of 3 rounds)"


def test_compare_reads_null_figures_as_missing_and_refuses_a_plot_format_first(tmp_path: Path) -> None:
    diverged = _results("dsl", 100, 0, 0.1)
    diverged["rounds"][0]["test_accuracy"] = None
    diverged["rounds"][0]["memory"]["server_peak_tally_bytes"] = None
    diverged["rounds"][0]["time"]["server_compute_s"] = None
    first = comparison_table([diverged, _results("csl", 100, 100, 0.5)]).splitlines()[2].split()
    assert first[1] == "nan" and first[5] == "nan" and first[7] == "nan"
    message = r"cannot plot to '.*out.txt': expected a file name ending in one of .*\.png.*got \.txt"
    with pytest.raises(ConfigError, match=message):
        check_plot_path(tmp_path / "out.txt")
    assert not list(tmp_path.iterdir()), "nothing written"


def test_load_results_refuses_other_files(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(ConfigError, match=re.escape("expected schema 'splitflower.results/1', got 'something/else'")):
        load_results(other)
    with pytest.raises(ConfigError, match="cannot read"):
        load_results(tmp_path / "missing.json")


def test_sticky_executor_reuses_the_last_idle_thread_and_reports_errors() -> None:
    pool = StickyExecutor(4, "test")
    names = {pool.submit(lambda: threading.current_thread().name).result() for _ in range(20)}
    assert len(names) == 1, "sequential tasks stay on one warm thread"
    failing = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result()
    gate = threading.Event()
    blocked = [pool.submit(gate.wait) for _ in range(6)]  # more than max_workers: the rest wait
    gate.set()
    assert all(f.result(timeout=5) for f in blocked)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_compute_thread_runs_everything_on_one_thread() -> None:
    compute = ComputeThread()
    names = {compute.run(lambda: threading.current_thread().name) for _ in range(5)}
    assert names == {"splitflower-compute"}
    assert compute.run(lambda: compute.run(lambda: 7)) == 7, "a job may call run() without deadlock"
    with pytest.raises(ValueError, match="boom"):
        compute.run(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_service_from_run_config_treats_empty_values_as_unset(tmp_path: Path) -> None:
    empty = {"sf-host": "", "sf-port": 0, "sf-advertised-host": "", "sf-tls-certificate": ""}
    service = service_from_run_config(empty)
    assert (service.host, service.advertised_host, service.tls) == ("127.0.0.1", "127.0.0.1", None)
    with pytest.raises(ConfigError, match="TLS needs all of"):
        service_from_run_config({"sf-tls-certificate": str(tmp_path / "cert.pem")})
    with pytest.raises(ConfigError, match="does not exist"):
        keys = ("sf-tls-certificate", "sf-tls-private-key", "sf-tls-root-certificates")
        service_from_run_config(dict.fromkeys(keys, str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="integers"):
        service_from_run_config({"sf-port": "eighty"})


def test_mutual_tls_settings_come_from_the_run_config_and_each_node_s_config(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    pems = certificate_files(tmp_path, ("server", "client", "other"))
    (tmp_path / "junk.pem").write_bytes(b"not a certificate")
    tls = {
        "sf-tls-certificate": str(pems["server-cert"]),
        "sf-tls-private-key": str(pems["server-key"]),
        "sf-tls-root-certificates": str(pems["server-cert"]),
    }
    with pytest.raises(ConfigError, match=r"'sf-tls-client-ca' \(mutual TLS\) needs TLS too"):
        service_from_run_config({"sf-tls-client-ca": str(pems["client-cert"])})
    with pytest.raises(ConfigError, match=r"client_ca \(sf-tls-client-ca\) must hold PEM certificates.*17 bytes"):
        service_from_run_config({**tls, "sf-tls-client-ca": str(tmp_path / "junk.pem")})
    service = service_from_run_config({**tls, "sf-tls-client-ca": str(pems["client-cert"])})
    assert service.tls is not None and service.tls.client_ca == pems["client-cert"].read_bytes()
    assert service_from_run_config({**tls, "sf-tls-client-ca": ""}).tls.client_ca is None  # type: ignore[union-attr]

    keys = ("sf-tls-client-certificate", "sf-tls-client-private-key")
    assert client_certificate_from_node_config({"partition-id": 0, keys[0]: ""}) is None
    with pytest.raises(ConfigError, match="a client certificate needs all of"):
        client_certificate_from_node_config({keys[0]: str(pems["client-cert"])})
    with pytest.raises(ConfigError, match="node config 'sf-tls-client-certificate' must name a PEM file"):
        client_certificate_from_node_config({keys[0]: str(tmp_path / "gone.pem"), keys[1]: str(pems["client-key"])})
    with pytest.raises(ConfigError, match="are not such a pair"):
        client_certificate_from_node_config({keys[0]: str(pems["client-cert"]), keys[1]: str(pems["other-key"])})
    node = {keys[0]: str(pems["client-cert"]), keys[1]: str(pems["client-key"])}
    expected = (pems["client-cert"].read_bytes(), pems["client-key"].read_bytes())
    assert client_certificate_from_node_config(node) == expected

    # A node's certificate is read only for a service that serves over TLS.
    client = Client(torch.nn.Linear(2, 2), synthetic(8, 8)[0])
    config = {ConfigKey.PROXY_ADDRESS: "127.0.0.1:1", ConfigKey.TOKEN: b"0" * 16}
    broken = {keys[0]: str(tmp_path / "gone.pem"), keys[1]: str(tmp_path / "gone.pem")}
    assert _proxy_from_config(config, client, broken).address == "127.0.0.1:1"
    with pytest.raises(ConfigError, match="must name a PEM file"):
        _proxy_from_config({**config, ConfigKey.ROOT_CERTIFICATES: pems["server-cert"].read_bytes()}, client, broken)


def test_strategy_call_timeout_reaches_the_clients_proxy() -> None:
    train, _ = synthetic(8, 8)
    client = Client(torch.nn.Linear(2, 2), train)
    for timeout in (2.5, None):
        strategy = ParallelStrategy(call_timeout=timeout)
        strategy._service = SplitService()  # not started: only its address and limits are read
        plan = RoundPlan(1, [7], [], [], {7: 0}, tokens={7: b"\0" * 16})
        config = dict(strategy.client_config(plan, 7, ConfigRecord({ConfigKey.LR: 0.1})))
        assert _proxy_from_config(config, client).default_timeout == timeout
    with pytest.raises(ConfigError, match="sf-token"):
        _proxy_from_config({ConfigKey.PROXY_ADDRESS: "x"}, client)


def test_handed_optimizer_state_round_trips_and_bad_records_are_refused() -> None:
    state = {"0.momentum_buffer": torch.arange(6.0).view(2, 3), "1.step": torch.tensor(4.0)}
    handed = _handed_optimizer_state(RecordDict({RecordKey.OPTIMIZER: tensor_record(state)}))
    torch.testing.assert_close(handed, state)
    assert _handed_optimizer_state(RecordDict({})) == {}
    bad: dict[str, ArrayRecord | ConfigRecord] = {
        "a ConfigRecord holding a tensor frame": ArrayRecord({"x": torch.ones(1)}),
        "not a valid tensor frame": ConfigRecord({RecordKey.VALUE: b"not a frame"}),
        "must be named tensors, got Tensor": ConfigRecord({RecordKey.VALUE: encode_reply(torch.ones(2))}),
    }
    for message, record in bad.items():
        with pytest.raises(ConfigError, match=message):
            _handed_optimizer_state(RecordDict({RecordKey.OPTIMIZER: record}))


def test_the_readme_s_demo_table_is_the_recorded_demo_run() -> None:
    demo = REPO_ROOT / "docs" / "results" / "demo"
    table = comparison_table([load_results(demo / f"demo-{a}.json") for a in ("dsl", "csl")])
    assert table in (REPO_ROOT / "README.md").read_text()


def test_compare_refuses_a_results_file_without_its_config(tmp_path: Path) -> None:
    cut_short = tmp_path / "cut-short.json"
    cut_short.write_text(json.dumps({"schema": "splitflower.results/1", "rounds": []}))
    with pytest.raises(ConfigError, match="lacks its 'config'"):
        load_results(cut_short)


def _malformed(tmp_path: Path, change: str) -> Path:
    """A results file with one defect, as a hand edit or a broken disk leaves it."""
    path = tmp_path / "broken.json"
    document = _results("dsl", 1, 1, 0.5)
    if change == "random bytes":
        path.write_bytes(bytes(range(128, 256)) * 4)
    elif change == "deep nesting":
        path.write_text('{"schema": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        if change == "empty round":
            document["rounds"] = [{}]
        elif change == "round not an object":
            document["rounds"] = [1]
        elif change == "text figure":
            document["rounds"][0]["bytes"]["up_payload_bytes"] = "abc"
        path.write_text(json.dumps(document))
    return path


_PROBLEMS = {
    "random bytes": "it is not UTF-8 text (byte 0x80 at offset 0)",
    "deep nesting": "its JSON is nested too deeply to read",
    "empty round": "rounds[0].round must be a number, got nothing (it is missing)",
    "round not an object": "rounds[0] must be an object, got 1",
    "text figure": "rounds[0].bytes.up_payload_bytes must be a number or null, got 'abc'",
}


@pytest.mark.parametrize("change", list(_PROBLEMS))
@pytest.mark.parametrize("plot", [False, True])
def test_compare_refuses_a_malformed_results_file_with_what_is_wrong_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, plot: bool
) -> None:
    broken, problem = _malformed(tmp_path, change), _PROBLEMS[change]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_results("csl", 1, 1, 0.5)))
    command = ["compare", str(good), str(broken), *(["--plot", str(tmp_path / "new" / "cmp.png")] if plot else [])]
    assert cli.main(command) == 2
    assert capsys.readouterr().err == f"splitflower: error: {broken} is not a valid results file: {problem}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "good.json"], "no plot folder"


def test_a_plot_path_is_checked_without_creating_folders_and_a_failed_plot_removes_those_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    out = tmp_path / "new" / "sub" / "cmp.png"
    assert check_plot_path(out) == out
    assert not list(tmp_path.iterdir()), "a check creates nothing"

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(ResultsFileError, match=re.escape(f"cannot write the plot to '{out}': No space left")):
        plot_results([_results("dsl", 1, 1, 0.5)], out)
    assert not list(tmp_path.iterdir()), "the folders made for a failed plot are removed"
    (tmp_path / "env.sh").touch()
    with pytest.raises(ResultsFileError, match=re.escape(f"'{tmp_path / 'env.sh'}' is not a directory")):
        check_plot_path(tmp_path / "env.sh" / "cmp.png")


def test_a_results_file_without_rounds_is_refused_by_compare(tmp_path: Path) -> None:
    empty = {**_results("dsl", 1, 0, 0.5), "rounds": []}
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    with pytest.raises(ConfigError, match=r"empty\.json is not a valid results file: it holds no rounds"):
        load_results(tmp_path / "empty.json")


def test_readme_shows_the_comparison_of_the_demo_s_recorded_results() -> None:
    recorded = REPO_ROOT / "docs" / "results" / "demo"
    runs = [load_results(recorded / f"demo-{algorithm}.json") for algorithm in ("dsl", "csl")]
    readme = (REPO_ROOT / "README.md").read_text()
    assert comparison_table(runs) in readme, "README's demo table is stale: copy the compare of docs/results/demo"
    commit = runs[0]["versions"]["splitflower_commit"][:7]
    assert f"One run on this 2-core machine at {commit}" in readme
