"""Figures 4-7 of the decoupled-SL paper and a claims report, built from a grid's results files.

Reads every ``*.json`` results file (schema ``splitflower.results/1``) in a directory that
``splitflower reproduce dsl-paper`` wrote, and writes beside them, per dataset:

* ``fig4-accuracy-<dataset>.png``: test accuracy per epoch, one panel per (N, cut), CSL and DSL;
* ``fig5-communication-<dataset>.png``: payload over training per cut, forward (client to
  server) and backward (server to client), at the largest N (the paper's N = 10);
* ``fig6-memory-<dataset>.png``: peak training memory (tally) per party, per cut and N;
* ``fig7-time-<dataset>.png``: time per epoch split into client compute, server compute and
  communication wait, per cut and N, with the epoch's wall time marked (mean of the epochs
  after the first, which includes the client actor's start-up);

and ``report.md``: the paper's four claims beside what was measured, and per-cell tables.
Tables of extra measurements (``extra-*.json`` files in the directory, each
``{"title", "command", "commit", "columns", "rows", "notes"}``) and hand-written notes
(``notes.md``) are included when present.

How the paper's time breakdown (Fwd, Bwd, Comm) maps onto what the results record: the
client's compute (its forward and backward, the auxiliary head's included), the server's
compute (forward, loss, backward, step, as the server reports it in each reply) and the
client's time blocked on the channel minus the server's compute (communication and
queueing). Forward and backward are not timed separately.

Example
-------
>>> build_report("docs/results")  # doctest: +SKIP
[PosixPath('docs/results/fig4-accuracy-fashion-mnist.png'), ..., PosixPath('docs/results/report.md')]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitflower.errors import ConfigError
from splitflower.results import RESULTS_SCHEMA

__all__ = ["Cell", "build_report", "load_cells", "plot_figures", "render_report"]

_MB = 1e6
_ALGORITHMS = ("csl", "dsl")
_COLOURS = {"csl": "tab:blue", "dsl": "tab:orange"}


@dataclass
class Cell:
    """One grid cell's results, condensed to what the figures and the report use."""

    path: Path
    config: dict[str, Any]
    reproduce: dict[str, Any]
    accuracy: list[float]
    epoch_seconds: list[float]
    up_bytes: int
    down_bytes: int
    label_bytes: int
    client_peak: float
    server_peak: float
    client_s: float
    server_s: float
    comm_s: float
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.config["dataset"], self.config["clients"], self.config["cut"], self.config["algorithm"])

    @property
    def epochs(self) -> int:
        return len(self.accuracy)

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1] if self.accuracy else math.nan

    @property
    def best_accuracy(self) -> float:
        return max(self.accuracy, default=math.nan)

    def per_epoch(self, seconds: float) -> float:
        return seconds / self.epochs if self.epochs else math.nan

    @property
    def wall_per_epoch(self) -> float:
        """Mean wall time of the epochs after the first (the first includes starting the
        client's Ray actor, loading its data and building its model); the first alone if
        there is only one."""
        later = self.epoch_seconds[1:] or self.epoch_seconds
        return sum(later) / len(later) if later else math.nan


def _cell(path: Path, document: dict[str, Any]) -> Cell:
    rounds = document["rounds"]
    labels = sum(b for r in rounds for k, b in r.get("payload_bytes_by_tensor", {}).items() if k.endswith(":labels"))
    return Cell(
        path=path,
        config=document["config"],
        reproduce=document.get("reproduce", {}),
        accuracy=[float(r.get("test_accuracy", math.nan)) for r in rounds],
        epoch_seconds=[float(r["seconds"]) for r in rounds],
        up_bytes=sum(int(r["bytes"]["up_payload_bytes"]) for r in rounds),
        down_bytes=sum(int(r["bytes"]["down_payload_bytes"]) for r in rounds),
        label_bytes=labels,
        client_peak=max((float(r["memory"]["client_peak_tally_bytes"]) for r in rounds), default=math.nan),
        server_peak=max((float(r["memory"]["server_peak_tally_bytes"]) for r in rounds), default=math.nan),
        client_s=sum(float(r["time"]["client_compute_s"]) for r in rounds),
        server_s=sum(float(r["time"]["server_compute_s"]) for r in rounds),
        comm_s=sum(float(r["time"]["communication_wait_s"]) for r in rounds),
        versions=document.get("versions", {}),
    )


