"""An experiment: dataset x model x cut x algorithm x strategy, and the objects it builds
(data, the split model, the two parties' factories, the Flower apps).

:mod:`splitflower.simulation` runs one as a Flower simulation; the example app builds its
apps from one. What a run returns and writes is a results document
(:mod:`splitflower.results`).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeVar

import torch
from flwr.app import ArrayRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from torch import nn

from splitflower._logs import take_flower_level_from_the_command
from splitflower.algorithms import Algorithm, find_algorithm
from splitflower.app import build_client_app, build_server_app
from splitflower.client import Client
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
    ConfigError,
    DatasetError,
    IncompatibleStrategyError,
)
from splitflower.linkemu import parse_link
from splitflower.models import MODEL_NAMES, build_model
from splitflower.results import (
    config_as_stored,
)
from splitflower.scheduling import DEFAULT_FLUSH_TIMEOUT_S, DEFAULT_REQUEST_ORDER, REQUEST_ORDERS
from splitflower.server_model import ServerModel, remote_methods, resolve_call, sgd
from splitflower.split import split_for_cut, split_last_layer
from splitflower.strategies import find_strategy
from splitflower.strategy import SplitResult, SplitStrategy
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
    "Experiment",
    "ExperimentConfig",
    "cached_experiment",
    "clients_trained_at_once",
    "threads_per_client",
]


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
        problems = [*mistyped.values(), *self._value_problems(mistyped), *self._source_problems(mistyped)]
        strategy, incompatible = self._algorithm_problems(mistyped, problems)
        if problems:
            error = IncompatibleStrategyError if incompatible else ConfigError
            raise error("invalid experiment config:\n  - " + "\n  - ".join(problems))
        return replace(self, strategy=strategy)

    def _value_problems(self, mistyped: Mapping[str, str]) -> list[str]:
        """Numbers out of range and names that are not among the choices (well-typed fields only)."""
        problems = []
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
        if "seed" not in mistyped and not 0 <= self.seed < 2**32:
            problems.append(f"seed must be in [0, 2**32), got {self.seed}")
        return problems

    def _source_problems(self, mistyped: Mapping[str, str]) -> list[str]:
        """Where the data, the partition, the device and the link are not what can be had."""
        problems = []
        if self.dataset == "synthetic" and not {"synthetic_size", "train_size", "test_size"} & mistyped.keys():
            problems.extend(self._synthetic_size_problems())
        if "device" not in mistyped:
            problems.extend(_device_problems(self.device))
        if "data_root" not in mistyped and self.data_root and self.dataset == "synthetic":
            problems.append(
                f"data_root {self.data_root!r} is given, but dataset 'synthetic' reads no files (only "
                f"{', '.join(_FILE_DATASETS)} do); drop data_root (--data-root)"
            )
        if "partition" not in mistyped:
            _attempt(parse_partition, self.partition, problems, ValueError)
        if "link" not in mistyped and self.link:
            _attempt(parse_link, self.link, problems)
        return problems

    def _algorithm_problems(self, mistyped: Mapping[str, str], problems: list[str]) -> tuple[str | None, bool]:
        """Appends what is wrong with the algorithm, its options and its strategy to
        ``problems``; returns the strategy (the algorithm's default where none is given) and
        whether the two are incompatible."""
        algorithm = _attempt(find_algorithm, self.algorithm, problems) if "algorithm" not in mistyped else None
        strategy = self.strategy or (algorithm.default_strategy if algorithm else None)
        strategy_cls = _attempt(find_strategy, strategy, problems) if strategy and "strategy" not in mistyped else None
        if algorithm is None or strategy is None or strategy_cls is None:
            return strategy, False
        try:
            algorithm.check_strategy(strategy)
            incompatible = False
        except IncompatibleStrategyError as err:
            problems.append(str(err))
            incompatible = True
        if "options" not in mistyped:
            _attempt(algorithm.parse_options, self.options, problems)
        if self.hand_over_optimizer and not strategy_cls.hands_on:
            problems.append(
                f"hand_over_optimizer needs a strategy that hands the client segment on (sequential), got {strategy!r}"
            )
        return strategy, incompatible

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


def _attempt(
    call: Callable[[_In], _Out],
    argument: _In,
    problems: list[str],
    errors: type[Exception] | tuple[type[Exception], ...] = ConfigError,
) -> _Out | None:
    """``call(argument)``, or None with the error it raised (one of ``errors``) added to
    ``problems`` (a message that is a list of its own is indented under it)."""
    try:
        return call(argument)
    except errors as err:
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
    return max(1, (os.cpu_count() or 1) // (clients_at_once or clients_trained_at_once(config)))


def clients_trained_at_once(config: ExperimentConfig) -> int:
    """Clients the config's strategy trains at once: all, or one under strategies that serve
    clients in turn."""
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


class _InProcessProxy:
    """``proxy.<method>(**tensors)`` run on a server model in this process: what central
    evaluation gives an algorithm's client instead of a channel."""

    def __init__(self, server_model: ServerModel) -> None:
        self._server_model = server_model

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(**tensors: torch.Tensor) -> Any:
            return resolve_call(self._server_model, method, tensors)(**tensors)

        return call
