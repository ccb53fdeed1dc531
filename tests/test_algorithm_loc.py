"""The lines-of-logic script: every algorithm needs at most the lines SplitBud's Table 1 reports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "algorithm_loc.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("algorithm_loc", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_algorithm_needs_at_most_splitbuds_lines() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _script().table()
    assert [r["algorithm"] for r in rows] == list(_script().SPLITBUD)
    for row in rows:
        assert row["ours_client"] <= row["splitbud_client"], row
        assert row["ours_server"] <= row["splitbud_server"], row
        assert f"| {row['algorithm']} |" in done.stdout


def test_readme_shows_the_script_s_table() -> None:
    readme = (SCRIPT.parents[1] / "README.md").read_text()
    assert _script().markdown(_script().table()) in readme, "README's table is stale: rerun scripts/algorithm_loc.py"


def test_the_rule_counts_code_and_skips_docstrings_comments_decorators() -> None:
    script = _script()

    class Example:
        """Docstring: not counted."""

        size = 3  # counted

        @staticmethod
        def twice(
            x: int,
        ) -> int:
            """Not counted."""
            # not counted

            return 2 * x

    assert script.class_lines(Example) == 5  # size, three lines of the def, return


def test_the_tutorial_counts_fedsl_as_the_script_does() -> None:
    tutorial = " ".join((SCRIPT.parents[1] / "docs" / "tutorial.md").read_text().split())
    (fedsl,) = [row for row in _script().table() if row["algorithm"] == "FedSL"]
    client, server = fedsl["ours_client"], fedsl["ours_server"]
    assert f"in {client + server} lines of logic ({client} client, {server} server;" in tutorial
