"""The results file's writers: what a reader gets back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from splitflower.results import ProgressWriter, write_results


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
