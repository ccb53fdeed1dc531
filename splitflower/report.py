"""Tables and plots of results files (schema ``splitflower.results/1``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitflower.errors import ConfigError, ResultsFileError
from splitflower.experiment import RESULTS_SCHEMA, check_results_path

__all__ = ["load_results", "comparison_table", "plot_results"]


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file, checking that it is one."""
    file = Path(path)
    try:
        results = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read results file {file}: {err}") from err
    if not isinstance(results, dict) or results.get("schema") != RESULTS_SCHEMA:
        found = results.get("schema") if isinstance(results, dict) else type(results).__name__
        raise ConfigError(
            f"{file} is not a splitflower results file (expected schema {RESULTS_SCHEMA!r}, got {found!r})"
        )
    config, rounds = results.get("config"), results.get("rounds")
    if not isinstance(config, dict) or not {"algorithm", "strategy"} <= set(config) or not isinstance(rounds, list):
        raise ConfigError(
            f"{file} claims schema {RESULTS_SCHEMA!r} but lacks its 'config' (with algorithm and strategy) "
            "or its 'rounds' list; was it edited by hand or cut short?"
        )
    return results


def _label(results: dict[str, Any]) -> str:
    config = results["config"]
    return f"{config['algorithm']}/{config['strategy']}"


def _totals(results: dict[str, Any]) -> dict[str, float]:
    rounds = results["rounds"]
    return {
        "test_accuracy": float(rounds[-1].get("test_accuracy", float("nan"))) if rounds else float("nan"),
        "up_mb": sum(r["bytes"]["up_payload_bytes"] for r in rounds) / 1e6,
        "down_mb": sum(r["bytes"]["down_payload_bytes"] for r in rounds) / 1e6,
        "client_peak_mb": max((r["memory"]["client_peak_tally_bytes"] for r in rounds), default=0) / 1e6,
        "server_peak_mb": max((r["memory"]["server_peak_tally_bytes"] for r in rounds), default=0) / 1e6,
        "client_compute_s": sum(r["time"]["client_compute_s"] for r in rounds),
        "server_compute_s": sum(r["time"]["server_compute_s"] for r in rounds),
        "communication_wait_s": sum(r["time"]["communication_wait_s"] for r in rounds),
        "wall_s": float(results.get("wall_s", 0.0)),
    }


_HEADINGS = {
    "test_accuracy": "accuracy",
    "up_mb": "up MB",
    "down_mb": "down MB",
    "client_peak_mb": "client MB",
    "server_peak_mb": "server MB",
    "client_compute_s": "client s",
    "server_compute_s": "server s",
    "communication_wait_s": "comm s",
    "wall_s": "wall s",
}


def comparison_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run, plus each run's ratio to the last one when there are two or more.

    Memory is the peak tally per party; times are summed over clients.
    """
    header = f"{'run':<24}" + "".join(f"{h:>11}" for h in _HEADINGS.values())
    lines = [header, "-" * len(header)]
    totals = [_totals(r) for r in runs]
    for run, total in zip(runs, totals, strict=True):
        lines.append(f"{_label(run):<24}" + "".join(f"{total[c]:>11.4f}" for c in _HEADINGS))
    base = totals[-1]
    for run, total in zip(runs[:-1], totals[:-1], strict=True):
        ratios = "".join(f"{total[c] / base[c] if base[c] else float('nan'):>11.3f}" for c in _HEADINGS)
        lines.append(f"{_label(run) + ' / ' + _label(runs[-1]):<24}"[:24] + ratios)
    return "\n".join(lines)


def plot_results(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy per round, bytes per direction, peak memory per party and time split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    labels = [_label(r) for r in runs]
    for run, label in zip(runs, labels, strict=True):
        rounds = [r["round"] for r in run["rounds"]]
        axes[0].plot(rounds, [r.get("test_accuracy") for r in run["rounds"]], marker="o", label=label)
    axes[0].set(title="test accuracy", xlabel="round")
    axes[0].legend()
    totals = [_totals(r) for r in runs]
    positions = range(len(runs))
    axes[1].bar(positions, [t["up_mb"] for t in totals], label="client to server")
    axes[1].bar(
        positions, [t["down_mb"] for t in totals], bottom=[t["up_mb"] for t in totals], label="server to client"
    )
    axes[1].set(title="payload (MB)", xticks=list(positions), xticklabels=labels)
    axes[1].legend()
    width = 0.4
    axes[2].bar([p - width / 2 for p in positions], [t["client_peak_mb"] for t in totals], width, label="client")
    axes[2].bar([p + width / 2 for p in positions], [t["server_peak_mb"] for t in totals], width, label="server")
    axes[2].set(title="peak training memory, tally (MB)", xticks=list(positions), xticklabels=labels)
    axes[2].legend()
    bottom = [0.0] * len(runs)
    for key in ("client_compute_s", "server_compute_s", "communication_wait_s"):
        values = [t[key] for t in totals]
        axes[3].bar(positions, values, bottom=bottom, label=key.removesuffix("_s").replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[3].set(title="time, summed over clients (s)", xticks=list(positions), xticklabels=labels)
    axes[3].legend()
    figure.tight_layout()
    try:
        out = check_results_path(path)
        figure.savefig(out, dpi=110)
    except ResultsFileError:
        raise
    except OSError as err:
        raise ResultsFileError(f"cannot write the plot to {str(path)!r}: {err}") from err
    finally:
        plt.close(figure)
    return out
