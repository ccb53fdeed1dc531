"""Lines of algorithm logic per algorithm, beside SplitBud's Table 1.

The rule (applied by reading the source with ``ast``):

* Counted: every physical line of the bodies of the algorithm's client class and
  server-model class (as registered in ``ALGORITHMS``), including ``def`` lines, class
  attributes (``Options = ...``) and every line of a statement that spans several; plus
  the same for each base class defined in ``algorithms/`` that they inherit from (a
  SplitAvg client that is a CSL client counts CSL's lines). For SplitFed v1 and v2 the
  CSL pair is counted, and the strategy class's own body is added to the server column.
* Not counted: the ``class`` line, decorator lines, docstrings, comments, blank lines; the
  framework's base classes (``Client``, ``ServerModel``, ...); module-level model and data
  code (layer builders such as the InfoPro decoder, input rescaling) and options
  dataclasses (configuration), as SplitBud leaves out "model definition, data loading".

    .venv/bin/python scripts/algorithm_loc.py [--json]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import textwrap
from typing import Any

from splitflower.algorithms import ALGORITHMS
from splitflower.strategies import STRATEGIES

# SplitBud (Table 1): lines of code of the client and of the server model.
SPLITBUD: dict[str, tuple[int, int]] = {
    "SplitFed v1": (7, 8),
    "SplitFed v2": (7, 8),
    "U-shaped SL": (13, 15),
    "StreamSL": (7, 7),
    "FedSL": (11, 7),
    "LocFedMix-SL": (17, 25),
    "SplitAvg": (17, 21),
}
# Row -> (algorithm, strategy whose own lines join the server column, if any).
ROWS: dict[str, tuple[str, str | None]] = {
    "SplitFed v1": ("csl", "splitfed-v1"),
    "SplitFed v2": ("csl", "splitfed-v2"),
    "U-shaped SL": ("ushaped", None),
    "StreamSL": ("streamsl", None),
    "FedSL": ("fedsl", None),
    "LocFedMix-SL": ("locfedmix", None),
    "SplitAvg": ("splitavg", None),
}
_ALGORITHM_PACKAGE = "splitflower.algorithms"


def _docstring_lines(node: ast.AST) -> set[int]:
    body = getattr(node, "body", None)
    first = body[0] if isinstance(body, list) and body else None
    if not isinstance(first, ast.Expr) or not isinstance(first.value, ast.Constant):
        return set()
    if not isinstance(first.value.value, str):
        return set()
    return set(range(first.lineno, (first.end_lineno or first.lineno) + 1))


def class_lines(cls: type) -> int:
    """Lines of logic in ``cls``'s own body (see the module docstring for the rule)."""
    source = textwrap.dedent(inspect.getsource(cls))
    tree = ast.parse(source).body[0]
    lines: set[int] = set()
    for statement in getattr(tree, "body", []):
        lines |= set(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    for node in ast.walk(tree):
        lines -= _docstring_lines(node)
    text = source.splitlines()
    return sum(1 for n in lines if text[n - 1].strip() and not text[n - 1].strip().startswith("#"))


def with_algorithm_bases(cls: type) -> int:
    """``cls``'s lines plus those of its bases defined in algorithms/."""
    return sum(class_lines(c) for c in cls.__mro__ if c.__module__.startswith(_ALGORITHM_PACKAGE))


def table() -> list[dict[str, Any]]:
    rows = []
    for row, (name, strategy) in ROWS.items():
        algorithm = ALGORITHMS[name]
        strategy_lines = class_lines(STRATEGIES[strategy]) if strategy else 0
        ours = (with_algorithm_bases(algorithm.client), with_algorithm_bases(algorithm.server_model) + strategy_lines)
        rows.append(
            {
                "algorithm": row,
                "cli": f"--algorithm {name}" + (f" --strategy {strategy}" if strategy else ""),
                "ours_client": ours[0],
                "ours_server": ours[1],
                "strategy_lines": strategy_lines,
                "splitbud_client": SPLITBUD[row][0],
                "splitbud_server": SPLITBUD[row][1],
            }
        )
    return rows


def within_splitbud(row: dict[str, Any]) -> bool:
    """Ours at most SplitBud's, client and server each."""
    return bool(row["ours_client"] <= row["splitbud_client"] and row["ours_server"] <= row["splitbud_server"])


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| algorithm | CLI | splitflower client + server | SplitBud (Table 1) client + server |",
        "|---|---|---|---|",
    ]
    for r in rows:
        note = f" (incl. {r['strategy_lines']} strategy)" if r["strategy_lines"] else ""
        out.append(
            f"| {r['algorithm']} | `{r['cli']}` | {r['ours_client']} + {r['ours_server']}{note} | "
            f"{r['splitbud_client']} + {r['splitbud_server']} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    rows = table()
    print(json.dumps(rows, indent=1) if parser.parse_args().json else markdown(rows))
    over = [r["algorithm"] for r in rows if not within_splitbud(r)]
    if over:
        print(f"more lines than SplitBud: {', '.join(over)}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
