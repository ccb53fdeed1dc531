"""Results files: what a run records per round, the file it writes, and how it is written.

A results file (schema ``splitflower.results/1``, documented in the README) holds the config,
the versions the run used and one entry per round (:func:`summarise_round`). Every file
splitflower writes (results, model, plot) goes through :func:`write_atomically`, so a reader
never sees half a file.

Example
-------
>>> import json, tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> path = write_results({"schema": RESULTS_SCHEMA, "loss": float("nan")}, folder / "runs" / "a.json")
>>> json.loads(path.read_text())
{'schema': 'splitflower.results/1', 'loss': None}
>>> partial_results_path(path).name
'a.partial.json'
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import secrets
import subprocess
import tempfile
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from splitflower.errors import ResultsFileError
from splitflower.wire import MetricKey, RecordKey

if typing.TYPE_CHECKING:  # splitflower.experiment builds on this module
    from splitflower.experiment import ExperimentConfig

_Given = TypeVar("_Given")
_Made = TypeVar("_Made")

__all__ = [
    "OncePerRound",
    "RESULTS_SCHEMA",
    "ROUND_ENTRY_KEYS",
    "ProgressWriter",
    "check_results_path",
    "config_as_stored",
    "partial_results_path",
    "results_document",
    "source_commit",
    "summarise_round",
    "summarise_rounds",
    "versions",
    "write_atomically",
    "write_results",
]

RESULTS_SCHEMA = "splitflower.results/1"


def _sum(clients: list[dict[str, Any]], key: str) -> float:
    return float(sum(c.get("metrics", {}).get(key, 0.0) for c in clients))


def _max(values: list[float]) -> float:
    return max(values, default=0.0)


_MEMORY_SHOWN = (MetricKey.PEAK_TALLY, MetricKey.PEAK_SAVED_ACTIVATIONS, MetricKey.PEAK_RSS)


ROUND_ENTRY_KEYS: Final = (
    "round",
    "seconds",
    "num_examples",
    "failed_clients",
    "bytes",
    "payload_bytes_by_tensor",
    "memory",
    "time",
    "clients",
    "server_models",
)
"""The keys of every results-file round entry (:func:`summarise_round`; central evaluation adds
``test_accuracy`` and ``test_loss``)."""


def summarise_rounds(records: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`summarise_round` of each of a run's round records (a SplitResult's ``rounds``), in order."""
    return [summarise_round(record) for _, record in sorted(records.items())]


def summarise_round(record: Mapping[str, Any]) -> dict[str, Any]:
    """Condense a strategy round record into the results-file round entry."""
    clients = [c for c in record["clients"] if "metrics" in c]
    byte_keys = (
        "up_payload_bytes",
        "up_wire_bytes",
        "down_payload_bytes",
        "down_wire_bytes",
        "up_messages",
        "down_messages",
    )
    per_tensor: dict[str, int] = {}
    for c in clients:
        for entry in c.get("wire", {}).get("manifest", []):
            key = f"{entry['direction']}:{entry['method']}:{entry['name']}"
            per_tensor[key] = per_tensor.get(key, 0) + int(entry["payload_bytes"])
    servers = record["server_models"]
    return {
        "round": record["round"],
        "seconds": record["seconds"],
        **record.get("evaluation", {}),
        "num_examples": int(_sum(clients, RecordKey.NUM_EXAMPLES)),
        "failed_clients": [c["node_id"] for c in record["clients"] if "error" in c or "left_out" in c],
        "bytes": {k: int(_sum(clients, k)) for k in byte_keys},
        "payload_bytes_by_tensor": per_tensor,
        "memory": {
            **{f"client_{f}": _max([c["metrics"].get(f"client_{f}", 0.0) for c in clients]) for f in _MEMORY_SHOWN},
            **{f"server_{f}": _max([s["memory"][f"server_{f}"] for s in servers]) for f in _MEMORY_SHOWN},
        },
        "time": {k: _sum(clients, k) for k in MetricKey.TIME_SPLIT},
        "clients": record["clients"],
        "server_models": servers,
    }


