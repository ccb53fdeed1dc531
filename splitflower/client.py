"""The client side of a split model: :class:`Client`."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from typing import Any, ClassVar, Final

import torch
from torch import nn

from splitflower._checks import all_finite, refuse_options_the_base_cannot_read, refuse_shadowed_methods
from splitflower.data import ArrayDataset
from splitflower.errors import AlgorithmError, ConfigError, DivergedError
from splitflower.metering import MemoryTally
from splitflower.proxy import ProxyFuture, ServerModelProxy
from splitflower.server_model import FitResult, OptimizerFactory, sgd
from splitflower.split import cut_shape
from splitflower.wire import ConfigKey

__all__ = ["Client", "EvaluateResult"]

logger = logging.getLogger(__name__)

EvaluateResult = tuple[float, int, dict[str, float]]


_CLIENT_ATTRIBUTES: Final = frozenset(
    {
        "device",
        "model",
        "train_data",
        "test_data",
        "optimizer_factory",
        "loss_fn",
        "optimizer",
        "memory",
        "log_prefix",
        "client_id",
        "config",
        "options",
        "handed_optimizer_state",
        "server_model_proxy",
    }
)
"""The public attributes :meth:`Client.__init__` and the Flower app set: they would hide a method of the same name."""


class Client:
    """A client: its model segment, its private data, and one hook per training step.

    The base class owns the round: it loads the round's weights into ``self.model``
    (a ``ModuleDict`` holding ``"segment"`` and any module an algorithm adds, e.g. an
    auxiliary head), builds the optimizer over their trainable parameters (none: no
    optimizer, e.g. a frozen segment), iterates the local epochs and batches, settles
    batches :meth:`step` still holds, measures memory and time, drains outstanding
    fire-and-forget calls, and returns the weights. An algorithm overrides :meth:`train_step` (and
    :meth:`evaluate` if it evaluates differently), offloading work with
    ``self.server_model_proxy.<method>(**tensors)`` and updating its weights with
    :meth:`step`.

    The client takes the segment it is given, as a torch optimizer takes parameters: it
    trains that module in place (a frozen-segment algorithm freezes it). Pass a copy to
    keep yours.

    Example
    -------
    >>> class ConventionalClient(Client):
    ...     def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    ...         z = self.segment(x)
    ...         self.step(z, self.server_model_proxy.forward_backward(embeddings=z, labels=y))
    ...         return {}
    """

    server_model_proxy: ServerModelProxy
    Options: ClassVar[type | None] = None
    """The algorithm's options dataclass; ``self.options`` holds an instance (defaults if not given)."""
    max_in_flight: int = 8
    """How many fire-and-forget (``.send``) calls may be unacknowledged at once."""
    sync_every: int = 1
    """Rounds between adopting the strategy's weights. 1: every round. k > 1: rounds 1,
    k+1, 2k+1, ... start from the strategy's (e.g. averaged) weights, the others from the
    weights this client ended its previous round with (kept in Flower's context by
    :meth:`local_state`). 0: only the first round."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        refuse_shadowed_methods(cls, _CLIENT_ATTRIBUTES, "Client")
        refuse_options_the_base_cannot_read(cls)

    def __init__(
        self,
        segment: nn.Module,
        train_data: ArrayDataset,
        test_data: ArrayDataset | None = None,
        *,
        optimizer: OptimizerFactory | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        client_id: int | str | None = None,
        options: Any = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = nn.ModuleDict({"segment": segment}).to(self.device)
        self.train_data = train_data
        self.test_data = test_data
        self.optimizer_factory = optimizer or sgd()
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.optimizer: torch.optim.Optimizer | None = None  # built by fit() for the round's lr
        self.memory = MemoryTally()
        if client_id is not None and (isinstance(client_id, bool) or not isinstance(client_id, Integral | str)):
            raise AlgorithmError(f"client_id must be an int, a str or None, got {client_id!r}")
        self.client_id = int(client_id) if isinstance(client_id, Integral) else client_id
        """Which client this is (e.g. its data partition), reported with each reply: the
        strategy stops a run in which two nodes report the same id (see
        :meth:`~splitflower.strategy.SplitStrategy.start`). None: not reported."""
        self.log_prefix = "[client]" if client_id is None else f"[client {client_id}]"
        self.config: Mapping[str, Any] = {}
        self.options: Any = options if options is not None else (self.Options() if self.Options else None)
        self._pending: list[tuple[Any, ProxyFuture]] = []
        self._own_weights: Mapping[str, torch.Tensor] = {}
        self.handed_optimizer_state: Mapping[str, torch.Tensor] = {}
        """Optimizer state another client handed on (see :meth:`optimizer_state`); ``fit``
        continues from it. Set by the framework when the strategy hands optimizers on."""

    @property
    def segment(self) -> nn.Module:
        """The client's part of the split network."""
        return self.model["segment"]

    @functools.cached_property
    def cut_shape(self) -> torch.Size:
        """The shape of one example's cut activations: what the segment outputs for one input
        of ``train_data`` (found by running it once on zeros; see :func:`~splitflower.split.cut_shape`)."""
        return cut_shape(self.segment, self.train_data.input_shape)

    def add_part(self, name: str, module: nn.Module) -> nn.Module:
        """Add ``module`` (an auxiliary head, a decoder, a tail) to ``self.model`` on the
        client's device and return it: the round's optimizer trains it, and it travels with
        the segment, so the strategy averages it and hands it on too.

        Example
        -------
        >>> from splitflower.data import synthetic
        >>> client = Client(nn.Flatten(), synthetic(8, 8, num_classes=3, input_shape=(1, 4, 4))[0])
        >>> head = client.add_part("aux_head", nn.Linear(client.cut_shape.numel(), 3))
        >>> sorted(client.model), tuple(client.cut_shape)
        (['aux_head', 'segment'], (16,))
        """
        if name in self.model:
            raise ConfigError(f"{type(self).__name__} already has a part named {name!r}; choose another name")
        self.model[name] = module.to(self.device)
        return module

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Mapping[str, float] | None:
        """Train on one batch; return metrics to average (e.g. ``{"aux_loss": ...}``), or None."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_step(x, y)")

    def step(self, output: torch.Tensor | Sequence[torch.Tensor], grad: Any = None, *, window: int = 1) -> None:
        """Backpropagate ``output`` (a loss, or activations with their ``grad``; or lists of
        them, accumulated) and take one optimizer step.

        ``grad`` may be a :class:`~splitflower.proxy.ProxyFuture` (from
        ``proxy.<method>.future(...)``): the step then waits until ``window`` such outputs
        are pending, backpropagates them all with their results and steps once (whatever
        is still pending after the last batch is settled the same way)."""
        if isinstance(grad, ProxyFuture):
            self._pending.append((output, grad))
            if len(self._pending) >= window:
                self._settle()
            return
        outputs, grads = _checked_gradients(output, grad)
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        torch.autograd.backward(outputs, grads)
        self.before_optimizer_step()
        if self.optimizer is not None:
            self.optimizer.step()

    def before_optimizer_step(self) -> None:
        """Called by :meth:`step` once the gradients are in ``.grad``, before the optimizer
        steps: override to clip or inspect them (the default does nothing).

        Example
        -------
        >>> class ClippedClient(Client):
        ...     def before_optimizer_step(self) -> None:
        ...         torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0)
        """

    def _settle(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self.step([output for output, _ in pending], [grad.result() for _, grad in pending])

    def _build_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return self.optimizer_factory(params, lr) if params else None

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The optimizer's per-parameter state (momentum buffers, Adam's moments and step)
        as CPU tensors named ``"<parameter index>.<key>"``; empty without an optimizer."""
        if self.optimizer is None:
            return {}
        return {
            f"{index}.{key}": value.detach().to("cpu", copy=True)
            for index, state in self.optimizer.state_dict()["state"].items()
            for key, value in state.items()
            if isinstance(value, torch.Tensor)
        }

    def load_optimizer_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from :meth:`optimizer_state` of a client with the same segment; the
        hyperparameters (the round's learning rate) stay this optimizer's own."""
        if not state:
            return
        if self.optimizer is None:
            raise ConfigError(f"{self.log_prefix} was handed optimizer state but has no trainable parameters")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in state.items():
            index, _, key = name.partition(".")
            if not index.isdigit() or not key or int(index) >= len(params):
                raise ConfigError(
                    f"optimizer state entry {name!r}: expected '<parameter index>.<key>' with an index "
                    f"below {len(params)} (this optimizer's parameters); was it handed on from another model?"
                )
            shape = params[int(index)].shape
            if value.dim() and value.shape != shape:
                raise ConfigError(
                    f"optimizer state entry {name!r} has shape {list(value.shape)}, its parameter {list(shape)}"
                )
            # A copy: the optimizer updates its state in place, and ``state`` may be read-only.
            per_param.setdefault(int(index), {})[key] = value.to(self.device, copy=True)
        own = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": per_param, "param_groups": own["param_groups"]})

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load the round's weights; an empty mapping keeps the current ones."""
        if weights:
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})

    def weights(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of every weight in ``self.model``."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def local_state(self) -> dict[str, torch.Tensor]:
        """State that stays on this client between rounds: its weights when :attr:`sync_every`
        is not 1. Flower's context keeps it; it also goes with the client's reply, so that the
        strategy keeps it for a model file and a resumed run gives it back (through
        :meth:`load_local_state`). An override should extend ``super()``'s."""
        return {} if self.sync_every == 1 else self.weights()

    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`local_state` returned in an earlier round."""
        self._own_weights = state

    def round_weights(self, weights: Mapping[str, torch.Tensor], server_round: int) -> Mapping[str, torch.Tensor]:
        """The weights round ``server_round`` starts from (see :attr:`sync_every`)."""
        synced = self.sync_every > 0 and (server_round - 1) % self.sync_every == 0
        return weights if synced or self.sync_every == 1 or not self._own_weights else self._own_weights

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        """Train for ``local-epochs`` epochs; return weights, examples and metrics."""
        epochs, batch_size = (
            _positive_int(config, ConfigKey.LOCAL_EPOCHS, 1),
            _positive_int(config, ConfigKey.BATCH_SIZE, 32),
        )
        lr = float(config.get(ConfigKey.LR, 0.01))
        self.config = config
        self.load_weights(self.round_weights(weights, int(config.get(ConfigKey.SERVER_ROUND, 1))))
        self.optimizer = self._build_optimizer(lr)
        self.load_optimizer_state(self.handed_optimizer_state)
        self.model.train()
        generator = self.batch_generator(config)
        sums: dict[str, float] = {}
        examples = 0
        started = time.perf_counter()
        for _ in range(epochs):
            for x, y in self.train_data.batches(batch_size, shuffle=True, generator=generator):
                x, y = x.to(self.device), y.to(self.device)
                with self.memory.track():
                    step_metrics = _step_metrics(type(self), self.train_step(x, y))
                self.memory.observe_state(self.model.values(), self.optimizer)
                for name, value in step_metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * len(y)
                examples += len(y)
        with self.memory.track():
            self._settle()
        self.server_model_proxy.wait_all()
        metrics = {name: total / max(examples, 1) for name, total in sums.items()}
        metrics["client_wall_s"] = time.perf_counter() - started
        logger.debug("%s trained on %d examples", self.log_prefix, examples)
        return FitResult(self.weights(), examples, metrics)

    @staticmethod
    def batch_generator(config: Mapping[str, Any]) -> torch.Generator:
        """The generator that orders the round's batches, from the run seed, round and client."""
        seed = int(config.get(ConfigKey.SEED, 0)) * 1_000_003 + int(config.get(ConfigKey.SERVER_ROUND, 0)) * 1009
        return torch.Generator().manual_seed(seed + int(config.get(ConfigKey.CLIENT_INDEX, 0)))

    @torch.no_grad()
    def evaluate(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> EvaluateResult:
        """Loss, examples and accuracy on the client's test data, via the server's ``predict``."""
        if self.test_data is None:
            raise ConfigError(f"{self.log_prefix} has no test data to evaluate on; pass test_data")
        self.load_weights(weights)
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for x, y in self.test_data.batches(int(config.get(ConfigKey.BATCH_SIZE, 256)), shuffle=False):
            logits = self.server_model_proxy.predict(embeddings=self.segment(x.to(self.device)))
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"predict must return a tensor of logits, got {type(logits).__name__}")
            loss_sum += float(self.loss_fn(logits, y.to(self.device))) * len(y)
            correct += int((logits.argmax(1).cpu() == y).sum())
        total = len(self.test_data)
        return loss_sum / total, total, {"accuracy": correct / total}


def _positive_int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config {key!r} must be a positive integer, got {value!r}")
    return value


def _step_metrics(cls: type, metrics: Any) -> Mapping[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise AlgorithmError(
            f"{cls.__name__}.train_step must return a mapping of metric names to numbers (or None), "
            f"got {type(metrics).__name__}; e.g. return {{'loss': loss.item()}}"
        )
    return metrics


def _checked_gradients(
    output: torch.Tensor | Sequence[torch.Tensor], grad: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The outputs and their gradients, checked before torch's own errors (or a NaN step) could
    come: a non-scalar output needs a gradient of its shape, and a finite one; a gradient of
    another floating dtype (a server computing in float16, say) is cast to the output's."""
    outputs = [output] if isinstance(output, torch.Tensor) else list(output)
    if grad is None:
        grads: list[Any] = [None] * len(outputs)
    else:
        grads = [grad] if isinstance(grad, torch.Tensor) else list(grad)
    if len(grads) != len(outputs):
        raise AlgorithmError(f"step: {len(outputs)} output(s) but {len(grads)} gradient(s); give one per output")
    for index, (out, out_grad) in enumerate(zip(outputs, grads, strict=True)):
        if out_grad is None:
            if out.numel() != 1:
                raise AlgorithmError(
                    f"step: output {index} has shape {list(out.shape)} but its gradient is None; pass a scalar "
                    "loss, or the activations with the gradient the server returned (a server method that "
                    "returns embeddings.grad must detach its input and call requires_grad_() first)"
                )
            continue
        if not isinstance(out_grad, torch.Tensor) or out_grad.shape != out.shape:
            got = list(out_grad.shape) if isinstance(out_grad, torch.Tensor) else type(out_grad).__name__
            raise AlgorithmError(
                f"step: output {index} has shape {list(out.shape)} but its gradient is {got}; the gradient "
                "must be that of this output (the server's dL/dz for the z this client sent)"
            )
        if out_grad.dtype != out.dtype and out_grad.is_floating_point() and out.is_floating_point():
            grads[index] = out_grad = out_grad.to(out.dtype)  # checked after: a cast may overflow
        if out_grad.is_floating_point() and not all_finite(out_grad):
            raise DivergedError(
                f"step: the gradient of output {index} holds NaN or infinity (in the output's dtype, "
                f"{str(out.dtype).removeprefix('torch.')}); stepping would make the weights NaN. The server's "
                "loss has diverged (lower the learning rate) or its method is wrong"
            )
    return outputs, grads
