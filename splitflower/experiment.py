"""An experiment: dataset x model x cut x algorithm x strategy, run as a Flower simulation.

The CLI (``splitflower run``) and the example app are thin layers over this module. What a
run returns and writes is a results document (:mod:`splitflower.results`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import sys
import threading
import time
import traceback
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, NoReturn, TypeVar

import torch
from flwr.app import ArrayRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from torch import nn

from splitflower._checks import checked_count
from splitflower._client_errors import raised_by_client
from splitflower._host_memory import clients_at_once_in_memory
from splitflower._logs import take_flower_level_from_the_command
from splitflower._termination import is_interruption, sigterm_as_ctrl_c, sigterm_handler_kept, stopping
from splitflower.algorithms import Algorithm, find_algorithm
from splitflower.app import build_client_app, build_server_app
from splitflower.client import Client
from splitflower.compute import run_on_compute_thread
from splitflower.data import (
    DATASET_NAMES,
    ArrayDataset,
    client_partition,
    load_dataset,
    parse_partition,
    partition_sizes,
    synthetic,
)
from splitflower.errors import (
    CRASHED_EXIT_CODE,
    INTERRUPTED_EXIT_CODE,
    STALLED_EXIT_CODE,
    ConfigError,
    DatasetError,
    ExperimentFailedError,
    IncompatibleStrategyError,
    RunInterruptedError,
    SimulationStartError,
    SplitflowerError,
)
from splitflower.linkemu import parse_link
from splitflower.models import MODEL_NAMES, build_model
from splitflower.results import (
    OncePerRound,
    config_as_stored,
    results_document,
    summarise_round,
    summarise_rounds,
    versions,
)
from splitflower.scheduling import DEFAULT_FLUSH_TIMEOUT_S, DEFAULT_REQUEST_ORDER, REQUEST_ORDERS
from splitflower.server_model import ServerModel, remote_methods, resolve_call, sgd
from splitflower.split import split_for_cut, split_last_layer
from splitflower.strategies import find_strategy
from splitflower.strategy import NO_REPLY, SplitResult, SplitStrategy
from splitflower.supervised import SupervisedServerModel
from splitflower.wire import ConfigKey

if typing.TYPE_CHECKING:  # splitflower.checkpoint builds on this module
    from splitflower.checkpoint import SavedModel

_In = TypeVar("_In")
_Out = TypeVar("_Out")

__all__ = [
    "inert_fields",
    "STORED_BEFORE_KEPT",
    "config_as_run",
    "differing_fields",
    "CRASHED_EXIT_CODE",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "NOT_ENDED",
    "STALLED_EXIT_CODE",
    "STALL_MESSAGE",
    "Experiment",
    "ExperimentConfig",
    "cached_experiment",
    "run_experiment",
    "run_experiment_owning_the_process",
    "stopped_early",
    "threads_per_client",
]

logger = logging.getLogger(__name__)


DEFAULT_STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a run; ``validate()`` names every bad field at once.

    Example
    -------
    >>> ExperimentConfig(algorithm="csl", dataset="synthetic").validate().strategy
    'parallel'
    >>> ExperimentConfig(clients=0, lr=-1.0).validate()
    Traceback (most recent call last):
    ...
    splitflower.errors.ConfigError: invalid experiment config:
      - clients must be at least 1, got 0
      - lr must be positive, got -1.0
    """

    algorithm: str = "dsl"
    strategy: str | None = None  # None: the algorithm's default
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    model: str = "lenet5"
    cut: str = "s"
    clients: int = 3
    rounds: int = 2
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    partition: str = "iid"
    batching: bool = False
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT_S
    request_order: str = DEFAULT_REQUEST_ORDER  # "clients" (repeatable) or "arrival" (SplitStrategy.request_order)
    device: str = "cpu"
    synthetic_size: int = 2048
    torch_threads: int = 0  # 0: cores shared evenly between concurrent clients
    train_size: int = 0  # 0: the whole training set; else a seeded random subset of this many examples
    options: tuple[str, ...] = ()  # the algorithm's options as "key=value" (see splitflower.options)
    test_size: int = 0  # 0: the whole test set; else a seeded random subset (central evaluation)
    link: str = ""  # "": no emulation; else "UP/DOWN/RTT" per client, e.g. "10mbit/50mbit/20ms" (linkemu)
    hand_over_optimizer: bool = False  # sequential only: the client optimizer's state travels with the segment

    def validate(self) -> ExperimentConfig:
        """Return the config with defaults resolved, or raise ConfigError listing problems."""
        mistyped = _type_problems(self)
        problems = list(mistyped.values())
        choices = (
            ("dataset", list(DATASET_NAMES)),
            ("model", list(MODEL_NAMES)),
            ("request_order", list(REQUEST_ORDERS)),
        )
        for name, allowed in choices:
            value = getattr(self, name)
            if name not in mistyped and value is not None and value not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {value!r}")
        lowest = {"clients": 1, "rounds": 1, "local_epochs": 1, "batch_size": 1, "synthetic_size": 1}
        lowest |= {"momentum": 0, "weight_decay": 0, "train_size": 0, "test_size": 0}
        for name, low in lowest.items():
            if name not in mistyped and getattr(self, name) < low:
                problems.append(f"{name} must be at least {low}, got {getattr(self, name)}")
        for name in ("lr", "flush_timeout"):
            if name not in mistyped and not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay", "flush_timeout"):
            if name not in mistyped and not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)}")
        if "momentum" not in mistyped and self.momentum >= 1:
            problems.append(f"momentum must be below 1 (SGD diverges at 1 or more), got {self.momentum}")
        if self.dataset == "synthetic" and not {"synthetic_size", "train_size", "test_size"} & mistyped.keys():
            problems.extend(self._synthetic_size_problems())
        if "seed" not in mistyped and not 0 <= self.seed < 2**32:
            problems.append(f"seed must be in [0, 2**32), got {self.seed}")
        if "device" not in mistyped:
            problems.extend(_device_problems(self.device))
        if "data_root" not in mistyped and self.data_root and self.dataset == "synthetic":
            problems.append(
                f"data_root {self.data_root!r} is given, but dataset 'synthetic' reads no files (only "
                f"{', '.join(_FILE_DATASETS)} do); drop data_root (--data-root)"
            )
        if "partition" not in mistyped:
            try:
                parse_partition(self.partition)
            except ValueError as err:
                problems.append(str(err))
        if "link" not in mistyped and self.link:
            try:
                parse_link(self.link)
            except ConfigError as err:
                problems.append(str(err))
        algorithm = _attempt(find_algorithm, self.algorithm, problems) if "algorithm" not in mistyped else None
        strategy = self.strategy or (algorithm.default_strategy if algorithm else None)
        strategy_cls = _attempt(find_strategy, strategy, problems) if strategy and "strategy" not in mistyped else None
        incompatible = False
        if algorithm is not None and strategy is not None and strategy_cls is not None:
            try:
                algorithm.check_strategy(strategy)
            except IncompatibleStrategyError as err:
                problems.append(str(err))
                incompatible = True
            if "options" not in mistyped:
                _attempt(algorithm.parse_options, self.options, problems)
            if self.hand_over_optimizer and not strategy_cls.hands_on:
                problems.append(
                    "hand_over_optimizer needs a strategy that hands the client segment on (sequential), "
                    f"got {strategy!r}"
                )
        if problems:
            error = IncompatibleStrategyError if incompatible else ConfigError
            raise error("invalid experiment config:\n  - " + "\n  - ".join(problems))
        return replace(self, strategy=strategy)

    def check_types(self) -> ExperimentConfig:
        """Return the config if every field has its declared type, else raise ConfigError listing
        those that do not: :meth:`validate`'s first step, which imports no algorithm or strategy."""
        mistyped = _type_problems(self)
        if mistyped:
            raise ConfigError("invalid experiment config:\n  - " + "\n  - ".join(mistyped.values()))
        return self

    def _synthetic_size_problems(self) -> list[str]:
        sizes = dict(zip(("train_size", "test_size"), _synthetic_sizes(self.synthetic_size), strict=True))
        return [
            f"{name} must be at most the {size} examples the synthetic dataset of synthetic_size "
            f"{self.synthetic_size} has, got {getattr(self, name)}; use 0 for all"
            for name, size in sizes.items()
            if getattr(self, name) > size
        ]


