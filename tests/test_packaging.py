"""strategies/ and algorithms/ install as splitflower subpackages, never as top-level modules."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import splitflower.algorithms
import splitflower.strategies

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    # Ray adds the working directory to PYTHONPATH when a test runs a simulation in-process.
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_installed_environment_imports_subpackages_from_the_source_folders(tmp_path: Path) -> None:
    assert Path(splitflower.strategies.__file__).parent == ROOT / "strategies"
    assert Path(splitflower.algorithms.__file__).parent == ROOT / "algorithms"
    probe = "import importlib.util as u, splitflower.strategies\nprint(u.find_spec('strategies'),"
    probe += " u.find_spec('algorithms'))"
    # From outside the checkout, the install exposes no generic top-level modules.
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["None", "None"]


@pytest.mark.slow
def test_wheel_installs_subpackages_under_splitflower(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("splitflower-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "splitflower/strategies/__init__.py" in names
    assert "splitflower/algorithms/csl.py" in names
    assert "splitflower/data/partitioning.py" in names
    assert not [n for n in names if n.startswith(("strategies/", "algorithms/"))]
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    probe = "import splitflower.strategies as s, splitflower.algorithms as a, splitflower.data as d; "
    probe += "print(s.__file__); print(a.__file__); print(d.__file__)"
    # -I: isolated mode, so neither the checkout nor the editable install can answer the import.
    shown = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    files = shown.stdout.splitlines()
    assert len(files) == 3 and all(line.startswith(str(site)) for line in files), files
