"""Smoke runs of ``benchmarks/transport.py --quick`` and ``benchmarks/rtt_breakdown.py``: each
runs end to end and writes its results.

Only the shape of the output is checked, never the timing or byte-ratio targets: on a shared
or loaded machine those are the benchmark's findings, not pass/fail criteria of the code.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO_ROOT, ThreadBackend
from splitflower import cli
from splitflower._malloc import KEEP_DEFAULTS_ENV

BENCHMARKS = REPO_ROOT / "benchmarks"

TOP_LEVEL_KEYS = {
    "benchmark",
    "commit",
    "commit_short",
    "dirty",
    "date",
    "command",
    "quick",
    "machine",
    "server",
    "rtt",
    "wire",
    "csl",
    "targets",
    "notes",
}
MACHINE_KEYS = {"cpu_count", "platform", "python", "torch", "grpcio", "torch_threads"}
RTT_KEYS = {
    "size_bytes",
    "bare_median_us",
    "bare_p90_us",
    "proxy_median_us",
    "proxy_p90_us",
    "ratio",
    "pass",
    "codec_median_us",
    "codec_ratio",
}
WIRE_KEYS = {"size_bytes", "bare_ratio", "proxy_ratio", "accounted_ratio", "pass"}
CSL_KEYS = {
    "one_process_median_ms",
    "split_median_ms",
    "ratio",
    "torch_threads_per_process",
    "pass",
    "bare_split_median_ms",
    "bare_split_ratio",
    "split_over_bare_split",
    "phase_medians_ms",
    "split_minor_faults_per_step",
}
SIZES = [1024, 64 * 1024, 1024 * 1024, 8 * 1024 * 1024]


def _run_benchmark(script: str, *args: str, timeout: float) -> None:
    command = [sys.executable, str(BENCHMARKS / script), *args]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"


@pytest.mark.slow
def test_transport_benchmark_quick_run_writes_results(tmp_path: Path) -> None:
    _run_benchmark("transport.py", "--quick", "--out-dir", str(tmp_path), timeout=240)

    written = sorted(tmp_path.glob("transport-*.json"))
    assert len(written) == 1, sorted(p.name for p in tmp_path.iterdir())
    results = json.loads(written[0].read_text())
    assert TOP_LEVEL_KEYS <= results.keys()
    assert results["benchmark"] == "transport"
    assert results["quick"] is True
    assert "--quick" in results["command"]
    assert results["commit"].removesuffix("-dirty")
    assert MACHINE_KEYS <= results["machine"].keys()

    assert [row["size_bytes"] for row in results["rtt"]] == SIZES
    assert [row["size_bytes"] for row in results["wire"]] == SIZES
    for row in results["rtt"]:
        assert RTT_KEYS <= row.keys()
        assert row["bare_median_us"] > 0 and row["proxy_median_us"] > 0 and row["codec_median_us"] > 0
    for row in results["wire"]:
        assert WIRE_KEYS <= row.keys()
        # Every payload byte crossed the relay, plus framing: a ratio below 1 means miscounting.
        assert row["bare_ratio"] >= 1.0 and row["proxy_ratio"] >= 1.0
    assert CSL_KEYS <= results["csl"].keys()
    assert results["csl"]["one_process_median_ms"] > 0 and results["csl"]["split_median_ms"] > 0
    assert results["csl"]["bare_split_median_ms"] > 0
    phases = results["csl"]["phase_medians_ms"]
    assert phases["split"]["server_compute"] > 0 and phases["one_process_cut"]["server_half"] > 0
    assert phases["one_process_cut_server_half_on_a_compute_thread"]["server_half"] > 0
    assert {t["name"] for t in results["targets"]} >= {"CSL split/one-process step"}

    table = (tmp_path / "transport.md").read_text()
    assert results["commit"] in table
    assert "| 8 MiB |" in table


BREAKDOWN_STAGES = {
    "client: whole call",
    "client: inside the gRPC call",
    "server: whole handler",
    "server: decode request",
    "server: compute-thread round trip",
    "server: job on the compute thread",
    "server: encode reply",
}


@pytest.mark.slow
def test_rtt_breakdown_times_every_stage_where_it_runs(tmp_path: Path) -> None:
    _run_benchmark("rtt_breakdown.py", "--calls", "60", "--out-dir", str(tmp_path), timeout=180)
    (written,) = tmp_path.glob("rtt-breakdown-*.json")
    results = json.loads(written.read_text())
    stages = results["in_place_us_per_call"]
    assert BREAKDOWN_STAGES <= stages.keys()
    # A stopwatch that never ran (a renamed method left unwrapped) reads zero.
    assert all(stage["wall_us"] > 0 for stage in stages.values()), stages
    assert stages["server: whole handler"]["wall_us"] >= stages["server: decode request"]["wall_us"]
    assert stages["client: whole call"]["wall_us"] >= stages["client: inside the gRPC call"]["wall_us"]
    assert results["round_trip"]["bare_median_us"] > 0 and results["round_trip"]["proxy_median_us"] > 0
    assert list(results["bare_after_client_busy_us"]) == ["0 us", "25 us", "50 us", "100 us", "200 us", "400 us"]
    assert all(value > 0 for value in results["bare_after_client_busy_us"].values())
    hot = results["hot_loop_us"]
    # The stopwatch's own cost is a difference of two timings: noise can push it either way.
    assert all(value > 0 for stage, value in hot.items() if not stage.startswith("one stopwatch")), hot
    assert any(stage.startswith("one stopwatch") for stage in hot)


def test_the_fresh_pair_settings_name_what_their_records_are_read_by(monkeypatch: pytest.MonkeyPatch) -> None:
    # Their runs go through _fresh_pairs, run end to end by the huge-pages smoke test below.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    malloc_settings = importlib.import_module("malloc_settings")
    assert list(malloc_settings.SETTINGS) == ["splitflower", "glibc_top_pad", "glibc_defaults"]
    assert malloc_settings.SETTINGS["glibc_defaults"] == {KEEP_DEFAULTS_ENV: "1"}
    assert list(importlib.import_module("openmp_release").SETTINGS) == ["released", "kept_spinning"]


@pytest.mark.slow
def test_a_fresh_pair_benchmark_with_the_unsplit_step_records_it_beside_the_split_one(tmp_path: Path) -> None:
    _run_benchmark("huge_pages.py", "--pairs", "1", "--steps", "2", "--out-dir", str(tmp_path), timeout=300)
    (written,) = tmp_path.glob("huge-pages-*.json")
    results = json.loads(written.read_text())
    assert list(results["runs"]) == ["torch_default", "huge_pages"]
    assert set(results["ratios"]) == {"torch_default / huge_pages"}
    for name, (run,) in results["runs"].items():
        assert run["median_ms"] > 0
        assert all(math.isfinite(run[f"{party}_faults_per_step"]) for party in ("client", "server"))
        assert run["one_process_median_ms"] > 0 and run["paired_split_median_ms"] > 0, run
        ratio = run["paired_split_median_ms"] / run["one_process_median_ms"]
        assert run["split_over_one_process"] == pytest.approx(ratio, abs=1e-3)
        assert results["mean_split_over_one_process"][name] == pytest.approx(ratio, abs=1e-3)


@pytest.mark.slow
def test_transport_designs_benchmark_records_each_design(tmp_path: Path) -> None:
    _run_benchmark("transport_designs.py", "--calls", "24", "--out-dir", str(tmp_path), timeout=240)
    (written,) = tmp_path.glob("transport-designs-*.json")
    results = json.loads(written.read_text())
    assert list(results["servers"]) == [
        "sync Echo",
        "sync HandoffEcho",
        "aio Echo",
        "aio HandoffEcho",
        "splitflower proxy echo",
        "proxy echo, handlers on compute",
    ]
    assert list(results["clients"]) == [
        "blocking, 0 us work",
        "polling 400 us, 0 us work",
        "blocking, 150 us work",
        "polling 400 us, 150 us work",
    ]
    for figures in [*results["servers"].values(), *results["clients"].values()]:
        assert figures["median_us"] > 0 and len(figures["block_medians_us"]) == 6, figures
    assert "idle_policy" not in results  # only on request: it writes a kernel parameter


def test_transport_designs_benchmark_refuses_a_negative_halt_polling_window() -> None:
    command = [sys.executable, str(BENCHMARKS / "transport_designs.py"), "--halt-poll-ns", "-1"]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 2, completed.stderr
    assert "--halt-poll-ns must be a window of 0 or more nanoseconds, got -1" in completed.stderr


@pytest.mark.slow
def test_ray_start_benchmark_records_each_setting_s_children_and_tries(tmp_path: Path) -> None:
    args = ["--pairs", "1", "--children-runs", "1", "--children", "20", "--out-dir", str(tmp_path)]
    _run_benchmark("ray_start.py", *args, timeout=300)
    (written,) = tmp_path.glob("ray-start-*.json")
    results = json.loads(written.read_text())
    settings = ["handlers_on", "handlers_off"]
    assert list(results["tries"]) == settings and list(results["children"]["runs"]) == settings
    for setting, (outcome,) in results["tries"].items():
        assert isinstance(outcome["started"], bool) and outcome["calls"] > 0, outcome
        assert results["failed"][setting] == int(not outcome["started"])
    assert list(results["children_vfork"]["runs"]) == ["handlers_on"]
    for children in (results["children"], results["children_vfork"]):
        for setting, (exits,) in children["runs"].items():
            assert sum(exits.values()) == 20, exits
            assert children["died"][setting] == 20 - exits.get("0", 0)


def _in_process_on_threads(monkeypatch: pytest.MonkeyPatch, benchmark: str) -> Any:
    """The benchmark module, and a runner of ``splitflower`` in this process on threads: what
    a smoke test needs of it is its logic, not Ray's start (its figures' runs are fresh processes)."""
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def run_cli(argv: list[str]) -> None:
        assert cli.main([argv[0], "--attempts", "1", *argv[1:]]) == 0

    return importlib.import_module(benchmark), run_cli


@pytest.mark.slow
def test_batching_benchmark_records_how_whole_the_batches_were(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batching, run_cli = _in_process_on_threads(monkeypatch, "batching")
    options = ["--flush-timeouts", "1", "--dataset", "synthetic", "--train-size", "192", "--test-size", "64"]
    assert batching.main([*options, "--out-dir", str(tmp_path)], run_cli=run_cli) == 0
    (written,) = tmp_path.glob("batching-*.json")
    (run,) = json.loads(written.read_text())["runs"]
    # 3 clients of 64 examples, one batch each: 3 requests, in one call if every batch was whole.
    assert run["flush_timeout_s"] == 1.0 and run["requests"] == 3 and 1 <= run["calls"] <= 3, run
    assert run["requests_per_call"] == round(3 / run["calls"], 3) and 0.0 <= run["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_request_order_benchmark_records_each_order_and_whether_its_runs_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request_order, run_cli = _in_process_on_threads(monkeypatch, "request_order")
    options = ["--repeats", "2", "--rounds", "1", "--dataset", "synthetic", "--train-size", "192", "--test-size", "64"]
    assert request_order.main([*options, "--out-dir", str(tmp_path)], run_cli=run_cli) == 0
    (written,) = tmp_path.glob("request-order-*.json")
    record = json.loads(written.read_text())
    clients, arrival, clients_again, _ = record["runs"]
    # 3 clients of 64 examples, one batch each: one cycle of 3 requests in client order, none by arrival.
    assert (clients["request_order"], arrival["request_order"]) == ("clients", "arrival")
    assert clients["in_client_order"] == [{"cycles": 1, "requests": 3, "timeout_flushes": 0}], clients
    assert arrival["in_client_order"] == [None] and len(arrival["round_s"]) == 1
    assert record["repeatable"]["clients"] is True and clients_again == clients | {"round_s": clients_again["round_s"]}
    assert record["repeatable"]["arrival"] in (True, False), "arrival order may or may not repeat one batch each"


@pytest.mark.parametrize("script", ["batching.py", "request_order.py", "model_saves.py"])
def test_a_benchmark_that_runs_splitflower_in_fresh_processes_starts_as_a_script(script: str) -> None:
    # Their smoke tests run them in-process: here the script itself, as the records are made.
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and "--out-dir" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_model_saves_benchmark_records_both_ways_of_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_saves, _ = _in_process_on_threads(monkeypatch, "model_saves")
    assert model_saves.main(["--rounds-so-far", "2", "20", "--out-dir", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("model-saves-*.json")
    small, large = json.loads(written.read_text())["runs"]
    assert (small["rounds_so_far"], large["rounds_so_far"]) == (2, 20)
    assert all(run["fresh_write_ms"] > 0 and run["writer_next_round_ms"] > 0 for run in (small, large))
    assert large["file_mb"] > small["file_mb"] > 0, "the history grows with the rounds"
    assert all(run["fresh_results_write_ms"] > 0 and run["progress_writer_next_round_ms"] > 0 for run in (small, large))
    assert large["results_file_mb"] > small["results_file_mb"] > 0