def _synthetic_sizes(synthetic_size: int) -> tuple[int, int]:
    """The training and test examples of the synthetic dataset of ``synthetic_size``."""
    return synthetic_size, max(synthetic_size // 4, 64)


_FILE_DATASETS: Final = tuple(name for name in DATASET_NAMES if name != "synthetic")


def _attempt(call: Callable[[_In], _Out], argument: _In, problems: list[str]) -> _Out | None:
    """``call(argument)``, or None with its ConfigError added to ``problems`` (a message that
    is a list of its own is indented under it)."""
    try:
        return call(argument)
    except ConfigError as err:
        problems.append(str(err).replace("\n", "\n  "))
        return None


def _device_problems(device: str) -> list[str]:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return [f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}"]
    kind = parsed.type
    if kind == "meta":
        return [f"device {device!r} holds no data (a meta tensor has a shape only), so it cannot train; use 'cpu'"]
    if kind == "cuda":
        if not torch.cuda.is_available():
            return [f"device {device!r}: this machine has no CUDA device torch can use; use 'cpu'"]
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            return [f"device {device!r}: this machine has {count} CUDA device(s), the last cuda:{count - 1}; use one"]
    elif kind != "cpu":
        # Which backends torch was built with, and which of them find hardware, only a tensor tells.
        try:
            torch.empty(1, device=device)
        except Exception as err:  # noqa: BLE001 - each backend fails in its own way (NotImplementedError, ...)
            reason = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]
            return [f"device {device!r}: torch cannot allocate a tensor on it on this machine ({reason}); use 'cpu'"]
    return []


def _type_problems(config: ExperimentConfig) -> dict[str, str]:
    """Fields whose value is not of the declared type, by name (bools are not numbers here)."""
    widen = {float: (int, float)}  # an int is a fine float
    problems: dict[str, str] = {}
    for name, hint in typing.get_type_hints(ExperimentConfig).items():
        value = getattr(config, name)
        if typing.get_origin(hint) is tuple:  # tuple[str, ...]
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                problems[name] = f"{name} must be a tuple of strings, got {value!r}"
            continue
        declared = typing.get_args(hint) or (hint,)
        if value is None and type(None) in declared:
            continue
        wanted = tuple(t for kind in declared if kind is not type(None) for t in widen.get(kind, (kind,)))
        if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
            names = " or ".join(sorted({t.__name__ for t in wanted}))
            problems[name] = f"{name} must be {names}, got {value!r} ({type(value).__name__})"
    return problems


@functools.lru_cache(maxsize=4)
def cached_experiment(config: ExperimentConfig) -> Experiment:
    # Simulation actors serve many virtual clients: load data and build the model once each.
    return Experiment(config)


