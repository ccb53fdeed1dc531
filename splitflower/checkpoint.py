"""A run's trained weights in one file: what ``splitflower run --save-model FILE.pt`` writes.

The file is a ``torch.save`` of plain data (read back with ``weights_only=True``, so loading
one runs no code): the schema, the experiment's config, the rounds trained, the final
state dicts of both parties: ``client`` (the client segment as ``segment.*``, plus the
parts the algorithm adds on the client, such as an auxiliary head or U-shaped SL's
``tail.*``) and ``server`` (the server segment), ``strategy``: what the strategy carries
from round to round besides them (``SplitStrategy.carried_state``: the optimizer state the
sequential strategy hands on, the state clients keep of their own between rounds), and
``history``: the results file's entries of the rounds that led to those weights (a resumed
run's results carry them on, so its curves start at round 1).

A run resumes from such a file (``splitflower run --resume FILE.pt``): it trains rounds
k + 1 onwards from the weights saved after round k, with the config they were saved with
(:func:`resumed_config`: only :data:`RESUMABLE_CHANGES` may differ), and, clients being
ordered and their batches drawn by partition and round, it gives the weights the
uninterrupted run would have, where that run is itself repeatable (see the README's
"Reproducibility"). What a model file does not hold stops a resume
(:func:`check_resumable`): a file saved before the strategy kept clients' own states, for
an algorithm whose clients keep some.

Example
-------
>>> saved = load_model("dsl.pt")  # doctest: +SKIP
>>> predictions = saved.network()(images).argmax(1)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from splitflower._client_states import CLIENT_STATE_PREFIX
from splitflower.errors import ConfigError
from splitflower.experiment import Experiment, ExperimentConfig, config_as_run, inert_fields
from splitflower.results import ROUND_ENTRY_KEYS, OncePerRound, config_as_stored, summarise_round, write_atomically
from splitflower.strategy import SplitResult

__all__ = [
    "MODEL_SCHEMA",
    "RESUMABLE_CHANGES",
    "SavedModel",
    "check_resumable",
    "load_model",
    "resumed_config",
    "save_model",
    "ModelWriter",
]

MODEL_SCHEMA = "splitflower.model/1"


@dataclass(frozen=True)
class SavedModel:
    """What :func:`load_model` read: ``config`` as :class:`ExperimentConfig` fields."""

    config: dict[str, Any]
    rounds: int
    """The round the weights are the result of."""
    client: dict[str, torch.Tensor]
    server: dict[str, torch.Tensor]
    path: Path | None = None
    """The file it was read from."""
    history: tuple[dict[str, Any], ...] = ()
    """The results file's entries of rounds 1 to ``rounds`` (fewer if the saving run was resumed
    from a file that lacked them)."""
    strategy_state: dict[str, torch.Tensor] | None = None
    """What the strategy carried on after round ``rounds`` (``SplitStrategy.carried_state``);
    None in a file from before it was kept."""

    @property
    def first_round(self) -> int:
        """The round a run resumed from these weights trains first."""
        return self.rounds + 1

    def resumed_from(self, config: ExperimentConfig) -> dict[str, Any]:
        """What the results of a run resumed from these weights with ``config`` say it started
        from (``resumed_from``): the file, its round, how many of the results' round entries
        are the saved run's, and the settings the run changed (``{field: [saved, now]}``:
        the saved entries were measured under the old ones)."""
        now = config_as_stored(config)
        changed = {
            name: [self.config.get(name), now[name]]
            for name in RESUMABLE_CHANGES
            if name != "rounds" and self.config.get(name) != now[name]
        }
        path = None if self.path is None else str(self.path)
        return {"path": path, "rounds": self.rounds, "carried_rounds": len(self.history), "changed": changed}

    def carry_on(self, rounds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """A resumed run's results entries: the saved run's (``history``), then its own ``rounds``."""
        # The run's own entries as given, not copies: a writer encodes each entry object once.
        return [*self.history, *rounds]

    def experiment_config(self) -> ExperimentConfig:
        """``config`` as an :class:`ExperimentConfig`, as saved (defaults not resolved, not
        validated: its algorithm may be a module of the user's own); a field of the wrong type
        (a file edited by hand, or damaged) raises ConfigError."""
        try:
            fields = config_as_run(self.config)
            fields["options"] = tuple(fields["options"] or ())
            config = ExperimentConfig(**fields)
        except TypeError as err:  # a field this version does not know, or options that are no list
            raise ConfigError(
                f"the config saved in {_name(self)} does not fit this splitflower's ExperimentConfig: {err}"
            ) from err
        try:
            return config.check_types()
        except ConfigError as err:
            raise ConfigError(f"the config saved in {_name(self)} is not valid: {err}") from err

    def experiment(self) -> Experiment:
        """The run's experiment (its data and split model) rebuilt from ``config``."""
        return Experiment(self.experiment_config().validate())

    def network(self) -> nn.Module:
        """The whole trained network, for inference (see :meth:`Experiment.assemble`)."""
        return self.experiment().assemble(self.client, self.server)


def save_model(
    path: str | Path, config: ExperimentConfig, result: SplitResult, *, resumed: SavedModel | None = None
) -> Path:
    """Write ``result``'s weights (both parties', after its round ``result.last_round``) with
    the run's ``config`` and its rounds' results entries (after those of the run it
    ``resumed`` from), atomically (see :func:`~splitflower.results.write_atomically`).
    They are CPU tensors, as an ArrayRecord gives them, so a machine without the run's GPU
    reads them. A run that saves after round after round uses one :class:`ModelWriter`."""
    return ModelWriter(path, resumed=resumed)(config, result)


class ModelWriter:
    """:func:`save_model` to ``path`` for one run that saves again and again (after every
    round): each round's results entry is summarised and encoded once, at its first save, not
    again at every later one (after round 1000 of 3 clients: 13 ms a save instead of 116,
    ``benchmarks/model_saves.py``). A round's record must not change once saved.

    Example
    -------
    >>> write = ModelWriter("run.pt")  # doctest: +SKIP
    >>> write(config, result)  # after each round; result.rounds grows  # doctest: +SKIP
    PosixPath('run.pt')
    """

    def __init__(self, path: str | Path, *, resumed: SavedModel | None = None) -> None:
        self.path = path
        self._carried = [json.dumps(entry) for entry in resumed.history] if resumed is not None else []
        self._texts: OncePerRound[Mapping[str, Any], str] = OncePerRound(
            lambda record: json.dumps(summarise_round(record))
        )

    def __call__(self, config: ExperimentConfig, result: SplitResult) -> Path:
        document = {
            "schema": MODEL_SCHEMA,
            "config": config_as_stored(config),
            "rounds": result.last_round,
            "client": result.arrays.to_torch_state_dict(),
            "server": result.server_arrays.to_torch_state_dict(),
            "strategy": dict(result.strategy_state),
            # As JSON text: a number the results file cannot hold (a diverged loss) stays a float here.
            "history": self._history_text(result.rounds),
        }
        return write_atomically(self.path, lambda tmp: torch.save(document, tmp), what="the model")

    def _history_text(self, records: Mapping[int, Mapping[str, Any]]) -> str:
        """``json.dumps`` of the saved run's entries followed by the records' summaries."""
        texts = list(self._carried)
        texts += self._texts.each(records)
        return "[" + ", ".join(texts) + "]"


def load_model(path: str | Path) -> SavedModel:
    """Read a file :func:`save_model` wrote, checking that it is one."""
    file = Path(path)
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except OSError as err:
        raise ConfigError(f"cannot read model file {file}: {err}") from err
    except Exception as err:  # any file may be given; torch's advice (weights_only=False) is unsafe
        raise ConfigError(
            f"{file} is not a splitflower model file (torch.load found no safely loadable weights in it: "
            f"{type(err).__name__}); give a file that --save-model (or splitflower.checkpoint.save_model) wrote"
        ) from err
    if not isinstance(data, dict) or data.get("schema") != MODEL_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{file} is not a splitflower model file (expected schema {MODEL_SCHEMA!r}, got {found!r})")
    for party in ("client", "server", "strategy"):
        if party == "strategy" and party not in data:  # a file from before the strategy's state was kept
            continue
        weights = data.get(party)
        if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            raise ConfigError(f"{file} claims schema {MODEL_SCHEMA!r} but its {party!r} is not a dict of tensors")
    if not isinstance(data.get("config"), dict) or type(data.get("rounds")) is not int or data["rounds"] < 0:
        raise ConfigError(
            f"{file} claims schema {MODEL_SCHEMA!r} but lacks its 'config' or its 'rounds' (a round number >= 0)"
        )
    history = _history(file, data.get("history", "[]"), data["rounds"])
    strategy_state = data.get("strategy")
    saved = SavedModel(data["config"], data["rounds"], data["client"], data["server"], file, history, strategy_state)
    saved.experiment_config()  # refuses a config of the wrong shape now, not midway through a resume
    return saved


def _history(file: Path, text: object, rounds: int) -> tuple[dict[str, Any], ...]:
    """The round entries a model file holds, checked to be rounds 1.. in order up to ``rounds``
    (a file from before they were kept has none)."""
    try:
        history = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        history = None
    if isinstance(history, list) and all(isinstance(entry, dict) for entry in history):
        numbers: list[Any] | str = [entry.get("round") for entry in history]
        lacking = sorted({key for entry in history for key in ROUND_ENTRY_KEYS if key not in entry})
        in_order = numbers == list(range(rounds - len(history) + 1, rounds + 1))
        if in_order and not lacking and all(type(number) is int for number in numbers):
            return tuple(history)
        if lacking:
            numbers = f"{numbers}; entries lack {lacking}"
    else:
        numbers = "-"
    raise ConfigError(
        f"{file} claims schema {MODEL_SCHEMA!r} but its 'history' is not the JSON list of the results "
        f"entries of its rounds up to {rounds} (round numbers found: {numbers})"
    )


RESUMABLE_CHANGES: Final = ("rounds", "device", "data_root", "test_size", "link")
"""Config fields a resumed run may set anew: how long it trains, where, what it is tested on,
and the emulated link; none changes what a round computes."""


def resumed_config(saved: SavedModel, changes: Mapping[str, Any]) -> ExperimentConfig:
    """The (validated) config that trains on from ``saved``: the one it was saved with, with
    ``changes`` (field name -> value; ``rounds`` is the last round to train, default the
    saved run's own). A change to any other field than :data:`RESUMABLE_CHANGES` is refused,
    naming it, unless it equals the saved value.

    Example
    -------
    >>> resumed_config(load_model("dsl.pt"), {"rounds": 10}).rounds  # doctest: +SKIP
    10
    """
    saved_config = saved.experiment_config()
    unknown = sorted(set(changes) - {f.name for f in fields(ExperimentConfig)})
    if unknown:
        known = ", ".join(f.name for f in fields(ExperimentConfig))
        raise ConfigError(f"cannot resume with {unknown}: not ExperimentConfig fields (they are {known})")
    if "options" in changes:
        changes = {**changes, "options": tuple(changes["options"])}
    refused = _refused_changes(saved_config, changes)
    if refused:
        raise ConfigError(f"cannot resume {_name(saved)} with another config: {refused}")
    config = replace(saved_config, **changes).validate()
    if config.rounds <= saved.rounds:
        raise ConfigError(_nothing_to_train(saved, config))
    return config


def check_resumable(experiment: Experiment, saved: SavedModel) -> None:
    """Raise :class:`ConfigError` unless ``experiment`` can train on from ``saved``: its
    config is the saved one (but for :data:`RESUMABLE_CHANGES`) and goes past the saved
    round, the weights fit both parties, and nothing a round needs lives outside them."""
    config = experiment.config
    problems = (
        [f"its config differs from the saved one: {refused}"]
        if (refused := _refused_changes(saved.experiment_config(), asdict(config)))
        else []
    )
    if config.rounds <= saved.rounds:
        problems.append(_nothing_to_train(saved, config))
    client = experiment.make_client(0, experiment.test)  # as initial_client_weights builds it
    problems += _misfits(client.weights(), saved.client, "the client's")
    problems += _misfits(experiment.make_server_model().get_fit_result().weights, saved.server, "the server's")
    try:
        experiment.make_strategy(saved.strategy_state)
    except ConfigError as err:
        problems.append(f"the strategy cannot carry on from the file's state: {err}")
    if config.hand_over_optimizer and saved.rounds and saved.strategy_state is None:
        problems.append(
            "the file holds no optimizer state for hand_over_optimizer to hand on (saved before it was kept)"
        )
    if client.local_state() and saved.rounds and not _holds_client_states(saved):
        problems.append(
            f"{config.algorithm}'s clients keep state of their own between rounds (Client.local_state, "
            "e.g. LocFedMix's sync_every), and the file holds none (saved before it was kept)"
        )
    if problems:
        raise ConfigError(f"cannot resume {_name(saved)}:\n  - " + "\n  - ".join(problems))


def _holds_client_states(saved: SavedModel) -> bool:
    return any(name.startswith(CLIENT_STATE_PREFIX) for name in saved.strategy_state or {})


def _name(saved: SavedModel) -> str:
    return str(saved.path) if saved.path is not None else "the saved run"


def _refused_changes(saved_config: ExperimentConfig, values: Mapping[str, Any]) -> str:
    """The fields of ``values`` outside :data:`RESUMABLE_CHANGES` (and the saved run's
    :func:`~splitflower.experiment.inert_fields`) that differ from ``saved_config``'s, said
    with what to do ("" if none)."""
    free = {*RESUMABLE_CHANGES, *inert_fields(saved_config)}
    refused = [
        f"{name} {value!r} (saved with {getattr(saved_config, name)!r})"
        for name, value in values.items()
        if name not in free and value != getattr(saved_config, name)
    ]
    if not refused:
        return ""
    return (
        f"{'; '.join(refused)}. A resumed run trains on as it was saved; only {', '.join(RESUMABLE_CHANGES)} "
        "may change (drop the others)"
    )


def _nothing_to_train(saved: SavedModel, config: ExperimentConfig) -> str:
    return (
        f"{_name(saved)} already holds the weights after round {saved.rounds}, and the run would end at round "
        f"{config.rounds}; give a last round above {saved.rounds} (--rounds) to train on"
    )


def _misfits(expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], whose: str) -> list[str]:
    """What keeps ``saved`` from loading where ``expected`` is: missing, unexpected or
    reshaped tensors (a few of each)."""
    problems = []
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        problems.append(
            f"{whose} weights lack {missing[:5] or 'nothing'} and have unexpected {unexpected[:5] or 'none'}"
        )
    reshaped = [
        f"{name} {tuple(saved[name].shape)} where the model has {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in saved and saved[name].shape != tensor.shape
    ]
    if reshaped:
        problems.append(f"{whose} weights do not fit: " + "; ".join(reshaped[:5]))
    return problems
