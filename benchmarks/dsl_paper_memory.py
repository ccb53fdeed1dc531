"""Peak training memory of DSL and CSL: per party over a real channel, by in-flight window,
and co-located (both halves in one process and one tally, as the paper's code measured it).

Writes two tables the grid report (``splitflower reproduce dsl-paper``) includes:

* ``extra-memory-window.json``: the client's and the server's peak tally for CSL at windows
  1 and 4 (batches whose activations the client holds until their gradients return) and DSL
  at windows 0 (blocking: the client waits for the server each batch), 1, 4 and 8 (batches
  sent but not yet acknowledged; the default is 8), with the client's peak split into saved
  activations, payload in flight and model state (parameters, gradients, optimizer state).
  Client and server run in this process, on separate threads with separate tallies, over
  the gRPC service on loopback (the same code path as a Flower run, without Ray).
* ``extra-memory-colocated.json``: both halves trained in one thread with one tally and no
  channel: CSL (client forward, server forward/backward/step, client backward/step) and DSL
  (client forward, auxiliary loss backward/step, then server forward/backward/step).

The tally is deterministic for a given model, cut and batch size (see
``splitflower.metering``), except the payload in flight at windows above 1 (CSL's futures,
DSL's unacknowledged sends), which depends on how far the server lags behind the client:
it moves by whole requests, one batch's each (6.4 MB for ResNet-20 cut s), from run to run.

Usage: ``python benchmarks/dsl_paper_memory.py --out docs/results [--model resnet20]
[--cuts s,m,d] [--batches 6]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitflower.experiment import Experiment, ExperimentConfig
from splitflower.metering import MemoryTally
from splitflower.proxy import ServerModelProxy
from splitflower.reproduce import PAPER_HYPERPARAMETERS
from splitflower.results import source_commit, write_results
from splitflower.scheduling import ImmediateScheduler
from splitflower.server_model import sgd
from splitflower.service import SplitService
from splitflower.wire import ConfigKey

WINDOWS = (("csl", 1), ("csl", 4), ("dsl", 0), ("dsl", 1), ("dsl", 4), ("dsl", 8))
MB = 1e6


def _config(
    model: str,
    cut: str,
    batches: int,
    algorithm: str = "csl",
    window: int | None = None,
    dataset: str = "fashion-mnist",
) -> ExperimentConfig:
    hyper = {k: v for k, v in PAPER_HYPERPARAMETERS.items() if k != "strategy"}
    return ExperimentConfig(
        algorithm=algorithm,
        dataset=dataset,
        model=model,
        cut=cut,
        clients=1,
        train_size=batches * int(hyper["batch_size"]),
        test_size=1,
        options=() if window is None else (f"window={window}",),
        **hyper,
    )


def distributed(
    model: str, cut: str, algorithm: str, window: int, batches: int, dataset: str = "fashion-mnist"
) -> dict[str, float]:
    """One client and one server model over the loopback gRPC service; their peak tallies."""
    experiment = Experiment(_config(model, cut, batches, algorithm, window, dataset))
    train_config = experiment.train_config() | {ConfigKey.SERVER_ROUND: 1, ConfigKey.CLIENT_INDEX: 0}
    service = SplitService(port=0)
    service.start()
    try:
        server = experiment.make_server_model()
        server.configure_fit(None, train_config)
        token, _ = service.open_session("client-0", ImmediateScheduler(server))
        client = experiment.make_client(0)
        proxy = ServerModelProxy(service.address, token, max_in_flight=client.max_in_flight, memory=client.memory)
        client.server_model_proxy = proxy
        try:
            client.fit({}, train_config)
        finally:
            proxy.close()
    finally:
        service.stop(grace=0)
    c, s = client.memory, server.memory
    return {
        "client_peak": c.peak_bytes,
        "client_saved": c.peak_saved_bytes,
        "client_in_flight": c.peak_in_flight_bytes,
        "client_state": c.peak_state_bytes,
        "server_peak": s.peak_bytes,
    }


def colocated(model: str, cut: str, algorithm: str, batches: int, dataset: str = "fashion-mnist") -> float:
    """Both halves in one thread, one tally, no channel: the peak (bytes)."""
    experiment = Experiment(_config(model, cut, batches, algorithm, dataset=dataset))
    client = experiment.make_client(0)  # holds the segment (and DSL's auxiliary head)
    top = experiment.make_server_model().model
    modules = [*client.model.values(), top]
    params = [p for m in modules for p in m.parameters()]
    hyper = PAPER_HYPERPARAMETERS
    optimizer = sgd(hyper["momentum"], hyper["weight_decay"])(params, hyper["lr"])
    tally = MemoryTally()
    loss_fn = nn.functional.cross_entropy
    generator = torch.Generator().manual_seed(0)
    for x, y in client.train_data.batches(int(hyper["batch_size"]), shuffle=True, generator=generator):
        with tally.track():
            z = client.segment(x)
            optimizer.zero_grad()
            if algorithm == "csl":
                cut_z = z.detach().requires_grad_()
                loss_fn(top(cut_z), y).backward()
                z.backward(cut_z.grad)
                optimizer.step()
            else:
                loss_fn(client.model["aux_head"](z), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                loss_fn(top(z.detach()), y).backward()
                optimizer.step()
            del z
        tally.observe_state(modules, optimizer)
    return float(tally.peak_bytes)


def _table(
    title: str, command: str, commit: str, columns: list[str], rows: list[list[Any]], notes: str
) -> dict[str, Any]:
    return {"title": title, "command": command, "commit": commit, "columns": columns, "rows": rows, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--cuts", default="s,m,d")
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # client and server share this process; keep the machine usable
    command = "python " + " ".join(["benchmarks/dsl_paper_memory.py", *(argv or sys.argv[1:])])
    commit = source_commit()
    cuts = [c.strip() for c in args.cuts.split(",") if c.strip()]
    window_rows: list[list[Any]] = []
    ratio_rows: list[list[Any]] = []
    colocated_rows: list[list[Any]] = []
    for cut in cuts:
        found: dict[tuple[str, int], dict[str, float]] = {}
        for algorithm, window in WINDOWS:
            started = time.perf_counter()
            found[(algorithm, window)] = m = distributed(args.model, cut, algorithm, window, args.batches)
            print(
                f"{args.model} cut {cut} {algorithm} window {window}: client {m['client_peak'] / MB:.2f} MB, "
                f"server {m['server_peak'] / MB:.2f} MB ({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
            window_rows.append(
                [args.model, cut, algorithm.upper(), window]
                + [round(m[k] / MB, 2) for k in ("client_peak", "client_saved", "client_in_flight", "client_state")]
                + [round(m["server_peak"] / MB, 2)]
            )
        for window in (1, 4):
            csl, dsl = found[("csl", window)], found[("dsl", window)]
            ratio_rows.append(
                [
                    args.model,
                    cut,
                    window,
                    round(dsl["client_peak"] / csl["client_peak"], 3),
                    round(dsl["server_peak"] / csl["server_peak"], 3),
                ]
            )
        blocking = found[("dsl", 0)]
        ratio_rows.append(
            [
                args.model,
                cut,
                "DSL 0 vs CSL 1",
                round(blocking["client_peak"] / found[("csl", 1)]["client_peak"], 3),
                round(blocking["server_peak"] / found[("csl", 1)]["server_peak"], 3),
            ]
        )
        together = {a: colocated(args.model, cut, a, args.batches) for a in ("csl", "dsl")}
        colocated_rows.append(
            [
                args.model,
                cut,
                round(together["csl"] / MB, 2),
                round(together["dsl"] / MB, 2),
                round(together["dsl"] / together["csl"], 3),
            ]
        )
        print(
            f"{args.model} cut {cut} co-located: CSL {together['csl'] / MB:.2f} MB, DSL {together['dsl'] / MB:.2f} MB",
            flush=True,
        )
    setting = (
        f"Fashion-MNIST, batch {PAPER_HYPERPARAMETERS['batch_size']}, the number of batches in the command, "
        "one client; memory is the deterministic tally (parameters + gradients + optimizer state + "
        "autograd-saved activations + request payload in flight), not the process RSS."
    )
    tables = {
        "extra-memory-window.json": _table(
            "Peak memory per party by in-flight window (MB, distributed: client and server over gRPC)",
            command,
            commit,
            [
                "model",
                "cut",
                "algorithm",
                "window",
                "client peak",
                "client saved activations",
                "client in flight",
                "client state",
                "server peak",
            ],
            window_rows,
            setting + " CSL window k: the client holds k batches' activations until their gradients return. "
            "DSL window k: up to k sent batches unacknowledged, each holding its encoded request (0: blocking).",
        ),
        "extra-memory-ratios.json": _table(
            "Peak memory DSL / CSL per party at the same in-flight window",
            command,
            commit,
            ["model", "cut", "window", "client DSL/CSL", "server DSL/CSL"],
            ratio_rows,
            "Ratios of the peak tallies in the table above (distributed runs).",
        ),
        "extra-memory-colocated.json": _table(
            "Peak memory with both halves in one process (co-located, as the paper's code measured it; MB)",
            command,
            commit,
            ["model", "cut", "CSL", "DSL", "DSL/CSL"],
            colocated_rows,
            setting + " One tally over both halves, no channel: CSL keeps the client's activations alive while "
            "the server computes; DSL frees them after the auxiliary step, before the server's step.",
        ),
    }
    for path in write_tables(args.out, tables, args.model):
        print(f"written: {path}")
    return 0


def write_tables(folder: Path, tables: dict[str, dict[str, Any]], model: str) -> list[Path]:
    """Write each table, keeping the rows of other models already in the file (one file
    holds e.g. ResNet-20 and ResNet-110); the commands and commits of both are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        path = folder / name
        if path.is_file():
            old = json.loads(path.read_text())
            kept = [row for row in old.get("rows", []) if row and row[0] != model]
            if kept:
                table = table | {"rows": kept + table["rows"]}
                for key in ("command", "commit"):
                    earlier = [part for part in str(old.get(key, "")).split("; ") if part and part != table[key]]
                    table[key] = "; ".join([*earlier, table[key]])
        write_results(table, path)
        written.append(path)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