@dataclass
class Experiment:
    """The objects a config describes: data, the split model, factories for both parties.

    Example
    -------
    >>> experiment = Experiment(ExperimentConfig(algorithm="csl", dataset="synthetic", clients=2))
    >>> type(experiment.make_client(0)).__name__, type(experiment.make_server_model()).__name__
    ('CSLClient', 'CSLServerModel')
    """

    config: ExperimentConfig
    train: ArrayDataset = field(init=False)
    test: ArrayDataset = field(init=False)
    bottom: nn.Module = field(init=False)
    top: nn.Module = field(init=False)
    tail: nn.Module | None = field(init=False, default=None)  # the client's last layer (U-shaped SL)

    def __post_init__(self) -> None:
        self.config = self.config.validate()
        if self.config.dataset == "synthetic":
            self.train, self.test = synthetic(*_synthetic_sizes(self.config.synthetic_size), seed=self.config.seed)
        else:
            self.train, self.test = load_dataset(self.config.dataset, root=self.config.data_root, seed=self.config.seed)
        self.train = _sample(self.train, self.config.train_size, self.config.seed, "train_size")
        self.test = _sample(self.test, self.config.test_size, self.config.seed + 1, "test_size")
        for split, data in (("training", self.train), ("test", self.test)):
            if not len(data):
                raise DatasetError(f"{data.name}'s {split} set is empty; a run needs examples to train and test on")
        c = self.config
        if c.clients > len(self.train):
            kept = f"--train-size {c.train_size} keeps" if c.train_size else f"{self.train.name} has"
            raise DatasetError(
                f"{c.clients} clients (--clients) need a training example each, but {kept} only "
                f"{len(self.train)}; give at most {len(self.train)} clients"
                + (" or a larger --train-size" if c.train_size else "")
            )
        partition_sizes(self.train, c.clients, c.partition, seed=c.seed)  # fails here, not in every client
        channels, height, _ = self.train.input_shape
        torch.manual_seed(self.config.seed)
        model = build_model(
            self.config.model, num_classes=self.train.num_classes, in_channels=channels, image_size=height
        )
        self.bottom, self.top = split_for_cut(self.config.model, model, _cut_value(self.config.cut))
        if self.algorithm.keeps_tail:
            self.top, self.tail = split_last_layer(self.top)

    @property
    def algorithm(self) -> Algorithm:
        return find_algorithm(self.config.algorithm)

    def _optimizer(self) -> Any:
        return sgd(self.config.momentum, self.config.weight_decay)

    def make_client(self, partition_id: int, data: ArrayDataset | None = None) -> Client:
        """The algorithm's client for one partition, starting from the common initial weights."""
        c = self.config
        if data is None:
            data = client_partition(self.train, partition_id, c.clients, c.partition, seed=c.seed)
        torch.manual_seed(c.seed + 1)  # the same auxiliary modules on every client
        return self.algorithm.client(
            copy.deepcopy(self.bottom),
            data,
            None,
            optimizer=self._optimizer(),
            device=c.device,
            client_id=partition_id,
            **({"tail": copy.deepcopy(self.tail)} if self.tail is not None else {}),
            **self.algorithm.option_kwargs(c.options),
        )

    def make_server_model(self) -> ServerModel:
        server_model = self.algorithm.server_model(
            copy.deepcopy(self.top),
            optimizer=self._optimizer(),
            device=self.config.device,
            **self.algorithm.option_kwargs(self.config.options),
        )
        if isinstance(server_model, SupervisedServerModel) and self.tail is None:
            # Known from the dataset, so even a round's first batch has its labels checked per caller.
            server_model.num_classes = self.train.num_classes
        return server_model

    def initial_client_weights(self) -> dict[str, torch.Tensor]:
        return self.make_client(0, self.test).weights()

    def train_config(self) -> dict[str, Any]:
        c = self.config
        return {
            ConfigKey.LOCAL_EPOCHS: c.local_epochs,
            ConfigKey.BATCH_SIZE: c.batch_size,
            ConfigKey.LR: c.lr,
            ConfigKey.SEED: c.seed,
        }

    def make_strategy(self, carried_state: Mapping[str, torch.Tensor] | None = None) -> SplitStrategy:
        """The config's strategy; ``carried_state``: what it carried after the round a run
        resumes from (``SavedModel.strategy_state``; see ``SplitStrategy.load_carried_state``)."""
        c = self.config
        strategy_cls = find_strategy(str(c.strategy))
        extra: dict[str, Any] = {"hand_over_optimizer": True} if c.hand_over_optimizer else {}
        strategy = strategy_cls(
            min_train_nodes=c.clients,
            min_available_nodes=c.clients,
            batching=c.batching,
            flush_timeout=c.flush_timeout,
            request_order=c.request_order,
            link=parse_link(c.link) if c.link else None,
            **extra,
        )
        strategy.load_carried_state(carried_state or {})
        return strategy

    @torch.no_grad()
    def evaluate(self, server_round: int, client_arrays: ArrayRecord, server_arrays: ArrayRecord) -> dict[str, float]:
        """Test loss and accuracy of the round's weights. Where the server model has a remote
        ``predict``, the algorithm's own :meth:`Client.evaluate` runs on the test set against it
        (in this process), so an algorithm that evaluates its own way, or keeps more modules on
        either side, is evaluated as it says; otherwise (U-shaped SL) the client segment, the
        server segment and the client's tail are assembled into one model."""
        if "predict" not in remote_methods(self.algorithm.server_model):
            return self._evaluate_assembled(client_arrays, server_arrays)
        with torch.random.fork_rng(devices=[]):  # building the parties seeds and draws: not the run's business
            server = self.make_server_model()
            client = self.make_client(0, self.test)
        server.configure_fit(server_arrays.to_torch_state_dict(), {ConfigKey.SERVER_ROUND: server_round})
        client.test_data = self.test
        client.server_model_proxy = _InProcessProxy(server)  # type: ignore[assignment]
        loss, _, metrics = client.evaluate(client_arrays.to_torch_state_dict(), {ConfigKey.BATCH_SIZE: 1000})
        return {"test_loss": loss, "test_accuracy": float(metrics["accuracy"])}

    @torch.no_grad()
    def _evaluate_assembled(self, client_arrays: ArrayRecord, server_arrays: ArrayRecord) -> dict[str, float]:
        full = self.assemble(client_arrays.to_torch_state_dict(), server_arrays.to_torch_state_dict())
        loss_sum, correct = 0.0, 0
        for x, y in self.test.batches(1000, shuffle=False):
            logits = full(x.to(self.config.device))
            loss_sum += float(nn.functional.cross_entropy(logits, y.to(self.config.device), reduction="sum"))
            correct += int((logits.argmax(1).cpu() == y).sum())
        return {"test_loss": loss_sum / len(self.test), "test_accuracy": correct / len(self.test)}

    def assemble(self, client_state: Mapping[str, torch.Tensor], server_state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The whole trained network for inference, in eval mode on the config's device: the
        client segment (``segment.*`` of ``client_state``), the server segment
        (``server_state``) and, for U-shaped SL, the client's tail (``tail.*``). Parts that
        only train (an auxiliary head) are left out. See :mod:`splitflower.checkpoint`."""
        bottom, top, tail = copy.deepcopy(self.bottom), copy.deepcopy(self.top), copy.deepcopy(self.tail)
        _load_part(bottom, client_state, "segment.", "the client segment")
        _load_part(top, server_state, "", "the server segment")
        if tail is not None:
            _load_part(tail, client_state, "tail.", "the client's tail")
        return nn.Sequential(bottom, top, *([tail] if tail is not None else [])).to(self.config.device).eval()

    def client_app(self, clients_at_once: int | None = None) -> ClientApp:
        """The ClientApp of a simulation training ``clients_at_once`` clients at a time (default:
        as many as the strategy trains at once) on the machine's cores."""
        return _client_app(self.config, clients_at_once)

    def server_app(
        self,
        strategy: SplitStrategy,
        on_result: Callable[[Context, SplitResult], None],
        on_round: Callable[[int, dict[str, Any]], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        round_timeout: float | None = None,
        resume: SavedModel | None = None,
        checkpoint: Callable[[Context, SplitResult], None] | None = None,
    ) -> ServerApp:
        """The run's ServerApp; ``resume``: weights saved after round k, trained on from
        round k + 1 (see :func:`splitflower.checkpoint.check_resumable`); ``checkpoint``: as
        :func:`~splitflower.app.build_server_app`'s."""
        return build_server_app(
            lambda _: strategy,
            lambda _: self.make_server_model(),
            initial_client_weights=lambda _: self.initial_client_weights() if resume is None else resume.client,
            initial_server_weights=None if resume is None else lambda _: resume.server,
            first_round=None if resume is None else lambda _: resume.first_round,
            train_config=lambda _: self.train_config(),
            central_evaluate=lambda _: self.evaluate,
            on_result=on_result,
            on_round=on_round,
            on_error=on_error,
            num_rounds=self.config.rounds,
            round_timeout=round_timeout,
            checkpoint=checkpoint,
        )


def _load_part(part: nn.Module, state: Mapping[str, torch.Tensor], prefix: str, what: str) -> None:
    weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    try:
        part.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(
            f"the weights do not fit {what} of this experiment's model (is it the run's config? does its "
            f"server model hold more than the server segment?): {str(err).splitlines()[0]}"
        ) from err


def _sample(data: ArrayDataset, size: int, seed: int, name: str) -> ArrayDataset:
    """A seeded random subset of ``size`` examples (0: all of them)."""
    if size == 0:
        return data
    if size > len(data):
        raise ConfigError(f"{name} must be at most the {len(data)} examples {data.name} has, got {size}; use 0 for all")
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size])


