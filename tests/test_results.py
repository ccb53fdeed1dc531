"""The results file's writers: what a reader gets back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from splitflower.results import ProgressWriter, source_commit, write_results


def test_a_progress_file_reads_as_the_document_written_whole(tmp_path: Path) -> None:
    rounds: list[dict[str, Any]] = [{"round": 1, "test_loss": float("nan"), "bytes": {"up": 3}}]
    rounds.append({"round": 2, "test_loss": 0.25})
    document = {"schema": "splitflower.results/1", "config": {"rounds": 5}, "incomplete": {"last_round": 2}}
    keep = ProgressWriter(tmp_path / "run.partial.json")
    for count in (1, 2):
        so_far = {**document, "rounds": rounds[:count], "final": {"test_loss": rounds[count - 1]["test_loss"]}}
        kept = json.loads(keep(so_far).read_text())
        whole = json.loads(write_results(so_far, tmp_path / "whole.json").read_text())
        assert kept == whole and [entry["round"] for entry in kept["rounds"]] == list(range(1, count + 1))
    assert kept["rounds"][0]["test_loss"] is None, "strict JSON: a NaN is written as null"


def test_a_round_given_anew_is_encoded_anew(tmp_path: Path) -> None:
    keep = ProgressWriter(tmp_path / "run.partial.json")
    keep({"rounds": [{"round": 1, "test_accuracy": 0.5}]})
    again = json.loads(keep({"rounds": [{"round": 1, "test_accuracy": 0.75}]}).read_text())
    assert again["rounds"] == [{"round": 1, "test_accuracy": 0.75}]


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def test_a_source_commit_is_dirty_for_a_change_anywhere_in_the_checkout_but_the_excluded_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPLITFLOWER_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    for name in ("package/code.py", "benchmarks/bench.py", "benchmarks/results/old.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    package = tmp_path / "package"  # asked from a folder below the top, as the installed package is
    assert not source_commit(["benchmarks/results"], checkout=package).endswith("+dirty")

    (tmp_path / "benchmarks/results/old.json").write_text("1\n")
    assert not source_commit(["benchmarks/results"], checkout=package).endswith("+dirty")
    assert source_commit(checkout=package).endswith("+dirty")

    (tmp_path / "benchmarks/bench.py").write_text("1\n")  # outside the package's folder
    assert source_commit(["benchmarks/results"], checkout=package).endswith("+dirty")
