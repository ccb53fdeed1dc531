"""The server side of a split model: :class:`ServerModel` and its remotely callable methods."""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any, ClassVar, Final, TypeVar

import torch
from torch import nn

from splitflower._checks import all_finite, refuse_options_the_base_cannot_read, refuse_shadowed_methods
from splitflower.errors import AlgorithmError, InvalidArgumentsError, UnknownMethodError
from splitflower.metering import MemoryTally
from splitflower.wire import PROXY_ATTRIBUTES, ConfigKey

__all__ = [
    "CallContext",
    "PerCaller",
    "FLOATING",
    "TensorSpec",
    "remote",
    "local",
    "ServerModel",
    "FitResult",
    "OptimizerFactory",
    "remote_methods",
    "check_values",
    "resolve_call",
    "sgd",
]

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
FLOATING: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_RESERVED_ARGUMENTS = frozenset({"timeout"})
_F = TypeVar("_F", bound=Callable[..., Any])
_SPECS_ATTRIBUTE = "__splitflower_specs__"
_LOCAL_ATTRIBUTE = "__splitflower_local__"


def sgd(momentum: float = 0.9, weight_decay: float = 0.0) -> OptimizerFactory:
    """An optimizer factory: ``sgd(0.9)(params, lr)`` builds ``torch.optim.SGD``."""

    def build(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    return build


@dataclass(frozen=True)
class TensorSpec:
    """What a remote method accepts for one argument.

    ``shape`` entries are an int (exact), a str (a named size that must agree across the
    arguments of one call, e.g. ``"batch"``), ``None`` (any), and a final ``...`` (any
    number of further dimensions).

    Values: ``finite`` refuses NaN and infinities in floating tensors; ``low`` and ``high``
    bound every value as ``range`` does (``low <= value < high``), and a str ``high`` names
    an attribute of the server model (e.g. ``"num_classes"``; unchecked while it is None).
    Dtypes and shapes are checked on the gRPC thread that carries the request; values on
    the compute thread, for each caller's tensors before a batching scheduler concatenates
    them, so a bad value fails its own caller's call and not the batch.

    Example
    -------
    >>> spec = TensorSpec(dtypes=(torch.int64,), shape=("batch",), low=0, high=10)
    >>> spec.check("labels", torch.zeros(4, dtype=torch.int64), {})
    >>> spec.check_values("labels", torch.tensor([3, 12]), model=None)
    Traceback (most recent call last):
    ...
    splitflower.errors.InvalidArgumentsError: argument 'labels': expected 0 <= value < 10, got values from 3 to 12
    """

    dtypes: tuple[torch.dtype, ...] | None = None
    shape: tuple[int | str | EllipsisType | None, ...] | None = None
    finite: bool = False
    low: float | None = None
    high: float | str | None = None

    def __post_init__(self) -> None:
        if self.dtypes is not None and (
            not isinstance(self.dtypes, tuple | list) or not all(isinstance(d, torch.dtype) for d in self.dtypes)
        ):
            raise AlgorithmError(
                f"TensorSpec dtypes: expected a tuple of torch dtypes such as (torch.float32,), got {self.dtypes!r}"
            )
        if self.shape is not None and not isinstance(self.shape, tuple | list):
            raise AlgorithmError(f"TensorSpec shape: expected a tuple such as ('batch', ...), got {self.shape!r}")
        for which, bound, allowed in (
            ("low", self.low, "a number"),
            ("high", self.high, "a number or an attribute name"),
        ):
            is_number = isinstance(bound, int | float) and not isinstance(bound, bool) and bound == bound
            if bound is not None and not is_number and not (which == "high" and isinstance(bound, str)):
                raise AlgorithmError(f"TensorSpec {which}: expected {allowed}, got {bound!r}")
        if isinstance(self.low, int | float) and isinstance(self.high, int | float) and not self.low < self.high:
            raise AlgorithmError(
                f"TensorSpec: low must be below high (low <= value < high), got {self.low} and {self.high}"
            )

    @property
    def checks_values(self) -> bool:
        """Whether :meth:`check_values` has anything to check."""
        return self.finite or self.low is not None or self.high is not None

    def check_values(self, name: str, tensor: torch.Tensor, model: object) -> None:
        """Raise :class:`InvalidArgumentsError` if a value of ``tensor`` is out of bounds or,
        with ``finite``, NaN or infinite; ``model`` resolves a str ``high``."""
        if not tensor.numel():
            return
        if self.finite and tensor.is_floating_point() and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InvalidArgumentsError(
                f"argument {name!r}: expected finite values, got {bad} NaN or infinite of {tensor.numel()}; "
                "the client's segment has diverged (lower the learning rate) or its input holds NaN"
            )
        high = getattr(model, self.high, None) if isinstance(self.high, str) else self.high
        if self.low is None and high is None:
            return
        if tensor.is_complex():
            raise InvalidArgumentsError(f"argument {name!r}: expected real values to bound, got {tensor.dtype}")
        smallest, largest = (
            float(v) for v in tensor.to(torch.uint8 if tensor.dtype is torch.bool else tensor.dtype).aminmax()
        )
        # Written as "not (inside)" so that a NaN, which compares False, is refused.
        if (self.low is not None and not smallest >= self.low) or (high is not None and not largest < high):
            bound = " <= ".join(_number(b) for b in (self.low, "value") if b is not None)
            bound = f"{bound} < {_number(high)}" if high is not None else bound
            where = f" ({self.high} of the server model)" if isinstance(self.high, str) else ""
            raise InvalidArgumentsError(
                f"argument {name!r}: expected {bound}{where}, got values from {_number(smallest)} to {_number(largest)}"
            )

    def check(self, name: str, tensor: torch.Tensor, sizes: dict[str, int]) -> None:
        """Raise :class:`InvalidArgumentsError` if ``tensor`` does not match."""
        if self.dtypes is not None and tensor.dtype not in self.dtypes:
            wanted = " or ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            given = str(tensor.dtype).removeprefix("torch.")
            raise InvalidArgumentsError(f"argument {name!r}: expected dtype {wanted}, got {given}")
        if self.shape is None:
            return
        open_ended = bool(self.shape) and self.shape[-1] is Ellipsis
        fixed = self.shape[:-1] if open_ended else self.shape
        if tensor.dim() < len(fixed) or (not open_ended and tensor.dim() != len(fixed)):
            raise InvalidArgumentsError(
                f"argument {name!r}: expected shape {_show(self.shape)}, got {list(tensor.shape)}"
            )
        for axis, (want, got) in enumerate(zip(fixed, tensor.shape, strict=False)):
            if isinstance(want, int) and want != got:
                raise InvalidArgumentsError(
                    f"argument {name!r}: dimension {axis} must be {want}, got {got} "
                    f"(expected shape {_show(self.shape)}, got {list(tensor.shape)})"
                )
            if isinstance(want, str):
                bound = sizes.setdefault(want, got)
                if bound != got:
                    raise InvalidArgumentsError(
                        f"argument {name!r}: dimension {axis} ({want!r}) is {got}, but another "
                        f"argument of this call has {want!r} = {bound}"
                    )


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show(shape: tuple[int | str | EllipsisType | None, ...]) -> str:
    return "[" + ", ".join("..." if s is Ellipsis else repr(s) if isinstance(s, str) else str(s) for s in shape) + "]"


def remote(*bare: Any, **specs: TensorSpec) -> Callable[[_F], _F]:
    """Declare what each argument of a remotely callable method must look like.

    Example
    -------
    >>> class Echo(ServerModel):
    ...     @remote(x=TensorSpec(dtypes=FLOATING))
    ...     def echo(self, x: torch.Tensor) -> torch.Tensor:
    ...         return x
    """

    if bare:
        raise AlgorithmError("write @remote(...) with parentheses, naming each argument's TensorSpec (or @remote())")
    not_specs = {name: spec for name, spec in specs.items() if not isinstance(spec, TensorSpec)}
    if not_specs:
        raise AlgorithmError(
            f"@remote takes a TensorSpec per argument, e.g. @remote(x=TensorSpec(...)); got {not_specs!r}"
        )

    def decorate(method: _F) -> _F:
        setattr(method, _SPECS_ATTRIBUTE, dict(specs))
        return method

    return decorate


def local(method: _F) -> _F:
    """Keep a public method of a ServerModel off the wire: the server calls it, clients cannot.

    An override in a subclass stays local. Use it for helpers that a subclass or the
    server's own methods call, such as a training step.

    Example
    -------
    >>> class Trainer(ServerModel):
    ...     @local
    ...     def train_on(self, x: torch.Tensor) -> None: ...
    >>> "train_on" in remote_methods(Trainer)
    False
    """
    setattr(method, _LOCAL_ATTRIBUTE, True)
    return method


def _is_local(cls: type, name: str) -> bool:
    return any(getattr(vars(base).get(name), _LOCAL_ATTRIBUTE, False) for base in cls.__mro__)


@dataclass(frozen=True)
class _RemoteMethod:
    name: str
    parameters: tuple[str, ...]
    required: frozenset[str]
    specs: Mapping[str, TensorSpec]
    value_specs: tuple[tuple[str, TensorSpec], ...]  # those with values to check, per call


@dataclass(frozen=True)
class CallContext:
    """Who is calling a server-model method, and which rows of its batch are whose.

    Schedulers set it for the duration of each call (see :attr:`ServerModel.call_context`).
    ``callers`` are the clients whose requests the call serves, in the order their
    tensors were concatenated; ``rows[i]`` is the slice of dimension 0 that came from
    ``callers[i]``. An unbatched call has one caller owning every row.

    Example
    -------
    >>> context = CallContext(callers=("a", "b"), rows=(slice(0, 2), slice(2, 5)))
    >>> context.sizes
    [2, 3]
    >>> context.own_mean_grad(torch.ones(5))
    tensor([2.5000, 2.5000, 1.6667, 1.6667, 1.6667])
    """

    callers: tuple[Hashable, ...] = ()
    rows: tuple[slice, ...] = ()

    @property
    def caller(self) -> Hashable:
        """The one client this call serves; refuses a call batched across clients."""
        if len(self.callers) != 1:
            raise RuntimeError(
                f"call_context.caller needs exactly one caller, got {len(self.callers)} "
                f"({list(self.callers)}); use callers/rows under a batching scheduler"
            )
        return self.callers[0]

    @property
    def sizes(self) -> list[int]:
        """Rows per caller."""
        return [r.stop - r.start for r in self.rows]

    def rows_of_other_callers(self, count: int | None = None) -> torch.Tensor:
        """For each row of the batch, a random row of each of ``count`` other callers, those
        drawn at random per caller (None, or more than there are: every other caller): indices
        of shape ``(rows, count)``, as mixup across clients pairs rows (LocFedMix-SL).

        Example
        -------
        >>> context = CallContext(callers=("a", "b"), rows=(slice(0, 2), slice(2, 5)))
        >>> partners = context.rows_of_other_callers()
        >>> partners.shape, bool((partners[:2] >= 2).all() and (partners[2:] < 2).all())
        (torch.Size([5, 1]), True)
        """
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"count must be None (every other caller) or at least 1, got {count!r}")
        sizes = torch.tensor(self.sizes)
        others = len(sizes) - 1
        count = others if count is None else min(count, others)
        # A caller sorts itself last: its first ``count`` are others, in random order.
        partners = torch.argsort(torch.rand(others + 1, others + 1) + torch.eye(others + 1), dim=1)[:, :count]
        partner = partners.repeat_interleave(sizes, dim=0)  # (rows, count) caller indices
        starts = torch.cumsum(sizes, 0) - sizes
        return starts[partner] + (torch.rand(partner.shape) * sizes[partner]).long()

    def own_mean_grad(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Turn the gradient of a loss averaged over the whole batch into each caller's
        gradient of its own mean loss: rows scaled by ``total rows / the caller's rows``."""
        if grad is None or not self.rows:
            return grad
        total = sum(self.sizes)
        scale = torch.cat([torch.full((n,), total / n) for n in self.sizes]).to(grad)
        return grad * scale.view(-1, *[1] * (grad.dim() - 1))


class PerCaller(tuple):  # type: ignore[type-arg]
    """A method's return value holding one item per caller of the call, in the order of
    :attr:`CallContext.callers`: each client gets its own item. Without it, a scheduler that
    batched several clients' requests splits every returned tensor whose first dimension is
    the batch's rows by caller and hands anything else to every caller; return ``PerCaller``
    for per-caller values of any shape (each client's own loss, say), or to keep a tensor
    that merely has as many rows as the batch from being split.

    Example
    -------
    >>> class Losses(ServerModel):
    ...     def loss(self, z: torch.Tensor) -> PerCaller:
    ...         return PerCaller(z[rows].mean() for rows in self.call_context.rows)
    """

    __slots__ = ()


@dataclass
class FitResult:
    """What a party returns after a round: weights, the examples it trained on, metrics."""

    weights: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class ServerModel:
    """One server-side model segment, its optimizer, and the computations clients offload.

    Every public method a subclass defines is callable by clients through their
    ``server_model_proxy`` with keyword tensors; the framework's own methods (those defined
    here) and ``_private`` names are not. Arguments arrive on ``self.device``; the return
    value (None, a tensor, a dict of tensors with string keys, or a tuple or list of tensors,
    which arrives as a tuple) goes back to the caller.
    ``configure_fit`` loads the round's weights and rebuilds the optimizer;
    ``get_fit_result`` hands the trained weights back to the strategy. The optimizer state
    therefore lives for one round, as on the clients. During a call, :attr:`call_context`
    says which client(s) it serves (and, when a scheduler batched several clients'
    requests, which rows are whose), so a method can keep per-client state; :meth:`keep`
    and :meth:`take_kept` carry something (a graph, say) from one call of a client to its next.
    During a call, torch's global RNG (what dropout, ``torch.rand`` and ``torch.distributions``
    draw from) is the model's own stream, seeded by each ``configure_fit`` from the run's seed,
    the round and the model's index among the round's server models: a run with the same seed
    draws the same numbers again, resumed or not, whatever the clients or the process draw
    between calls. Exceptions: clients that run as threads of this process and draw from the
    global RNG during a call; and server models on compute threads of their own whose calls
    overlap: the RNG is process-wide, so they share it and their draws do not repeat (logged
    once). Outside calls the process's RNG is left as it was.

    Example
    -------
    >>> class Classifier(ServerModel):
    ...     def train_step(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    ...         loss = nn.functional.cross_entropy(self.model(embeddings), labels)
    ...         self.step(loss, num_examples=len(labels))
    >>> server = Classifier(nn.Linear(8, 2))
    >>> server.configure_fit(None, {"lr": 0.1})
    >>> server.train_step(torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
    >>> server.get_fit_result().num_examples
    4
    """

    Options: ClassVar[type | None] = None
    """The algorithm's options dataclass; ``self.options`` holds an instance (defaults if not given)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        refuse_shadowed_methods(cls, _SERVER_MODEL_ATTRIBUTES, "ServerModel")
        refuse_options_the_base_cannot_read(cls)
        # A method no client could call, or a misspelt spec, fails here. Not cached: a class
        # decorator may still add or mark methods.
        _describe(cls)

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: OptimizerFactory | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        options: Any = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer_factory = optimizer or sgd()
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.optimizer = self._build_optimizer(0.01)
        self.memory = MemoryTally()
        self.log_prefix = "[server]"
        self._num_examples = 0
        self._loss_sum = 0.0
        self._call_context = CallContext()
        self._kept: dict[Hashable, tuple[Any, ...]] = {}
        self._taken: dict[Hashable, tuple[Any, ...]] = {}  # by the call in progress
        self._draws: _RngStates | None = None  # the model's own RNG stream, between calls
        self._outer_draws: _RngStates | None = None  # the process's, during a call
        self.options: Any = options if options is not None else (self.Options() if self.Options else None)

    @property
    def call_context(self) -> CallContext:
        """The clients served by the call in progress (empty outside a scheduled call)."""
        return self._call_context

    def keep(self, *values: Any) -> None:
        """Keep ``values`` (e.g. a graph to backpropagate later) for the calling client's
        next call, which takes them with :meth:`take_kept`. A client has one such slot: a
        second keep before a take replaces the first. Dropped at the next round."""
        self._kept[self.call_context.caller] = values

    def take_kept(self, kept_by: str) -> tuple[Any, ...]:
        """Take what the calling client last kept; ``kept_by`` names the call that should have
        kept it, for the error when nothing was (a call that came first). If the call that
        takes it refuses its input with :class:`~splitflower.errors.InvalidArgumentsError`
        (say, a gradient of the wrong shape, refused by :meth:`step` before it backpropagates),
        it stays kept, so that the client can send the call again. Any other error drops it:
        the call may have used it already.

        Example
        -------
        >>> server = ServerModel(nn.Identity())
        >>> server.take_kept("forward")
        Traceback (most recent call last):
        ...
        splitflower.errors.InvalidArgumentsError: nothing kept for client None: call forward() first
        """
        caller = self.call_context.caller if self.call_context.callers else None
        if caller not in self._kept:
            raise InvalidArgumentsError(f"nothing kept for client {caller!r}: call {kept_by}() first")
        self._taken[caller] = taken = self._kept.pop(caller)
        return taken

    def _begin_call(self, context: CallContext) -> None:
        """Called by the scheduler before each call, on the thread that runs it."""
        self._call_context = context
        if self._draws is None:
            return
        if not _GLOBAL_RNG_LENT.acquire(blocking=False):  # the RNG is process-wide: one stream at a time
            _warn_once_unseeded(self.log_prefix)
            return
        try:
            self._outer_draws = _rng_states(self.device)
            _set_rng_states(self.device, self._draws)
        except BaseException:
            self._outer_draws = None
            _GLOBAL_RNG_LENT.release()
            raise

    def _end_call(self, error: BaseException | None) -> None:
        """Called by the scheduler after each call: a call that refused its input gives back
        what it took; the process's RNG comes back."""
        if self._outer_draws is not None:
            self._draws = _rng_states(self.device)
            _set_rng_states(self.device, self._outer_draws)
            self._outer_draws = None
            _GLOBAL_RNG_LENT.release()
        if isinstance(error, InvalidArgumentsError):
            for caller, values in self._taken.items():
                self._kept.setdefault(caller, values)
        self._taken.clear()
        self._call_context = CallContext()

    def configure_fit(self, weights: Mapping[str, torch.Tensor] | None, config: Mapping[str, Any]) -> None:
        """Load the round's global server weights (if given) and reset the optimizer. ``config``
        is the round's train config, with the round number under ``ConfigKey.SERVER_ROUND``."""
        if weights is not None:
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        lr = float(config.get(ConfigKey.LR, 0.01))
        self.optimizer = self._build_optimizer(lr)
        self.model.train()
        self.memory = MemoryTally()
        self.memory.observe_state([self.model], self.optimizer)
        self._kept.clear()  # a client that died between two calls left something
        self._num_examples = 0
        self._loss_sum = 0.0
        self._draws = _seeded_rng_states(self.device, _round_seed(config))

    @property
    def num_examples(self) -> int:
        """Examples trained on since the round began."""
        return self._num_examples

    def _build_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return self.optimizer_factory(params, lr) if params else None

    def get_fit_result(self) -> FitResult:
        """Weights (detached CPU copies), examples trained on, and mean training loss."""
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        metrics: dict[str, float] = {}
        if self._num_examples:
            metrics["server_train_loss"] = self._loss_sum / self._num_examples
        return FitResult(weights, self._num_examples, metrics)

    def step(self, loss: torch.Tensor, *, num_examples: int, grad: torch.Tensor | None = None) -> None:
        """Backpropagate ``loss`` (or an output with its ``grad``, e.g. one a client sent
        back), step the optimizer and count ``num_examples``; a scalar loss is averaged
        into the round's ``server_train_loss``."""
        if grad is not None and grad.shape != loss.shape:
            raise InvalidArgumentsError(
                f"grad must have the shape of the output it backpropagates, {list(loss.shape)}; "
                f"got {list(grad.shape)}: send the gradient of the tensor this client received"
            )
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        loss.backward(grad)
        self.before_optimizer_step()
        if self.optimizer is not None:
            self.optimizer.step()
        self.memory.observe_state([self.model], self.optimizer)
        self._num_examples += num_examples
        if grad is None:
            self._loss_sum += float(loss.detach()) * num_examples

    def before_optimizer_step(self) -> None:
        """Called by :meth:`step` once the gradients are in ``.grad``, before the optimizer
        steps: override to clip or inspect them (the default does nothing; like every
        method defined here, it is not callable remotely).

        Example
        -------
        >>> class ClippedServer(ServerModel):
        ...     def before_optimizer_step(self) -> None:
        ...         torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0)
        """


_RngStates = tuple[torch.Tensor, torch.Tensor | None]  # the CPU generator's state, the CUDA device's
_GLOBAL_RNG_LENT = threading.Lock()  # held by the call whose model's stream the global RNG holds
_unseeded_warned: set[str] = set()


def _warn_once_unseeded(log_prefix: str) -> None:
    """Two calls overlap (server models on compute threads of their own): they share the one
    process-wide RNG, so the draws of neither repeat."""
    if log_prefix not in _unseeded_warned:
        _unseeded_warned.add(log_prefix)
        logger.warning(
            "%s a call ran while another server model's call held the global RNG (compute threads of their own); "
            "overlapping calls share it, so their draws do not repeat with the seed",
            log_prefix,
        )


def _round_seed(config: Mapping[str, Any]) -> int:
    """A server model's seed for a round: from the run's seed, the round and the model's index
    (hashed, so that it draws no stream a client's batch order draws)."""
    key = [config.get(k, 0) for k in (ConfigKey.SEED, ConfigKey.SERVER_ROUND, ConfigKey.SERVER_MODEL_INDEX)]
    return int.from_bytes(hashlib.blake2b(f"server-model {key}".encode(), digest_size=7).digest(), "little")


def _seeded_rng_states(device: torch.device, seed: int) -> _RngStates:
    cuda = torch.Generator(device).manual_seed(seed).get_state() if device.type == "cuda" else None
    return torch.Generator().manual_seed(seed).get_state(), cuda


def _rng_states(device: torch.device) -> _RngStates:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_states(device: torch.device, states: _RngStates) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


_SERVER_MODEL_ATTRIBUTES: Final = frozenset(
    {"device", "model", "optimizer_factory", "loss_fn", "optimizer", "memory", "log_prefix", "options"}
)
"""The public attributes :meth:`ServerModel.__init__` sets: a method of one of these names would be hidden."""


def _inherited_specs(cls: type, name: str) -> dict[str, TensorSpec]:
    """The specs of the nearest definition of ``name`` declared with @remote: an override
    without its own @remote keeps the checks of the method it overrides."""
    for base in cls.__mro__:
        if name in vars(base):
            specs = getattr(getattr(base, name), _SPECS_ATTRIBUTE, None)
            if specs is not None:
                return dict(specs)
    return {}


def _describe(cls: type) -> dict[str, _RemoteMethod]:
    framework = set(dir(ServerModel))
    methods: dict[str, _RemoteMethod] = {}
    for name, member in inspect.getmembers(cls, inspect.isfunction):
        if name.startswith("_") or name in framework or _is_local(cls, name):
            continue
        if name in PROXY_ATTRIBUTES:
            raise AlgorithmError(
                f"{cls.__name__}.{name}: the client's proxy has an attribute of that name, so proxy.{name} "
                f"could not reach this method; rename it (names the proxy keeps: {sorted(PROXY_ATTRIBUTES)})"
            )
        params = list(inspect.signature(member).parameters.values())
        if not isinstance(inspect.getattr_static(cls, name), staticmethod):
            params = params[1:]  # self
        bad = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]
        if bad:
            raise AlgorithmError(f"{cls.__name__}.{name}: remote methods take keyword tensors; {bad} cannot be passed")
        reserved = _RESERVED_ARGUMENTS & {p.name for p in params}
        if reserved:
            raise AlgorithmError(
                f"{cls.__name__}.{name}: argument name(s) {sorted(reserved)} are reserved by the proxy; rename them"
            )
        names = tuple(p.name for p in params if p.kind is not p.VAR_KEYWORD)
        required = frozenset(p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        specs = getattr(member, _SPECS_ATTRIBUTE, None)
        if specs is None:  # inherited checks of arguments the override no longer takes do not apply
            specs = {a: s for a, s in _inherited_specs(cls, name).items() if a in names or takes_any}
        for argument, spec in specs.items():
            if isinstance(spec.high, str) and not hasattr(cls, spec.high):
                raise AlgorithmError(
                    f"{cls.__name__}.{name}: argument {argument!r} is bounded by {spec.high!r}, which {cls.__name__} "
                    f"does not have; declare it on the class (e.g. {spec.high}: int | None = None) or fix the name"
                )
        unknown = sorted(set(specs) - set(names))
        if unknown and not takes_any:
            raise AlgorithmError(
                f"{cls.__name__}.{name}: @remote declares {unknown}, which {name}() does not take "
                f"(its arguments: {list(names)}); a misspelt name would leave its argument unchecked"
            )
        value_specs = tuple((argument, spec) for argument, spec in specs.items() if spec.checks_values)
        methods[name] = _RemoteMethod(name, names, required, specs, value_specs)
    return methods


_CACHE: weakref.WeakKeyDictionary[type, dict[str, _RemoteMethod]] = weakref.WeakKeyDictionary()


def remote_methods(cls: type[ServerModel]) -> dict[str, _RemoteMethod]:
    """The remotely callable methods of a ServerModel class, by name."""
    if cls not in _CACHE:
        _CACHE[cls] = _describe(cls)
    return _CACHE[cls]


_VALID_CALLS: dict[tuple[Any, ...], bool] = {}


def resolve_call(model: ServerModel, method: str, tensors: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """Check ``method`` and its arguments against ``model``; return the bound method.

    A call with the same class, method, names, dtypes and shapes as one already accepted
    is accepted without checking again (batch after batch repeats them).
    """
    key = (type(model), method, *((k, v.dtype, v.shape) for k, v in tensors.items()))
    if key in _VALID_CALLS:
        bound: Callable[..., Any] = getattr(model, method)
        return bound
    methods = remote_methods(type(model))
    target = methods.get(method)
    if target is None:
        exists = inspect.getattr_static(model, method, None) is not None  # never runs a property's getter
        why = "is private, local, part of the framework or not a method" if exists else "does not exist"
        available = ", ".join(sorted(methods)) or "none"
        raise UnknownMethodError(
            f"{type(model).__name__}.{method} {why} and cannot be called remotely; "
            f"remotely callable methods: {available}"
        )
    given = set(tensors)
    missing = target.required - given
    unexpected = given - set(target.parameters)
    if missing or unexpected:
        raise InvalidArgumentsError(
            f"the method takes ({', '.join(target.parameters)}); "
            f"missing {sorted(missing) or 'nothing'}, unexpected {sorted(unexpected) or 'nothing'}"
        )
    sizes: dict[str, int] = {}
    for name, spec in target.specs.items():
        if name in tensors:
            spec.check(name, tensors[name], sizes)
    if len(_VALID_CALLS) > 4096:
        _VALID_CALLS.clear()
    _VALID_CALLS[key] = True
    return getattr(model, method)  # type: ignore[no-any-return]


def check_values(model: ServerModel, method: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Check the values of a resolved call's tensors against its specs (see :class:`TensorSpec`).

    Runs torch operations, so schedulers call it on their compute thread.
    """
    for name, spec in remote_methods(type(model))[method].value_specs:
        if name in tensors:
            spec.check_values(name, tensors[name], model)