def _cut_value(cut: str) -> str | int:
    return int(cut) if cut.lstrip("-").isascii() and cut.lstrip("-").isdecimal() else cut


def threads_per_client(config: ExperimentConfig, clients_at_once: int | None = None) -> int:
    """Torch threads for one client: the cores shared by the clients that run at once
    (``clients_at_once``; default: as many as the strategy trains at once)."""
    if config.torch_threads > 0:
        return config.torch_threads
    return max(1, (os.cpu_count() or 1) // (clients_at_once or _concurrent_clients(config)))


def _concurrent_clients(config: ExperimentConfig) -> int:
    """Clients training at once: one under strategies that serve clients in turn."""
    strategy = find_strategy(str(config.strategy)) if config.strategy else None
    return config.clients if strategy is None or strategy.clients_at_once else 1


def _client_app(config: ExperimentConfig, clients_at_once: int | None = None) -> ClientApp:
    def make(context: Context) -> Client:
        take_flower_level_from_the_command()
        torch.set_num_threads(threads_per_client(config, clients_at_once))
        partition_id = int(context.node_config.get("partition-id", 0))
        return cached_experiment(config).make_client(partition_id)

    return build_client_app(make)


def inert_fields(config: ExperimentConfig) -> frozenset[str]:
    """Fields that change nothing a run under ``config`` computes or measures, left out where
    configs are compared (resuming, a reproduce cell's files): ``request_order`` unless
    clients training at once share a server model unbatched, ``flush_timeout`` where no
    requests are gathered (batched, or run in the clients' order where a model serves two or
    more clients at once).

    Example
    -------
    >>> for strategy, order, clients in [("sequential", "clients", 3), ("batched", "clients", 3),
    ...                                  ("parallel", "clients", 3), ("parallel", "arrival", 3),
    ...                                  ("parallel", "clients", 1), ("splitfed-v1", "clients", 3)]:
    ...     config = ExperimentConfig(strategy=strategy, request_order=order, clients=clients)
    ...     print(strategy, order, clients, sorted(inert_fields(config)))
    sequential clients 3 ['flush_timeout', 'request_order']
    batched clients 3 ['request_order']
    parallel clients 3 []
    parallel arrival 3 ['flush_timeout']
    parallel clients 1 ['flush_timeout', 'request_order']
    splitfed-v1 clients 3 ['flush_timeout', 'request_order']
    """
    strategy = find_strategy(str(config.strategy))(batching=config.batching, request_order=config.request_order)
    shared = strategy.clients_at_once and strategy.shares_server_models(config.clients)
    inert = set()
    if strategy.batching or not shared:
        inert.add("request_order")
    if not strategy.batching and not (strategy.orders_requests and shared):
        inert.add("flush_timeout")
    return frozenset(inert)


STORED_BEFORE_KEPT: Final[Mapping[str, Any]] = {"request_order": "arrival"}
"""What runs did where a results or model file written before a field existed lacks it, where
that differs from the field's default (requests ran as they arrived)."""


def config_as_run(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A config as a results or model file holds it, with each field it lacks (written before
    the field existed) as runs did then: :data:`STORED_BEFORE_KEPT`, else the field's default.
    Keys this version does not know are kept (an :class:`ExperimentConfig` refuses them).

    Example
    -------
    >>> as_run = config_as_run({"algorithm": "csl"})
    >>> as_run["algorithm"], as_run["request_order"], as_run["clients"]
    ('csl', 'arrival', 3)
    """
    return {**config_as_stored(ExperimentConfig()), **STORED_BEFORE_KEPT, **stored}


def differing_fields(stored: Mapping[str, Any], config: ExperimentConfig, ignore: Collection[str] = ()) -> list[str]:
    """The fields (but ``ignore``) in which a config a results or model file holds (see
    :func:`config_as_run`) differs from ``config``, sorted.

    Example
    -------
    >>> differing_fields({"lr": 0.5, "seed": 3, "request_order": "clients"}, ExperimentConfig(), ignore=["seed"])
    ['lr']
    >>> differing_fields({}, ExperimentConfig())  # a file from before request_order: it ran in arrival order
    ['request_order']
    """
    as_run, now = config_as_run(stored), config_as_stored(config)
    return sorted(name for name, value in now.items() if name not in ignore and as_run[name] != value)


_NEVER_STARTED: Final = (
    "the simulation failed before any client reached a server model, and not in the ServerApp; "
    "Ray's local node most likely failed to start (look for 'The current node timed out during "
    "startup' above). Run again"
)
STALL_MESSAGE = (
    "no client reached a server model within {seconds:.0f}s of the simulation starting; Ray's local "
    "node most likely failed to start (look for 'The current node timed out during startup' above), "
    "and Flower's simulation does not end by itself then. Run again; if it keeps happening, free memory "
    "and CPU for Ray or raise --startup-timeout"
)


class _Progress:
    """Prints how far the server models have got, every few seconds, while a round runs.

    If no server model has trained on a single example ``startup_timeout`` seconds after
    the simulation started, it calls ``on_stall`` once with :data:`STALL_MESSAGE`.
    """

    def __init__(
        self,
        strategy: SplitStrategy,
        total: int,
        rounds: int,
        say: Callable[[str], None],
        every: float = 5.0,
        *,
        startup_timeout: float | None = None,
        on_stall: Callable[[str], None] | None = None,
        first_round: int = 1,
    ) -> None:
        self.strategy, self.total, self.say, self.every = strategy, total, say, every
        self.first_round = self.round = first_round
        self.last_round = rounds
        self.startup_timeout = startup_timeout
        self.on_stall = on_stall or say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="splitflower-progress")

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.perf_counter()
        stalled = False
        while not self._stop.wait(self.every):
            if self.round > self.last_round:
                continue
            done = sum(m.num_examples for m in self.strategy.server_models)
            waited = time.perf_counter() - started
            starting = self.round == self.first_round and not done
            if starting and not stalled and self.startup_timeout is not None:
                if waited >= self.startup_timeout:
                    stalled = True
                    self.on_stall(STALL_MESSAGE.format(seconds=waited))
                    continue
            if starting:
                self.say(
                    f"  round {self.round}: no example has reached a server model yet: clients starting ({waited:.0f}s)"
                )
            else:
                self.say(f"  round {self.round}: server trained on {done}/{self.total} examples ({waited:.0f}s)")

    def started(self) -> bool:
        """Whether a round has ended or a server model has trained on an example."""
        return self.round > self.first_round or any(m.num_examples for m in self.strategy.server_models)


def run_experiment(
    config: ExperimentConfig,
    *,
    say: Callable[[str], None] = print,
    startup_timeout: float | None = None,
    on_stall: Callable[[str], None] | None = None,
    keep_model: Callable[[ExperimentConfig, SplitResult], None] | None = None,
    resume: SavedModel | None = None,
    checkpoint: Callable[[ExperimentConfig, SplitResult], object] | None = None,
    checkpoint_every: int = 1,
    clients_at_once: int | None = None,
    keep_progress: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Run ``config`` as a Flower simulation and return the results document.

    ``clients_at_once``: how many clients the simulation trains at a time (default: as many
    as the strategy trains at once that fit in the memory available, see
    :func:`clients_at_once_in_memory`; the results say it under ``clients_at_once``).

    ``resume``: weights a run saved after round k (:func:`splitflower.checkpoint.load_model`),
    trained on from round k + 1 to ``config.rounds``; the config must be the one they were
    saved with (see :func:`splitflower.checkpoint.resumed_config`), and the results hold the
    saved run's rounds (``SavedModel.history``) and the new ones, with ``resumed_from``.

    ``startup_timeout``: seconds after which, if no client has reached a server model yet,
    ``on_stall`` (default: ``say``) is called once with the reason. Flower's simulation
    never returns when Ray's node fails to start, so only a caller that owns the process
    (the CLI) can act on it, by exiting. ``keep_model(config, result)`` is given the run's
    validated config and its weights (``result.arrays``: the client's; ``server_arrays``)
    after its last round, or, if it fails or is interrupted, after the last round it
    recorded (``result.last_round``; see :func:`splitflower.checkpoint.save_model`).
    ``checkpoint(config, result)`` is given the run so far after every ``checkpoint_every``-th
    round but the last (the weights after it, and every round's record), before the round is
    said: where a long run saves what a killed process would otherwise lose (as
    :func:`~splitflower.app.build_server_app`'s ``checkpoint``, which calls it: a
    :class:`~splitflower.errors.ResultsFileError` it raises is logged and the run goes on).
    Neither is given a round that stops the run (``SplitStrategy.last_trained``).
    ``keep_progress(document)`` is given, after every round but the last (after
    ``checkpoint``), the results document so far, marked ``incomplete`` as not ended: what a
    process killed outright (SIGKILL, or SIGTERM under Ray) leaves of its rounds.
    """
    checked_count(checkpoint_every, "checkpoint_every")
    if clients_at_once is not None:
        checked_count(clients_at_once, "clients_at_once")

    for key, value in _OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    # Data and models are built on the compute thread, the only thread of this process
    # that runs parallel torch work (see splitflower.compute).
    experiment = run_on_compute_thread(cached_experiment, config)
    config = experiment.config
    clients_at_once = _clients_at_once(config, clients_at_once, say)
    # (run_versions: results_document's, taken once, not at every round's progress file)
    extra: dict[str, Any] = {"clients_at_once": clients_at_once, "run_versions": versions()}
    if resume is not None:
        from splitflower.checkpoint import check_resumable

        run_on_compute_thread(check_resumable, experiment, resume)
        extra["resumed_from"] = resume.resumed_from(config)
    first_round = 1 if resume is None else resume.first_round

    def carried(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return rounds if resume is None else resume.carry_on(rounds)

    strategy = experiment.make_strategy(resume.strategy_state if resume is not None else None)
    holder: dict[str, SplitResult] = {}
    progress = _Progress(
        strategy,
        len(experiment.train) * config.local_epochs,
        config.rounds,
        say,
        startup_timeout=startup_timeout,
        on_stall=on_stall,
        first_round=first_round,
    )

    def on_round(server_round: int, record: dict[str, Any]) -> None:
        progress.round = server_round + 1
        say(_round_line(server_round, config.rounds, summarise_round(record)))
        for line in _failure_lines(record):
            say(line)

    summaries = OncePerRound(summarise_round)

    def save_after_round(_: Context, result: SplitResult) -> None:
        if result.last_round >= config.rounds:
            return
        try:
            if checkpoint is not None and result.last_round % checkpoint_every == 0:
                checkpoint(config, result)
        finally:
            if keep_progress is not None:
                rounds = carried([summaries(number, record) for number, record in sorted(result.rounds.items())])
                keep_progress(_incomplete_document(config, rounds, time.perf_counter() - started, NOT_ENDED, extra))

    def keep_result(_: Context, result: SplitResult) -> None:
        holder["result"] = result

    server_errors: list[BaseException] = []
    started = time.perf_counter()
    say(_opening_line(config, resume))
    server_app = experiment.server_app(
        strategy, keep_result, on_round, server_errors.append, resume=resume, checkpoint=save_after_round
    )
    stopped_by = _simulate(experiment, server_app, clients_at_once, progress, server_errors)
    if stopped_by is None and "result" not in holder:
        if not server_errors and not progress.started():
            raise SimulationStartError(_NEVER_STARTED)
        stopped_by = _first_server_error(server_errors)
    if stopped_by is not None:
        rounds = _keep_what_was_recorded(config, strategy, keep_model)
        raise _stopped_error(config, rounds and carried(rounds), time.perf_counter() - started, stopped_by, extra)
    # (A round that trained on no client stopped the run in the strategy: see SplitStrategy.start.)
    result = holder["result"]
    if keep_model is not None:
        keep_model(config, result)
    return results_document(config, carried(summarise_rounds(result.rounds)), time.perf_counter() - started, **extra)


def _clients_at_once(config: ExperimentConfig, given: int | None, say: Callable[[str], None]) -> int:
    """The clients a simulation trains at a time: ``given`` (at most as many as the strategy
    trains at once), else those that fit in memory, said where that is fewer."""
    wanted = _concurrent_clients(config)
    if given is not None:
        return min(given, wanted)
    fit, fewer = clients_at_once_in_memory(wanted)
    if fewer:
        say(f"splitflower: warning: {fewer} (--clients-at-once N sets the number and trusts it to fit)")
    return fit


def _simulate(
    experiment: Experiment,
    server_app: ServerApp,
    clients_at_once: int,
    progress: _Progress,
    server_errors: Sequence[BaseException],
) -> BaseException | None:
    """Run the experiment's simulation with ``server_app``; what stopped it early, or None."""
    from flwr.simulation import run_simulation

    config = experiment.config
    with progress, sigterm_handler_kept():
        try:
            run_simulation(
                server_app=server_app,
                client_app=experiment.client_app(clients_at_once),
                num_supernodes=config.clients,
                backend_config=_backend_config(config, clients_at_once),
            )
        except Exception as err:
            # An error of the ServerApp's own (a strategy's, a server model's) is not Ray's.
            if not server_errors and not progress.started():
                raise SimulationStartError(_NEVER_STARTED) from err
            return err
        except BaseException as err:
            if not is_interruption(err):
                raise
            # Ctrl-C or SIGTERM: the rounds recorded so far are kept all the same.
            stopping()
            return err if isinstance(err, KeyboardInterrupt) else KeyboardInterrupt("SIGTERM")
    return None


NOT_ENDED: Final = "the run had not ended when this was written (it went on, or was killed)"


def _incomplete_document(
    config: ExperimentConfig, rounds: list[dict[str, Any]], wall_s: float, reason: str, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The results document of a run that has recorded ``rounds`` (some) but not all, and why."""
    incomplete = {"error": reason, "rounds_recorded": len(rounds), "rounds_planned": config.rounds}
    return results_document(
        config, rounds, wall_s, incomplete={**incomplete, "last_round": rounds[-1]["round"]}, **extra
    )


def _opening_line(config: ExperimentConfig, resume: SavedModel | None) -> str:
    """The line a run starts with: what runs, and which rounds."""
    rounds = f"{config.rounds} rounds"
    if resume is not None:
        rounds = f"rounds {resume.first_round} to {config.rounds} ({resume.path})"
    return (
        f"splitflower: {config.algorithm} / {config.strategy}, {config.dataset}, {config.model} cut {config.cut}, "
        f"{config.clients} clients, {rounds}"
    )


def _stopped_error(
    config: ExperimentConfig,
    rounds: list[dict[str, Any]],
    wall_s: float,
    stopped_by: BaseException,
    extra: Mapping[str, Any],
) -> BaseException:
    """What a run that ``stopped_by`` ended after recording ``rounds`` (the saved run's
    carried before them; none if it recorded none of its own) raises."""
    if not rounds and isinstance(stopped_by, SplitflowerError) and not isinstance(stopped_by, ExperimentFailedError):
        return stopped_by  # bad input (a strategy's assign, say) before any round: said as it is
    # No new round, no partial file (as in the example app): the saved run's rounds alone add nothing.
    error = stopped_early(config, rounds, wall_s, stopped_by, **extra)
    error.__cause__ = stopped_by
    return error


def _keep_what_was_recorded(
    config: ExperimentConfig,
    strategy: SplitStrategy,
    keep_model: Callable[[ExperimentConfig, SplitResult], None] | None,
) -> list[dict[str, Any]]:
    """A stopped run: give ``keep_model`` the weights of its last round worth keeping; return
    the results entries of the rounds it recorded."""
    # One snapshot for the rounds and the weights: an interrupted ServerApp may still be recording.
    recorded, kept = strategy.last_recorded, strategy.last_trained
    if keep_model is not None and kept is not None:
        try:
            keep_model(config, kept)
        except Exception:  # the run's own error is the one to report
            logger.exception("[server] keeping the weights of the last round recorded failed")
    return summarise_rounds(recorded.rounds) if recorded is not None else []


def _first_server_error(server_errors: Sequence[BaseException]) -> BaseException:
    """The ServerApp's error to report: the strategy's own verdict (an untrained round) first."""
    for error in server_errors:
        if isinstance(error, ExperimentFailedError):
            return error
    if server_errors:
        return server_errors[0]
    return RuntimeError("the simulation ended without a result; see the log above for the ServerApp's error")


def stopped_early(
    config: ExperimentConfig, rounds: list[dict[str, Any]], wall_s: float, error: BaseException, **extra: Any
) -> ExperimentFailedError | RunInterruptedError:
    """The :class:`ExperimentFailedError` of a run that ``error`` stopped, carrying the rounds
    it finished as a results document marked ``incomplete`` (none if it finished none)."""
    if isinstance(error, ExperimentFailedError):
        reason = str(error)
    elif isinstance(error, KeyboardInterrupt):
        reason = "interrupted (KeyboardInterrupt)"
    else:
        reason = f"{type(error).__name__}: {error}"
    # The last round trained, of the run or of the run it resumed.
    done = rounds[-1]["round"] if rounds else extra.get("resumed_from", {}).get("rounds", 0)
    partial = _incomplete_document(config, rounds, wall_s, reason, extra) if rounds else None
    if isinstance(error, KeyboardInterrupt):
        return RunInterruptedError(f"interrupted after {done} of {config.rounds} rounds", partial)
    if isinstance(error, ExperimentFailedError):
        return ExperimentFailedError(reason, partial)
    return ExperimentFailedError(f"the run stopped after {done} of {config.rounds} rounds: {reason}", partial)


_OFFLINE_ENVIRONMENT: Final = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
}


def _backend_config(config: ExperimentConfig, clients_at_once: int | None = None) -> dict[str, Any]:
    concurrent = clients_at_once or _concurrent_clients(config)
    # Ray hides the GPUs from actors that ask for none: clients on CUDA share them.
    gpus_per_client = 1 / concurrent if config.device.startswith("cuda") else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus_per_client},
        "init_args": {"num_cpus": concurrent, "include_dashboard": False},
    }


def _round_line(server_round: int, rounds: int, entry: Mapping[str, Any]) -> str:
    return (
        f"round {server_round}/{rounds}: test accuracy {entry.get('test_accuracy', float('nan')):.4f}, "
        f"up {entry['bytes']['up_payload_bytes'] / 1e6:.1f} MB, "
        f"down {entry['bytes']['down_payload_bytes'] / 1e6:.1f} MB, "
        f"{entry['seconds']:.1f}s"
    )


def _failure_lines(record: Mapping[str, Any]) -> list[str]:
    """A line per client of the round whose code raised, with what it raised (the strategy's
    log says which clients did not reply in time or whose replies it left out)."""
    lines = []
    for entry in record["clients"]:
        if "error" in entry and entry["error"] != NO_REPLY:
            who = f"client {entry['index']}" if entry["index"] >= 0 else f"node {entry['node_id']}"
            lines.append(f"  {who} failed: {raised_by_client(entry['error'])}")
    return lines


def run_experiment_owning_the_process(
    config: ExperimentConfig,
    *,
    say: Callable[[str], None] = print,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
    keep_partial: Callable[[dict[str, Any]], None] | None = None,
    keep_model: Callable[[ExperimentConfig, SplitResult], None] | None = None,
    resume: SavedModel | None = None,
    checkpoint: Callable[[ExperimentConfig, SplitResult], object] | None = None,
    checkpoint_every: int = 1,
    clients_at_once: int | None = None,
    keep_progress: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """:func:`run_experiment` for a caller that owns its process (the CLI, a reproduce cell).

    When Ray's node fails to start, Flower's ServerApp thread waits for replies forever, and
    a normal exit would wait for that thread: the process would never end. So if no client
    reaches a server model within ``startup_timeout`` seconds, or the simulation fails before
    one does, the process ends with :data:`STALLED_EXIT_CODE` (running it again is the cure).
    A run that fails later, or is interrupted (Ctrl-C, or SIGTERM: the first one; those after it
    are ignored, see :mod:`splitflower._termination`), hands the rounds it recorded (a results
    document marked ``incomplete``) to ``keep_partial`` and ends the process with
    :data:`CRASHED_EXIT_CODE` or :data:`INTERRUPTED_EXIT_CODE`, saying why: the ServerApp's
    thread may still be waiting for replies. A bad config or dataset, found before the
    simulation starts, raises its :class:`~splitflower.errors.SplitflowerError` as usual.
    """
    with sigterm_as_ctrl_c():  # the handler before is put back when the run returns
        try:
            return run_experiment(
                config,
                say=say,
                startup_timeout=startup_timeout,
                on_stall=_end_stalled,
                keep_model=keep_model,
                resume=resume,
                checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
                clients_at_once=clients_at_once,
                keep_progress=keep_progress,
            )
        except SimulationStartError as err:
            traceback.print_exc()
            _end_stalled(str(err))
        except (ExperimentFailedError, RunInterruptedError) as err:
            _end_stopped_run(err, keep_partial)
        except SplitflowerError:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, while the first was being handled
            _end_process(INTERRUPTED_EXIT_CODE, "splitflower: interrupted")
        except Exception:  # noqa: BLE001 - reported, then the process ends at once
            traceback.print_exc()
            _end_process(CRASHED_EXIT_CODE, "splitflower: error: the simulation failed (traceback above)")


def _end_stopped_run(
    error: ExperimentFailedError | RunInterruptedError, keep_partial: Callable[[dict[str, Any]], None] | None
) -> NoReturn:
    """Show where a run's own bug raised, keep its recorded rounds, and end the process, whatever
    happens meanwhile (a closed pipe, a second Ctrl-C): the ServerApp's thread may be alive."""
    interrupted = isinstance(error, RunInterruptedError)
    try:
        cause = error.__cause__
        if cause is not None and not isinstance(cause, SplitflowerError | KeyboardInterrupt):
            traceback.print_exception(cause)
        if error.partial_results is not None and keep_partial is not None:
            keep_partial(error.partial_results)
    except BaseException:  # noqa: BLE001 - said if it can be, then the process ends all the same
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        _end_process(
            INTERRUPTED_EXIT_CODE if interrupted else CRASHED_EXIT_CODE,
            f"splitflower: {error}" if interrupted else f"splitflower: error: {error}",
        )


def _end_stalled(message: str) -> NoReturn:
    _end_process(STALLED_EXIT_CODE, f"splitflower: error: {message}")


def _end_process(code: int, message: str) -> NoReturn:
    with contextlib.suppress(BaseException):  # a closed pipe must not keep the process alive
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
    os._exit(code)


class _InProcessProxy:
    """``proxy.<method>(**tensors)`` run on a server model in this process: what central
    evaluation gives an algorithm's client instead of a channel."""

    def __init__(self, server_model: ServerModel) -> None:
        self._server_model = server_model

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(**tensors: torch.Tensor) -> Any:
            return resolve_call(self._server_model, method, tensors)(**tensors)

        return call