def load_cells(directory: str | Path) -> list[Cell]:
    """Every results file in ``directory`` (other JSON files, e.g. ``extra-*.json``, are ignored)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"results directory {folder} does not exist; run 'splitflower reproduce dsl-paper' first")
    cells = []
    for path in sorted(folder.glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err
        if isinstance(document, dict) and document.get("schema") == RESULTS_SCHEMA and document.get("rounds"):
            cells.append(_cell(path, document))
    return cells


_CellKey = tuple[str, int, str, str]  # dataset, clients, cut, algorithm


def _index(cells: Iterable[Cell]) -> dict[_CellKey, Cell]:
    return {c.key: c for c in cells}


def _axes_values(cells: Sequence[Cell], dataset: str) -> tuple[list[int], list[str]]:
    mine = [c for c in cells if c.config["dataset"] == dataset]
    order = {"s": 0, "m": 1, "d": 2}
    clients = sorted({c.config["clients"] for c in mine})
    cuts = sorted({c.config["cut"] for c in mine}, key=lambda k: (order.get(k, 9), k))
    return clients, cuts


def _datasets(cells: Sequence[Cell]) -> list[str]:
    return sorted({c.config["dataset"] for c in cells})


def plot_figures(cells: Sequence[Cell], directory: str | Path) -> list[Path]:
    """Write the four figures per dataset; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    index = _index(cells)
    written: list[Path] = []
    for dataset in _datasets(cells):
        clients, cuts = _axes_values(cells, dataset)
        written.append(
            _save(_accuracy_figure(plt, index, dataset, clients, cuts), out / f"fig4-accuracy-{dataset}.png", plt)
        )
        written.append(
            _save(
                _communication_figure(plt, index, dataset, clients[-1], cuts),
                out / f"fig5-communication-{dataset}.png",
                plt,
            )
        )
        for path, ylabel, title, draw in (
            (f"fig6-memory-{dataset}.png", "peak training memory, tally (MB)", "Peak memory per party", _draw_memory),
            (f"fig7-time-{dataset}.png", "seconds per epoch", "Training time breakdown per epoch", _draw_time),
        ):
            figure, axes = plt.subplots(1, len(clients), figsize=(5 * len(clients), 4), squeeze=False, sharey=True)
            for i, n in enumerate(clients):
                ax = axes[0][i]
                draw(ax, {a: _present(index, dataset, n, cuts, a) for a in _ALGORITHMS})
                ax.set_xticks(range(len(cuts)), [f"cut {c}" for c in cuts])
                ax.set_title(f"N = {n}")
                if i == 0:
                    ax.set_ylabel(ylabel)
            figure.suptitle(f"{title} ({dataset})")
            written.append(_save(figure, out / path, plt, legend_from=axes[0][0]))
    return written


