"""What taking turns costs, and what it buys: parallel CSL through ``splitflower run`` under each
request order, each run repeated with the same seed.

``--request-order clients`` (the default) runs a request of each client in turn on the shared
server model, so runs repeat bit for bit; ``arrival`` runs each request as soon as the model is
free. Every run is a fresh process (a Flower simulation on Ray); the record holds, per order and
repeat, the test accuracy and loss after the last round, each round's seconds, and the server
model's cycles (a request of each client, in turn), requests and cycles on the flush timeout
(``in_client_order``; none under ``arrival``), and whether the repeats of an order ended with
the same accuracy and loss::

    .venv/bin/python benchmarks/request_order.py [--repeats 2] [--rounds 2] [--train-size 0]

It writes ``<out-dir>/request-order-<short commit>[-dirty].json`` and prints a table. A report,
not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport  # provenance, machine description and the results folder

CLIENTS = 3
ORDERS = ("clients", "arrival")


def run_once(order: str, args: argparse.Namespace, run_cli: transport.CliRunner) -> dict[str, Any]:
    """One parallel CSL run; its final figures and each round's."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "results.json"
        command = ["run", "--algorithm", "csl", "--strategy", "parallel", "--model", "lenet5"]
        command += ["--dataset", args.dataset, "--clients", str(CLIENTS)]
        command += ["--rounds", str(args.rounds), "--request-order", order]
        command += ["--train-size", str(args.train_size), "--test-size", str(args.test_size), "--out", str(out)]
        run_cli(command)
        results = json.loads(out.read_text())
    turns = [server.get("in_client_order") for entry in results["rounds"] for server in entry["server_models"]]
    return {
        "request_order": order,
        **results["final"],
        "round_s": [round(entry["seconds"], 2) for entry in results["rounds"]],
        "in_client_order": turns,
    }


def _repeatable(runs: list[dict[str, Any]]) -> bool | None:
    """Whether the runs ended alike (None: fewer than two, nothing to compare)."""
    if len(runs) < 2:
        return None
    return len({(run["test_accuracy"], run["test_loss"]) for run in runs}) == 1


def main(argv: list[str] | None = None, run_cli: transport.CliRunner = transport.run_cli_in_fresh_process) -> int:
    """``run_cli``: how each run is started (default: ``splitflower`` in a fresh process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=2, help="runs per order, alternating (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (default %(default)s)")
    parser.add_argument("--train-size", type=int, default=0, help="training examples, 0: all (default %(default)s)")
    parser.add_argument("--test-size", type=int, default=0, help="test examples, 0: all (default %(default)s)")
    parser.add_argument("--dataset", default="fashion-mnist", help="as splitflower run takes it")
    parser.add_argument("--out-dir", type=Path, default=transport.DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    record = transport.new_record("request-order")
    record["setup"] = {"algorithm": "csl", "strategy": "parallel", "model": "lenet5", "clients": CLIENTS}
    record["setup"] |= {"dataset": args.dataset, "rounds": args.rounds}
    record["setup"] |= {"train_size": args.train_size, "test_size": args.test_size}
    runs = [run_once(order, args, run_cli) for _ in range(args.repeats) for order in ORDERS]
    record["runs"] = runs
    record["repeatable"] = {order: _repeatable([r for r in runs if r["request_order"] == order]) for order in ORDERS}
    print("order    accuracy  loss      round s           cycles / requests / on timeout (last round)")
    for run in runs:
        last = run["in_client_order"][-1]
        turns = "-" if last is None else f"{last['cycles']} / {last['requests']} / {last['timeout_flushes']}"
        seconds = ", ".join(f"{s:.1f}" for s in run["round_s"])
        figures = f"{run['test_accuracy']:.4f}    {run['test_loss']:.4f}"
        print(f"{run['request_order']:8s} {figures}    {seconds:16s}  {turns}")
    print("the same accuracy and loss in every repeat:", record["repeatable"])
    transport.write_record(record, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
