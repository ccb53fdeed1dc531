"""How whole batched server calls are, by flush timeout: batched LocFedMix-SL through ``splitflower run``.

Each flush timeout runs the same command in a fresh process (a Flower simulation on Ray), and
the record holds, from its results file: the server model's batched calls, the client requests
they served (3 clients: 3 per call when every batch is whole), the calls that ran on the flush
timeout without every client's request, the round's seconds and the test accuracy::

    .venv/bin/python benchmarks/batching.py [--flush-timeouts 0.05 1] [--train-size 6000]

It writes ``<out-dir>/batching-<short commit>[-dirty].json`` and prints a table. A report, not
a test.
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


def run_once(flush_timeout: float, args: argparse.Namespace, run_cli: transport.CliRunner) -> dict[str, Any]:
    """One batched LocFedMix run; the figures of its single round."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "results.json"
        command = ["run", "--algorithm", "locfedmix", "--model", "lenet5"]
        command += ["--dataset", args.dataset, "--clients", str(CLIENTS), "--rounds", "1"]
        command += ["--train-size", str(args.train_size), "--test-size", str(args.test_size)]
        command += ["--flush-timeout", str(flush_timeout), "--out", str(out)]
        run_cli(command)
        results = json.loads(out.read_text())
    (entry,) = results["rounds"]
    (server,) = entry["server_models"]
    return {
        "flush_timeout_s": flush_timeout,
        **server["batching"],
        "requests_per_call": round(server["batching"]["requests"] / max(server["batching"]["calls"], 1), 3),
        "round_s": round(entry["seconds"], 2),
        "test_accuracy": entry.get("test_accuracy"),
    }


def main(argv: list[str] | None = None, run_cli: transport.CliRunner = transport.run_cli_in_fresh_process) -> int:
    """``run_cli``: how each run is started (default: ``splitflower`` in a fresh process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--flush-timeouts", type=float, nargs="+", default=[0.05, 1.0], help="seconds, one run each")
    parser.add_argument("--train-size", type=int, default=6000, help="training examples (default %(default)s)")
    parser.add_argument("--test-size", type=int, default=1000, help="test examples (default %(default)s)")
    parser.add_argument("--dataset", default="fashion-mnist", help="as splitflower run takes it")
    parser.add_argument("--out-dir", type=Path, default=transport.DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    record = transport.new_record("batching")
    record["setup"] = {"algorithm": "locfedmix", "model": "lenet5", "clients": CLIENTS, "rounds": 1}
    record["setup"] |= {"dataset": args.dataset, "train_size": args.train_size, "test_size": args.test_size}
    record["runs"] = [run_once(timeout, args, run_cli) for timeout in args.flush_timeouts]
    print("flush s  calls  requests  per call  on timeout  round s  accuracy")
    for run in record["runs"]:
        print(
            f"{run['flush_timeout_s']:7g}  {run['calls']:5d}  {run['requests']:8d}  {run['requests_per_call']:8.2f}  "
            f"{run['timeout_flushes']:10d}  {run['round_s']:7.1f}  {run['test_accuracy']:.4f}"
        )
    transport.write_record(record, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