def _accuracy_figure(
    plt: Any, index: Mapping[_CellKey, Cell], dataset: str, clients: list[int], cuts: list[str]
) -> Any:
    """Figure 4: test accuracy per epoch, a panel per N and cut."""
    figure, axes = plt.subplots(
        len(clients), len(cuts), figsize=(4 * len(cuts), 3 * len(clients)), squeeze=False, sharey=True
    )
    for i, n in enumerate(clients):
        for j, cut in enumerate(cuts):
            ax = axes[i][j]
            for algorithm in _ALGORITHMS:
                cell = index.get((dataset, n, cut, algorithm))
                if cell is not None:
                    epochs = range(1, cell.epochs + 1)
                    ax.plot(epochs, cell.accuracy, marker="o", color=_COLOURS[algorithm], label=algorithm.upper())
            ax.set_title(f"N = {n}, cut {cut}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("test accuracy")
            ax.legend(loc="lower right")
    figure.suptitle(f"Convergence of DSL and CSL ({dataset})")
    return figure


def _communication_figure(plt: Any, index: Mapping[_CellKey, Cell], dataset: str, n: int, cuts: list[str]) -> Any:
    """Figure 5: each algorithm's payload up (Fwd) and down (Bwd) at each cut, for N = ``n``."""
    figure, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    for k, algorithm in enumerate(_ALGORITHMS):
        found = _present(index, dataset, n, cuts, algorithm)
        xs = [j + (k - 0.5) * width for j, _ in found]
        up = [c.up_bytes / _MB for _, c in found]
        down = [c.down_bytes / _MB for _, c in found]
        colour, name = _COLOURS[algorithm], algorithm.upper()
        ax.bar(xs, up, width, color=colour, label=f"{name} Fwd")
        ax.bar(xs, down, width, bottom=up, color=colour, alpha=0.45, hatch="//", label=f"{name} Bwd")
    ax.set_xticks(range(len(cuts)), [f"cut {c}" for c in cuts])
    ax.set_ylabel("payload over training (MB)")
    ax.set_title(f"Communication breakdown, N = {n} ({dataset})")
    ax.legend()
    return figure


def _draw_memory(ax: Any, found: Mapping[str, list[tuple[int, Cell]]]) -> None:
    """Figure 6's bars: each algorithm's client and server peak at each cut."""
    bars = [(a, party) for party in ("client", "server") for a in _ALGORITHMS]
    width = 0.8 / len(bars)
    for k, (algorithm, party) in enumerate(bars):
        ax.bar(
            [j + (k - (len(bars) - 1) / 2) * width for j, _ in found[algorithm]],
            [(c.client_peak if party == "client" else c.server_peak) / _MB for _, c in found[algorithm]],
            width,
            color=_COLOURS[algorithm],
            alpha=1.0 if party == "client" else 0.45,
            hatch="" if party == "client" else "..",
            label=f"{algorithm.upper()} {party}",
        )


_TIME_PARTS = (("client_s", "client compute", 1.0), ("server_s", "server compute", 0.6), ("comm_s", "comm wait", 0.3))


def _draw_time(ax: Any, found: Mapping[str, list[tuple[int, Cell]]]) -> None:
    """Figure 7's stacked bars (client, server, communication per epoch) and wall-time marks."""
    width = 0.38
    for k, algorithm in enumerate(_ALGORITHMS):
        xs = [j + (k - 0.5) * width for j, _ in found[algorithm]]
        bottom = [0.0] * len(xs)
        for attribute, name, alpha in _TIME_PARTS:
            values = [c.per_epoch(getattr(c, attribute)) for _, c in found[algorithm]]
            label = f"{algorithm.upper()} {name}"
            ax.bar(xs, values, width, bottom=bottom, color=_COLOURS[algorithm], alpha=alpha, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        walls = [c.wall_per_epoch for _, c in found[algorithm]]
        ax.scatter(xs, walls, marker="_", s=400, color="black", zorder=3, label="wall" if k == 0 else None)


def _present(
    index: Mapping[_CellKey, Cell], dataset: str, n: int, cuts: Sequence[str], algorithm: str
) -> list[tuple[int, Cell]]:
    """(position, cell) for each cut that has a cell of ``algorithm`` at ``n`` clients."""
    return [
        (j, index[(dataset, n, cut, algorithm)]) for j, cut in enumerate(cuts) if (dataset, n, cut, algorithm) in index
    ]


def _save(figure: Any, path: Path, plt: Any, legend_from: Any = None) -> Path:
    if legend_from is None:
        figure.tight_layout()
    else:  # one legend for all panels, below them
        handles, labels = legend_from.get_legend_handles_labels()
        figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
        figure.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pairs(cells: Sequence[Cell]) -> list[tuple[Cell, Cell]]:
    """(CSL, DSL) cells of the same dataset, N and cut, in grid order."""
    index = _index(cells)
    pairs = []
    for dataset in _datasets(cells):
        clients, cuts = _axes_values(cells, dataset)
        for n in clients:
            for cut in cuts:
                csl, dsl = index.get((dataset, n, cut, "csl")), index.get((dataset, n, cut, "dsl"))
                if csl is not None and dsl is not None:
                    pairs.append((csl, dsl))
    return pairs


def _span(values: Sequence[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    low, high = min(finite), max(finite)
    return f"{low:.3f}" if math.isclose(low, high, rel_tol=5e-4) else f"{low:.3f} to {high:.3f}"


def render_report(cells: Sequence[Cell], directory: str | Path, figures: Sequence[Path] = ()) -> str:
    """The report's markdown (see the module docstring)."""
    folder = Path(directory)
    pairs = _pairs(cells)
    lines = ["# Decoupled split learning: the paper's claims beside our measurements", ""]
    lines += _provenance(cells)
    notes = folder / "notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    lines += ["## The paper's claims and what we measured (grid)", ""]
    if not pairs:
        lines += ["No (CSL, DSL) pair of cells has finished yet.", ""]
    else:
        diffs = [d.final_accuracy - c.final_accuracy for c, d in pairs]
        best = [d.best_accuracy - c.best_accuracy for c, d in pairs]
        fwd = [_ratio(d.up_bytes, c.up_bytes) for c, d in pairs]
        bwd = [_ratio(d.down_bytes, c.down_bytes) for c, d in pairs]
        total = [_ratio(d.up_bytes + d.down_bytes, c.up_bytes + c.down_bytes) for c, d in pairs]
        client_mem = [_ratio(d.client_peak, c.client_peak) for c, d in pairs]
        server_mem = [_ratio(d.server_peak, c.server_peak) for c, d in pairs]
        wall = [_ratio(d.wall_per_epoch, c.wall_per_epoch) for c, d in pairs]
        lines += [
            "| claim (paper) | measured here, over the finished cell pairs | ",
            "|---|---|",
            f"| accuracy on par (Obs. 1) | DSL - CSL final test accuracy: {_span(diffs)} "
            f"(mean {sum(diffs) / len(diffs):+.4f}); best-epoch: {_span(best)} |",
            f"| about half the communication (Obs. 2) | DSL/CSL payload: forward {_span(fwd)}, backward {_span(bwd)}, "
            f"total {_span(total)} |",
            f"| up to 58% less peak memory (Obs. 3) | DSL/CSL peak tally: client {_span(client_mem)}, "
            f"server {_span(server_mem)} (DSL's default window of 8 batches in flight) |",
            f"| moderately more time per epoch (Obs. 4) | DSL/CSL wall time per epoch: {_span(wall)} |",
            "",
            f"{len(pairs)} (CSL, DSL) pairs; the tables below give every cell.",
            "",
        ]
    lines += _extras(folder)
    if pairs:
        lines += _cell_tables(pairs)
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures]
        lines.append("")
    return "\n".join(lines) + "\n"


def _provenance(cells: Sequence[Cell]) -> list[str]:
    if not cells:
        return ["No results files found.", ""]
    commits = sorted({c.reproduce.get("commit", "unknown") for c in cells})
    scales = sorted({c.reproduce.get("scale", "?") for c in cells})
    config = cells[0].config
    versions = cells[0].versions
    common = {
        k: config[k]
        for k in (
            "model",
            "rounds",
            "batch_size",
            "lr",
            "momentum",
            "weight_decay",
            "strategy",
            "local_epochs",
            "train_size",
            "test_size",
            "device",
            "link",
            "partition",
            "seed",
        )
        if k in config
    }
    return [
        f"- cells: {len(cells)} results files; scale: {', '.join(scales)}; code at commit(s): {', '.join(commits)}",
        "- common settings: " + ", ".join(f"{k}={v!r}" for k, v in common.items()),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]


def _extras(folder: Path) -> list[str]:
    lines: list[str] = []
    for path in sorted(folder.glob("extra-*.json")):
        try:
            table = json.loads(path.read_text())
            title, columns, rows = table["title"], table["columns"], table["rows"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            lines += [f"({path.name} could not be read: {err})", ""]
            continue
        lines += [f"## {title}", ""]
        if table.get("command"):
            lines += [f"Made by `{table['command']}` at commit {table.get('commit', 'unknown')} ({path.name}).", ""]
        lines += ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_fmt(v) if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
        lines.append("")
        if table.get("notes"):
            lines += [str(table["notes"]), ""]
    return lines


def _cell_tables(pairs: Sequence[tuple[Cell, Cell]]) -> list[str]:
    head = "| dataset | N | cut |"
    lines = [
        "## Accuracy per cell",
        "",
        head + " CSL final | DSL final | DSL - CSL final | CSL best | DSL best | DSL - CSL best | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, d in pairs:
        lines.append(
            f"| {c.config['dataset']} | {c.config['clients']} | {c.config['cut']} | {c.final_accuracy:.4f} | "
            f"{d.final_accuracy:.4f} | {d.final_accuracy - c.final_accuracy:+.4f} | {c.best_accuracy:.4f} | "
            f"{d.best_accuracy:.4f} | {d.best_accuracy - c.best_accuracy:+.4f} | {c.epochs} |"
        )
    lines += [
        "",
        "## Communication per cell (payload over training, MB; forward = client to server incl. labels)",
        "",
        head
        + " CSL fwd | CSL bwd | DSL fwd | DSL bwd | DSL/CSL fwd | DSL/CSL bwd | DSL/CSL total | labels share of fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, d in pairs:
        lines.append(
            f"| {c.config['dataset']} | {c.config['clients']} | {c.config['cut']} | {c.up_bytes / _MB:.1f} | "
            f"{c.down_bytes / _MB:.1f} | {d.up_bytes / _MB:.1f} | {d.down_bytes / _MB:.1f} | "
            f"{_fmt(_ratio(d.up_bytes, c.up_bytes))} | {_fmt(_ratio(d.down_bytes, c.down_bytes))} | "
            f"{_fmt(_ratio(d.up_bytes + d.down_bytes, c.up_bytes + c.down_bytes))} | "
            f"{_fmt(_ratio(c.label_bytes, c.up_bytes), 4)} |"
        )
    lines += [
        "",
        "## Peak memory per party per cell (tally, MB; max over clients and epochs)",
        "",
        head + " CSL client | DSL client | DSL/CSL client | CSL server | DSL server | DSL/CSL server |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, d in pairs:
        lines.append(
            f"| {c.config['dataset']} | {c.config['clients']} | {c.config['cut']} | {c.client_peak / _MB:.2f} | "
            f"{d.client_peak / _MB:.2f} | {_fmt(_ratio(d.client_peak, c.client_peak))} | {c.server_peak / _MB:.2f} | "
            f"{d.server_peak / _MB:.2f} | {_fmt(_ratio(d.server_peak, c.server_peak))} |"
        )
    lines += [
        "",
        "## Time per epoch per cell (seconds; wall: mean of epochs 2 and later; client compute / server compute / "
        "comm wait: per epoch, summed over clients)",
        "",
        head + " CSL wall | DSL wall | DSL/CSL wall | CSL client/server/comm | DSL client/server/comm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, d in pairs:
        lines.append(
            f"| {c.config['dataset']} | {c.config['clients']} | {c.config['cut']} | {c.wall_per_epoch:.1f} | "
            f"{d.wall_per_epoch:.1f} | {_fmt(_ratio(d.wall_per_epoch, c.wall_per_epoch))} | "
            f"{c.per_epoch(c.client_s):.1f} / {c.per_epoch(c.server_s):.1f} / {c.per_epoch(c.comm_s):.1f} | "
            f"{d.per_epoch(d.client_s):.1f} / {d.per_epoch(d.server_s):.1f} / {d.per_epoch(d.comm_s):.1f} |"
        )
    lines.append("")
    return lines


def build_report(directory: str | Path) -> list[Path]:
    """Write the figures and ``report.md`` into ``directory``; return the paths written."""
    folder = Path(directory)
    cells = load_cells(folder)
    figures = plot_figures(cells, folder) if cells else []
    report = folder / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text(render_report(cells, folder, figures))
    tmp.replace(report)
    return [*figures, report]
