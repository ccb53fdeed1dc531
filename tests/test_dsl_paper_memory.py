"""The memory benchmark measures what it claims: held batches cost memory, co-location costs CSL."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dsl_paper_memory.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dsl_paper_memory", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_csl_client_holds_the_activations_of_every_batch_in_flight(bench: ModuleType) -> None:
    one = bench.distributed("lenet5", "s", "csl", 1, 4, dataset="synthetic")
    four = bench.distributed("lenet5", "s", "csl", 4, 4, dataset="synthetic")
    assert four["client_saved"] >= 3.9 * one["client_saved"]
    assert four["server_peak"] == one["server_peak"]  # the server's work per batch is the same


def test_dsl_client_frees_its_activations_after_the_local_step(bench: ModuleType) -> None:
    csl = bench.distributed("lenet5", "s", "csl", 4, 4, dataset="synthetic")
    dsl = bench.distributed("lenet5", "s", "dsl", 4, 4, dataset="synthetic")
    blocking = bench.distributed("lenet5", "s", "dsl", 0, 4, dataset="synthetic")
    assert dsl["client_saved"] < csl["client_saved"] / 2
    assert blocking["client_in_flight"] <= dsl["client_in_flight"]


def test_colocated_csl_keeps_the_client_activations_while_the_server_computes(bench: ModuleType) -> None:
    assert bench.colocated("lenet5", "s", "dsl", 3, dataset="synthetic") < bench.colocated(
        "lenet5", "s", "csl", 3, dataset="synthetic"
    )


def test_tables_keep_the_rows_of_other_models(bench: ModuleType, tmp_path: Path) -> None:
    def table(model: str, command: str) -> dict[str, object]:
        return {"title": "t", "command": command, "commit": "c", "columns": ["model"], "rows": [[model]]}

    bench.write_tables(tmp_path, {"extra-x.json": table("resnet20", "a")}, "resnet20")
    bench.write_tables(tmp_path, {"extra-x.json": table("resnet110", "b")}, "resnet110")
    bench.write_tables(tmp_path, {"extra-x.json": table("resnet20", "a2")}, "resnet20")
    stored = json.loads((tmp_path / "extra-x.json").read_text())
    assert stored["rows"] == [["resnet110"], ["resnet20"]]
    assert stored["command"] == "a; b; a2"
