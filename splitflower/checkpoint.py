"""A run's trained weights in one file: what ``splitflower run --save-model FILE.pt`` writes.

The file is a ``torch.save`` of plain data (read back with ``weights_only=True``, so loading
one runs no code): the schema, the experiment's config, the rounds trained, and the final
state dicts of both parties: ``client`` (the client segment as ``segment.*``, plus the
parts the algorithm adds on the client, such as an auxiliary head or U-shaped SL's
``tail.*``) and ``server`` (the server segment).

Example
-------
>>> saved = load_model("dsl.pt")  # doctest: +SKIP
>>> predictions = saved.network()(images).argmax(1)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitflower.errors import ConfigError
from splitflower.experiment import Experiment, ExperimentConfig, write_atomically
from splitflower.strategy import SplitResult

__all__ = ["MODEL_SCHEMA", "SavedModel", "load_model", "save_model"]

MODEL_SCHEMA = "splitflower.model/1"


@dataclass(frozen=True)
class SavedModel:
    """What :func:`load_model` read: ``config`` as :class:`ExperimentConfig` fields."""

    config: dict[str, Any]
    rounds: int
    client: dict[str, torch.Tensor]
    server: dict[str, torch.Tensor]

    def experiment(self) -> Experiment:
        """The run's experiment (its data and split model) rebuilt from ``config``."""
        fields = {**self.config, "options": tuple(self.config.get("options") or ())}
        try:
            config = ExperimentConfig(**fields)
        except TypeError as err:  # a field this version does not know
            raise ConfigError(f"the saved config does not fit this splitflower's ExperimentConfig: {err}") from err
        return Experiment(config.validate())

    def network(self) -> nn.Module:
        """The whole trained network, for inference (see :meth:`Experiment.assemble`)."""
        return self.experiment().assemble(self.client, self.server)


def save_model(path: str | Path, config: ExperimentConfig, result: SplitResult) -> Path:
    """Write ``result``'s weights (both parties', after its ``len(result.rounds)`` rounds) with
    the run's ``config``, atomically (see :func:`~splitflower.experiment.write_atomically`).
    They are CPU tensors, as an ArrayRecord gives them, so a machine without the run's GPU reads them."""
    document = {
        "schema": MODEL_SCHEMA,
        "config": json.loads(json.dumps(asdict(config))),  # as the results file holds it
        "rounds": len(result.rounds),
        "client": result.arrays.to_torch_state_dict(),
        "server": result.server_arrays.to_torch_state_dict(),
    }
    return write_atomically(path, lambda tmp: torch.save(document, tmp), what="the model")


def load_model(path: str | Path) -> SavedModel:
    """Read a file :func:`save_model` wrote, checking that it is one."""
    file = Path(path)
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except OSError as err:
        raise ConfigError(f"cannot read model file {file}: {err}") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(f"{file} is not a splitflower model file ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict) or data.get("schema") != MODEL_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{file} is not a splitflower model file (expected schema {MODEL_SCHEMA!r}, got {found!r})")
    for party in ("client", "server"):
        weights = data.get(party)
        if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            raise ConfigError(f"{file} claims schema {MODEL_SCHEMA!r} but its {party!r} is not a dict of tensors")
    if not isinstance(data.get("config"), dict) or type(data.get("rounds")) is not int:
        raise ConfigError(f"{file} claims schema {MODEL_SCHEMA!r} but lacks its 'config' or 'rounds'")
    return SavedModel(config=data["config"], rounds=data["rounds"], client=data["client"], server=data["server"])
