"""Wall time per epoch, DSL / CSL, with and without an emulated client link and with and
without pipelining (DSL window 8 vs 0), each configuration run several times.

Every run puts the server model in a process of its own, serving the split-learning gRPC
service (behind the link emulator when there is a link), and trains the client in this process
over that channel: the data path of a Flower run, without Ray and Flower's control messages,
whose start-up (about 35 s a run on this machine) would cost more than the runs themselves.
ResNet-20 cut s on Fashion-MNIST, one client, the paper's hyperparameters, one epoch over a
seeded training subset. The time per epoch is the client's ``fit`` plus closing the proxy
(which waits for every batch still in flight to be trained on by the server).
Configurations: CSL (window 1, blocking), DSL window 0 (blocking: the client waits for the
server after each batch, as a single-process implementation does) and DSL window 8
(pipelined), each without a link and with the emulated link (``--link``, default 10 Mbit/s
up, 50 Mbit/s down, 20 ms RTT; see ``splitflower.linkemu``). Repeats run interleaved (all
configurations once, then again) so that drifting load on the machine spreads over all of them.

Writes ``extra-timing-runs.json`` (every run) and ``extra-timing-ratios.json`` (DSL/CSL of
the median times, with the range over repeats paired in order) into ``--out``; the grid
report includes them.

Usage: ``python benchmarks/dsl_paper_timing.py --out docs/results [--batches 16] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from splitflower.app import client_reply_metrics
from splitflower.compute import run_on_compute_thread
from splitflower.experiment import Experiment, ExperimentConfig, threads_per_client
from splitflower.linkemu import LinkEmulator, parse_link
from splitflower.proxy import ServerModelProxy
from splitflower.reproduce import PAPER_HYPERPARAMETERS
from splitflower.results import source_commit, write_results
from splitflower.scheduling import ImmediateScheduler
from splitflower.service import SplitService
from splitflower.wire import ConfigKey

RUNS = (("csl", 1, "CSL"), ("dsl", 0, "DSL blocking (window 0)"), ("dsl", 8, "DSL pipelined (window 8)"))


def _config(
    algorithm: str, window: int, link: str, batches: int, model: str, cut: str, threads: int = 0
) -> ExperimentConfig:
    return ExperimentConfig(
        algorithm=algorithm,
        model=model,
        cut=cut,
        clients=1,
        rounds=1,
        train_size=batches * int(PAPER_HYPERPARAMETERS["batch_size"]),
        test_size=100,
        options=(f"window={window}",),
        link=link,
        torch_threads=threads,
        **PAPER_HYPERPARAMETERS,
    ).validate()


def _serve(config: ExperimentConfig, pipe: Connection) -> None:
    """Server process: the service, one server model, the link emulator; until told to stop."""
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    experiment = run_on_compute_thread(Experiment, config)
    service = SplitService(port=0)
    service.start()
    server = run_on_compute_thread(experiment.make_server_model)
    run_on_compute_thread(server.configure_fit, None, experiment.train_config())
    token, _ = service.open_session("client-0", ImmediateScheduler(server))
    with contextlib.ExitStack() as stack:
        address = service.address
        if config.link:
            address = stack.enter_context(LinkEmulator(service.address, parse_link(config.link))).address
        pipe.send((address, token))
        pipe.recv()  # the client is done
    service.stop(grace=0)


def _run(config: ExperimentConfig) -> dict[str, Any]:
    """One epoch of one client against a server model in another process."""
    here, there = multiprocessing.get_context("spawn").Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(config, there), daemon=True)
    server.start()
    try:
        if not here.poll(300):
            raise RuntimeError("the server process did not start within 300 s")
        address, token = here.recv()
        experiment = Experiment(config)
        torch.set_num_threads(threads_per_client(config))
        client = experiment.make_client(0)
        proxy = ServerModelProxy(address, token, max_in_flight=client.max_in_flight, memory=client.memory)
        client.server_model_proxy = proxy
        train_config = experiment.train_config() | {ConfigKey.SERVER_ROUND: 1, ConfigKey.CLIENT_INDEX: 0}
        started = time.perf_counter()
        fit = client.fit({}, train_config)
        proxy.close()
        wall = time.perf_counter() - started
        here.send("done")
    finally:
        server.join(30)
        if server.is_alive():
            server.kill()
    return {"seconds": wall, **client_reply_metrics(client, proxy, fit.num_examples, fit.metrics)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--link", default="10mbit/50mbit/20ms")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--cut", default="s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per party (0: as in a Flower run)")
    parser.add_argument("--tag", default="", help="infix of the output file names, e.g. 1thread")
    args = parser.parse_args(argv)
    command = "python " + " ".join(["benchmarks/dsl_paper_timing.py", *(argv or sys.argv[1:])])
    commit = source_commit()
    links = ("", args.link) if args.link else ("",)  # --link "": without a link only
    infix = f"-{args.tag}" if args.tag else ""
    title = f" ({args.threads} torch thread(s) per party)" if args.threads else ""
    seconds: dict[tuple[str, str], list[float]] = {}
    rows: list[list[Any]] = []
    for repeat in range(1, args.repeats + 1):
        for link in links:
            for algorithm, window, label in RUNS:
                config = _config(algorithm, window, link, args.batches, args.model, args.cut, args.threads)
                started = time.perf_counter()
                entry = _run(config)
                seconds.setdefault((label, link or "none"), []).append(float(entry["seconds"]))
                rows.append(
                    [label, link or "none", repeat, round(float(entry["seconds"]), 2)]
                    + [
                        round(float(entry[k]), 2)
                        for k in ("client_compute_s", "server_compute_s", "communication_wait_s")
                    ]
                    + [
                        round(entry["up_payload_bytes"] / 1e6, 1),
                        round(entry["down_payload_bytes"] / 1e6, 1),
                    ]
                )
                print(
                    f"repeat {repeat} {label}, link {link or 'none'}: epoch {entry['seconds']:.1f}s "
                    f"({time.perf_counter() - started:.0f}s with start-up)",
                    flush=True,
                )
    ratio_rows: list[list[Any]] = []
    for link in [link or "none" for link in links]:
        base = seconds[("CSL", link)]
        for _, _, label in RUNS[1:]:
            mine = seconds[(label, link)]
            paired = [a / b for a, b in zip(mine, base, strict=True)]
            ratio_rows.append(
                [
                    label + " / CSL",
                    link,
                    round(statistics.median(mine) / statistics.median(base), 3),
                    f"{min(paired):.3f} to {max(paired):.3f}",
                    round(statistics.median(mine), 2),
                    round(statistics.median(base), 2),
                ]
            )
    setting = (
        f"{args.model} cut {args.cut}, Fashion-MNIST, one client, {args.batches} batches of "
        f"{PAPER_HYPERPARAMETERS['batch_size']} (one epoch over a seeded subset), {args.repeats} repeats, "
        "server model in its own process, on this 2-core machine shared with other agents' jobs (absolute times are "
        "indicative, ratios within a repeat more so)."
    )
    tables = {
        f"extra-timing{infix}-runs.json": {
            "title": f"Wall time per epoch, every run (seconds; payload in MB){title}",
            "columns": [
                "configuration",
                "link",
                "repeat",
                "epoch wall",
                "client compute",
                "server compute",
                "comm wait",
                "up MB",
                "down MB",
            ],
            "rows": rows,
            "notes": setting,
        },
        f"extra-timing{infix}-ratios.json": {
            "title": f"Wall time per epoch, DSL / CSL, with and without link emulation and pipelining{title}",
            "columns": [
                "ratio",
                "link",
                "ratio of medians",
                "range over repeats (paired)",
                "DSL median s",
                "CSL median s",
            ],
            "rows": ratio_rows,
            "notes": setting,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table |= {"command": command, "commit": commit}
        path = args.out / name
        write_results(table, path)
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
