"""Smoke run of ``benchmarks/transport.py --quick``: it runs end to end and writes its results.

Only the shape of the output is checked, never the timing or byte-ratio targets: on a shared
or loaded machine those are the benchmark's findings, not pass/fail criteria of the code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "transport.py"

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


@pytest.mark.slow
def test_transport_benchmark_quick_run_writes_results(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"

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
    assert {t["name"] for t in results["targets"]} >= {"CSL split/one-process step"}

    table = (tmp_path / "transport.md").read_text()
    assert results["commit"] in table
    assert "| 8 MiB |" in table
