"""Tables and plots of results files (schema ``splitflower.results/1``)."""

from __future__ import annotations

import json
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitflower.errors import ConfigError
from splitflower.experiment import config_as_run
from splitflower.results import RESULTS_SCHEMA, check_results_path, write_atomically

__all__ = ["load_results", "comparison_table", "check_plot_path", "plot_results"]


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file, checking that it is one and that the figures compare reads are numbers."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read results file {file}: {err}") from err
    try:
        results = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _invalid(file, f"it is not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})") from err
    except RecursionError as err:
        raise _invalid(file, "its JSON is nested too deeply to read") from err
    except ValueError as err:  # json.JSONDecodeError, or an integer of too many digits
        raise _invalid(file, f"it is not JSON ({err})") from err
    if not isinstance(results, dict) or results.get("schema") != RESULTS_SCHEMA:
        found = results.get("schema") if isinstance(results, dict) else type(results).__name__
        raise ConfigError(
            f"{file} is not a splitflower results file (expected schema {RESULTS_SCHEMA!r}, got {reprlib.repr(found)})"
        )
    config, rounds = results.get("config"), results.get("rounds")
    if not isinstance(config, dict) or not {"algorithm", "strategy"} <= set(config) or not isinstance(rounds, list):
        raise ConfigError(
            f"{file} claims schema {RESULTS_SCHEMA!r} but lacks its 'config' (with algorithm and strategy) "
            "or its 'rounds' list; was it edited by hand or cut short?"
        )
    _check_figure(file, "wall_s", results.get("wall_s"))
    if not rounds:
        raise _invalid(file, "it holds no rounds (a run writes its results after a round at least)")
    for index, entry in enumerate(rounds):
        where = f"rounds[{index}]"
        if not isinstance(entry, dict):
            raise _invalid(file, f"{where} must be an object, got {reprlib.repr(entry)}")
        _check_figure(file, f"{where}.round", entry.get("round", _MISSING), nullable=False)
        _check_figure(file, f"{where}.test_accuracy", entry.get("test_accuracy"))
        for section, keys in _ROUND_FIGURES.items():
            figures = entry.get(section, _MISSING)
            if not isinstance(figures, dict):
                raise _invalid(file, f"{where}.{section} must be an object, got {_shown(figures)}")
            for key in keys:
                _check_figure(file, f"{where}.{section}.{key}", figures.get(key, _MISSING))
    return results


# The figures of a round that compare reads, by section; null stands for a figure that was not finite.
_ROUND_FIGURES = {
    "bytes": ("up_payload_bytes", "down_payload_bytes"),
    "memory": ("client_peak_tally_bytes", "server_peak_tally_bytes"),
    "time": ("client_compute_s", "server_compute_s", "communication_wait_s"),
}
_MISSING: Any = object()


def _invalid(file: Path, problem: str) -> ConfigError:
    return ConfigError(f"{file} is not a valid results file: {problem}")


def _shown(value: Any) -> str:
    return "nothing (it is missing)" if value is _MISSING else reprlib.repr(value)


def _check_figure(file: Path, where: str, value: Any, *, nullable: bool = True) -> None:
    if (value is None and nullable) or _is_number(value):
        return
    expected = "a number or null" if nullable else "a number"
    raise _invalid(file, f"{where} must be {expected}, got {_shown(value)}")


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        float(value)
    except OverflowError:  # an integer too large for a float
        return False
    return True


# Config keys shown first when they tell runs apart; any other key that differs follows.
_FIRST_SHOWN = ("dataset", "model", "cut", "clients", "rounds", "partition", "options", "seed", "lr", "batch_size")


