"""Wall time per epoch, DSL / CSL, with and without an emulated client link and with and
without pipelining (DSL window 8 vs 0), each configuration run several times.

Every run is a real Flower simulation (``splitflower.experiment.run_experiment`` in a fresh
process, as ``splitflower reproduce`` runs a cell): ResNet-20 cut s on Fashion-MNIST, one
client, the paper's hyperparameters, one epoch over a seeded training subset. The time per
epoch is the round's wall time as the strategy measures it (client training and draining, not
Ray's start-up or the central evaluation). Configurations: CSL (window 1, blocking), DSL
window 0 (blocking: the client waits for the server after each batch, as a single-process
implementation does) and DSL window 8 (pipelined), each without a link and with the
emulated link (``--link``, default 10 Mbit/s up, 50 Mbit/s down, 20 ms RTT; see
``splitflower.linkemu``). Repeats run interleaved (all configurations once, then again) so
that drifting load on the machine spreads over all of them.

Writes ``extra-timing-runs.json`` (every run) and ``extra-timing-ratios.json`` (DSL/CSL of
the median times, with the range over repeats paired in order) into ``--out``; the grid
report includes them.

Usage: ``python benchmarks/dsl_paper_timing.py --out docs/results [--batches 16] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from splitflower.experiment import ExperimentConfig
from splitflower.reproduce import PAPER_HYPERPARAMETERS, run_cell_process, source_commit

RUNS = (("csl", 1, "CSL"), ("dsl", 0, "DSL blocking (window 0)"), ("dsl", 8, "DSL pipelined (window 8)"))


def _config(algorithm: str, window: int, link: str, batches: int, model: str, cut: str) -> ExperimentConfig:
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
        **PAPER_HYPERPARAMETERS,
    ).validate()


def _run(config: ExperimentConfig, folder: Path, name: str) -> dict[str, Any]:
    path = folder / f"{name}.json"
    for attempt in (1, 2):  # Ray's node sometimes misses its start-up window on a loaded machine
        error = run_cell_process(config, str(path), {"benchmark": "dsl_paper_timing"}, 900.0)
        if not error and path.is_file():
            return dict(json.loads(path.read_text())["rounds"][0])
        print(f"  {name}: attempt {attempt} failed: {error}", flush=True)
    raise RuntimeError(f"{name} failed twice")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--link", default="10mbit/50mbit/20ms")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--cut", default="s")
    args = parser.parse_args(argv)
    command = "python " + " ".join(["benchmarks/dsl_paper_timing.py", *(argv or sys.argv[1:])])
    commit = source_commit()
    seconds: dict[tuple[str, str], list[float]] = {}
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="dsl-timing-") as tmp:
        for repeat in range(1, args.repeats + 1):
            for link in ("", args.link):
                for algorithm, window, label in RUNS:
                    config = _config(algorithm, window, link, args.batches, args.model, args.cut)
                    started = time.perf_counter()
                    name = f"{algorithm}-w{window}-{'link' if link else 'nolink'}-{repeat}"
                    entry = _run(config, Path(tmp), name)
                    times = entry["time"]
                    seconds.setdefault((label, link or "none"), []).append(float(entry["seconds"]))
                    rows.append(
                        [label, link or "none", repeat, round(float(entry["seconds"]), 2)]
                        + [
                            round(float(times[k]), 2)
                            for k in ("client_compute_s", "server_compute_s", "communication_wait_s")
                        ]
                        + [
                            round(entry["bytes"]["up_payload_bytes"] / 1e6, 1),
                            round(entry["bytes"]["down_payload_bytes"] / 1e6, 1),
                        ]
                    )
                    print(
                        f"repeat {repeat} {label}, link {link or 'none'}: epoch {entry['seconds']:.1f}s "
                        f"({time.perf_counter() - started:.0f}s with start-up)",
                        flush=True,
                    )
    ratio_rows: list[list[Any]] = []
    for link in ("none", args.link):
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
        "Flower simulation on this shared 2-core machine (other jobs were running: absolute times are "
        "indicative, ratios within a repeat more so)."
    )
    tables = {
        "extra-timing-runs.json": {
            "title": "Wall time per epoch, every run (seconds; payload in MB)",
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
        "extra-timing-ratios.json": {
            "title": "Wall time per epoch, DSL / CSL, with and without link emulation and pipelining",
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
        tmp_path = path.with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(table, indent=1))
        tmp_path.replace(path)
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