def source_commit(exclude: Sequence[str] = (), *, checkout: str | Path | None = None) -> str:
    """The git commit this code runs from, ``+dirty`` when tracked files anywhere in the
    checkout differ from it (paths under ``exclude``, relative to the checkout's top, e.g. a
    results folder, aside); ``$SPLITFLOWER_COMMIT`` when set (a copy of the tree without
    git); ``unknown`` outside a git checkout. ``checkout``: a folder in the checkout to ask
    about (default: this package's)."""
    if os.environ.get("SPLITFLOWER_COMMIT"):
        return os.environ["SPLITFLOWER_COMMIT"]
    here = Path(__file__).resolve().parent if checkout is None else Path(checkout)
    # Pathspecs from the top: git reads a bare "." as the folder it runs in, here the package's.
    pathspec = ["--", ":(top)", *(f":(top,exclude){path}" for path in exclude)]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", *pathspec).strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on, and the source commit."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "splitflower_commit": source_commit()}
    for package in ("splitflower", "torch", "flwr", "grpcio", "flwr-datasets", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def partial_results_path(path: str | Path) -> Path:
    """Where a run that stopped early keeps the rounds it finished: ``NAME.partial.json``
    beside the ``NAME.json`` it was asked to write, which is never given half a run."""
    out = Path(path)
    return out.with_name(f"{out.stem}.partial{out.suffix or '.json'}")


def config_as_stored(config: ExperimentConfig) -> dict[str, Any]:
    """``config`` as a results file and a model file hold it: JSON values (tuples as lists)."""
    return json.loads(json.dumps(asdict(config)))  # type: ignore[no-any-return]


def results_document(
    config: ExperimentConfig,
    rounds: list[dict[str, Any]],
    wall_s: float,
    *,
    run_versions: Mapping[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The results file's content (schema ``splitflower.results/1``) from summarised rounds;
    ``run_versions`` (default: :func:`versions` now) where the run took them already."""
    return {
        "schema": RESULTS_SCHEMA,
        "config": asdict(config),
        "versions": dict(run_versions) if run_versions is not None else versions(),
        "wall_s": wall_s,
        **extra,
        "rounds": rounds,
        "final": {k: v for k, v in rounds[-1].items() if k in ("test_accuracy", "test_loss")} if rounds else {},
    }


def check_results_path(path: str | Path, *, what: str = "results") -> Path:
    """Refuse, before a run, a path ``what`` (the results, a plot) cannot be written to.

    Nothing is created: the folders it lacks are made when it is written (see
    :func:`write_atomically`), so a command that fails in between leaves none behind.
    """
    out = _results_target(path, what)
    missing = _missing_folders(out, what)
    folder = missing[-1].parent if missing else out.parent
    try:
        if missing:  # a folder made and removed again proves the rest can be made
            with tempfile.TemporaryDirectory(dir=folder, prefix=f".{out.name}."):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}."):
                pass
    except OSError as err:
        made = "a folder" if missing else "a file"
        raise ResultsFileError(
            f"cannot write {what} to {str(out)!r}: cannot create {made} in '{folder}' ({err.strerror or err})"
        ) from err
    return out


def _results_target(path: str | Path, what: str = "results") -> Path:
    out = Path(path).expanduser()
    if out.is_dir():
        example = {"the model": "model.pt", "the plot": "plot.png"}.get(what, "results.json")
        raise ResultsFileError(f"{what} path {str(out)!r} is a directory; give a file name such as {example}")
    return out


def _missing_folders(out: Path, what: str) -> list[Path]:
    """The folders above ``out`` that do not exist yet, innermost first; refuses a path whose
    nearest existing ancestor is not a folder."""
    missing: list[Path] = []
    for folder in out.parents:
        try:
            exists = folder.exists() or folder.is_symlink()  # a broken link is no folder to make
            is_dir = folder.is_dir()
        except OSError as err:
            raise _cannot_write(what, out, err) from err
        if exists and not is_dir:
            raise ResultsFileError(f"cannot write {what} to {str(out)!r}: '{folder}' is not a directory")
        if exists:
            break
        missing.append(folder)
    return missing


def _cannot_write(what: str, out: Path, err: OSError) -> ResultsFileError:
    # The reason alone: the error's own file name may be a temporary file's.
    return ResultsFileError(f"cannot write {what} to {str(out)!r}: {err.strerror or err}")


def write_atomically(path: str | Path, write: Callable[[Path], None], *, what: str = "results") -> Path:
    """``write`` the file at ``path`` under a temporary name beside it, then rename it: a reader
    never sees a half-written file, and a failed write leaves what was there and removes the
    folders made for it."""
    out = _results_target(path, what)
    missing = _missing_folders(out, what)
    # A name of its own (not tempfile's, whose files are private to the user), so the file gets
    # the permissions the umask gives any new file.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile by someone else: theirs
                folder.mkdir()
                made.append(folder)
        write(tmp)
        tmp.replace(out)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, OSError):
            raise _cannot_write(what, out, err) from err
        raise
    return out


def write_results(document: Mapping[str, Any], path: str | Path) -> Path:
    """Write a results document atomically (see :func:`write_atomically`). Numbers that are not
    finite (a diverged loss) are written as null, so the file is strict JSON."""
    return _write_text(json.dumps(_finite_or_null(document), indent=1, allow_nan=False), path)


def _write_text(text: str, path: str | Path) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("x") as handle:  # created exclusively
            handle.write(text)

    return write_atomically(path, write)


_ROUNDS_SLOT: Final = "\x00splitflower rounds\x00"  # no round entry or config holds this string


class OncePerRound(Generic[_Given, _Made]):
    """``make(given)`` for each round, made again only when another object is given for that
    round: what a run writes after every round (its entries, their JSON) then costs what the
    new round adds, not what the run holds.

    Example
    -------
    >>> made = []
    >>> encode = OncePerRound(lambda entry: made.append(entry) or json.dumps(entry))
    >>> entry = {"round": 1}
    >>> encode(1, entry), encode(1, entry), len(made)
    ('{"round": 1}', '{"round": 1}', 1)
    >>> encode(1, {"round": 1, "test_loss": 0.5}), len(made)  # another object: made again
    ('{"round": 1, "test_loss": 0.5}', 2)
    >>> encode.each({2: {"round": 2}, 1: entry}), len(made)  # in round order; round 1's object changed back
    (['{"round": 1}', '{"round": 2}'], 4)
    """

    def __init__(self, make: Callable[[_Given], _Made]) -> None:
        self._make = make
        self._known: dict[int, tuple[_Given, _Made]] = {}

    def __call__(self, number: int, given: _Given) -> _Made:
        known = self._known.get(number)
        if known is None or known[0] is not given:
            known = self._known[number] = (given, self._make(given))
        return known[1]

    def each(self, given: Mapping[int, _Given]) -> list[_Made]:
        """What each round of ``given`` (by round number) makes, in round order."""
        return [self(number, item) for number, item in sorted(given.items())]


class ProgressWriter:
    """Writes a run's results document so far to ``path`` after every round, as
    :func:`write_results` would, but encodes each round's entry once (see
    :class:`OncePerRound`): a run of many short rounds would otherwise spend ever longer
    re-encoding the ones before.

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.partial.json"
    >>> keep = ProgressWriter(path)
    >>> _ = keep({"schema": RESULTS_SCHEMA, "rounds": [{"round": 1, "test_loss": 0.5}]})
    >>> _ = keep({"schema": RESULTS_SCHEMA, "rounds": [{"round": 1, "test_loss": 0.5}, {"round": 2}]})
    >>> json.loads(path.read_text())["rounds"]
    [{'round': 1, 'test_loss': 0.5}, {'round': 2}]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self._texts: OncePerRound[Mapping[str, Any], str] = OncePerRound(
            lambda entry: json.dumps(_finite_or_null(entry), allow_nan=False)
        )

    def __call__(self, document: Mapping[str, Any]) -> Path:
        texts = [self._texts(entry["round"], entry) for entry in document["rounds"]]
        text = json.dumps(_finite_or_null({**document, "rounds": _ROUNDS_SLOT}), indent=1, allow_nan=False)
        return _write_text(text.replace(json.dumps(_ROUNDS_SLOT), "[\n" + ",\n".join(texts) + "\n]", 1), self.path)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value
