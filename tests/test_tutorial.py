"""docs/tutorial.md is complete: its Python blocks run as they are, and its classes are algorithms/fedsl.py's."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from splitflower.algorithms import fedsl

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.DOTALL)


def _without_docstrings(source: str, name: str) -> str:
    tree = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == name)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(body, list) and isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.dump(tree)


def test_tutorial_code_runs_and_trains() -> None:
    namespace: dict[str, Any] = {"__name__": "tutorial"}
    exec(compile("\n".join(_blocks()), str(TUTORIAL), "exec"), namespace)
    server, clients = namespace["server"], namespace["clients"]
    assert server.num_examples == 2 * 256, "two local epochs over both clients' data"
    assert all(c.metrics["aux_loss"] > 0 for c in clients)
    assert all(c.server_model_proxy.traffic.by_method()["train_batch"]["down_payload_bytes"] == 0 for c in clients)


def test_tutorial_classes_are_the_library_s_and_within_25_lines() -> None:
    code = "\n".join(_blocks()[:2])
    library = Path(fedsl.__file__).read_text()
    for name in ("FedSLClient", "FedSLServerModel"):
        assert _without_docstrings(code, name) == _without_docstrings(library, name), name
    logic = [line for line in code.splitlines() if line.startswith("    ") and not line.strip().startswith("@")]
    assert len(logic) <= 25, logic