def _labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """``algorithm/strategy``, plus the settings in which runs of the same pair differ; runs
    that differ in none are numbered within their group, in the order given."""
    bases = [f"{r['config']['algorithm']}/{r['config']['strategy']}" for r in runs]
    labels = list(bases)
    for base in dict.fromkeys(bases):
        group = [i for i, b in enumerate(bases) if b == base]
        if len(group) < 2:
            continue
        configs = [config_as_run(runs[i]["config"]) for i in group]  # a field a file lacks: as it ran
        differing = {k for c in configs for k in c if len({_comparable(d.get(k), k) for d in configs}) > 1}
        keys = [k for k in _FIRST_SHOWN if k in differing] + sorted(differing - set(_FIRST_SHOWN))
        for i, config in zip(group, configs, strict=True):
            labels[i] = " ".join([base, *(f"{k}={_setting(config.get(k))}" for k in keys)])
        shown = [labels[i] for i in group]
        for number, i in enumerate(group, start=1):
            if shown.count(labels[i]) > 1:
                labels[i] = f"{labels[i]} #{number}"
    for i, run in enumerate(runs):  # a partial file (a run that failed midway) says so
        if isinstance(incomplete := run.get("incomplete"), dict):
            # last_round counts the rounds of a run it resumed too (absent from older files).
            done = incomplete.get("last_round", incomplete.get("rounds_recorded"))
            labels[i] += f" (incomplete: {done} of {incomplete.get('rounds_planned')} rounds)"
    return labels


def _comparable(value: Any, key: str) -> str:
    # Options are a set of KEY=VALUE settings: their order does not make runs differ.
    if key == "options" and isinstance(value, list | tuple):
        value = sorted(map(str, value))
    return json.dumps(value, sort_keys=True)


def _setting(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _number(value: Any) -> float:
    """A figure of a results file; null (written for a value that was not finite) is nan."""
    return float("nan") if value is None else float(value)


def _totals(results: dict[str, Any]) -> dict[str, float]:
    rounds = results["rounds"]

    def total(section: str, key: str) -> float:
        return sum(_number(r[section][key]) for r in rounds)

    def peak(key: str) -> float:
        return max((_number(r["memory"][key]) for r in rounds), default=0.0)

    return {
        "test_accuracy": _number(rounds[-1].get("test_accuracy")) if rounds else float("nan"),
        "up_mb": total("bytes", "up_payload_bytes") / 1e6,
        "down_mb": total("bytes", "down_payload_bytes") / 1e6,
        "client_peak_mb": peak("client_peak_tally_bytes") / 1e6,
        "server_peak_mb": peak("server_peak_tally_bytes") / 1e6,
        "client_compute_s": total("time", "client_compute_s"),
        "server_compute_s": total("time", "server_compute_s"),
        "communication_wait_s": total("time", "communication_wait_s"),
        "wall_s": _number(results.get("wall_s", 0.0)),
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
    labels = _labels(runs)
    ratio_labels = [f"{label} / {labels[-1]}" for label in labels[:-1]]
    width = max(24, *(len(label) + 1 for label in labels + ratio_labels))
    header = f"{'run':<{width}}" + "".join(f"{h:>11}" for h in _HEADINGS.values())
    lines = [header, "-" * len(header)]
    totals = [_totals(r) for r in runs]
    for label, total in zip(labels, totals, strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{total[c]:>11.4f}" for c in _HEADINGS))
    base = totals[-1]
    for label, total in zip(ratio_labels, totals[:-1], strict=True):
        ratios = "".join(_ratio(total[c], base[c]) for c in _HEADINGS)
        lines.append(f"{label:<{width}}" + ratios)
    return "\n".join(lines)


def _ratio(value: float, base: float) -> str:
    """``value / base`` in a cell; over a zero base (DSL's bytes down) "inf", or "-" for 0 / 0."""
    if base:
        return f"{value / base:>11.3f}"
    return f"{'-' if value == 0 else 'inf':>11}"


def check_plot_path(path: str | Path) -> Path:
    """Refuse a plot path matplotlib has no format for, or one that cannot be written."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ConfigError(
            f"cannot plot to {str(path)!r}: expected a file name ending in one of "
            f"{', '.join('.' + f for f in sorted(formats))}, got {('.' + suffix) if suffix else 'no extension'}"
        )
    return check_results_path(path, what="the plot")


def plot_results(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy per round, bytes per direction, peak memory per party and time split."""
    import matplotlib

    out = check_plot_path(path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    labels = _labels(runs)
    for run, label in zip(runs, labels, strict=True):
        rounds = [r["round"] for r in run["rounds"]]
        axes[0].plot(rounds, [_number(r.get("test_accuracy")) for r in run["rounds"]], marker="o", label=label)
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
        # The format is named: the temporary file's name does not end in it.
        return write_atomically(
            out, lambda tmp: figure.savefig(tmp, dpi=110, format=out.suffix.lower().lstrip(".")), what="the plot"
        )
    finally:
        plt.close(figure)
