"""When server-model computations run: at once, in the clients' order, or batched across clients.

A scheduler owns one :class:`~splitflower.server_model.ServerModel`. It checks each
request on the gRPC thread that carries it (so bad requests are refused at once, whatever
is computing) and runs the computation on its compute thread (see
:mod:`splitflower.compute`), where computations run one at a time.

Two schedulers gather the pending requests of the model's active clients (one per client:
a client's requests reach the scheduler one at a time, in its own order) before running
them. The batching scheduler concatenates them along dimension 0, runs the method once,
and splits the results back. The ordered scheduler runs them one after another in the
clients' order, so that a model shared by clients training at once steps in the same
order in every run, not in the order requests happen to arrive.

Both run what they gathered when every active client has a request pending (whatever
method each called), when a client finishing its round makes that so, or when the oldest
pending request has waited ``flush_timeout`` seconds. They therefore cannot wait forever
on a client that is slow, has fewer batches than the others, or has died. A client whose
request a flush on the timeout went without is not waited for again until its next
request comes, so a client that died without a word (a killed process, a lost device)
costs the others one ``flush_timeout``, not one per batch, and a timeout long enough to
keep every gathering whole costs little. A client whose ClientApp failed costs at most the
strategy's pull interval: it ends the client's part as its error reply comes.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from splitflower._checks import checked_seconds
from splitflower.codec import payload_bytes
from splitflower.compute import ComputeThread, shared_compute_thread
from splitflower.errors import AlgorithmError, InvalidArgumentsError, ServerModelTimeoutError
from splitflower.server_model import CallContext, PerCaller, ServerModel, check_values, resolve_call

__all__ = [
    "DEFAULT_FLUSH_TIMEOUT_S",
    "DEFAULT_REQUEST_ORDER",
    "REQUEST_ORDERS",
    "Scheduler",
    "ImmediateScheduler",
    "BatchingScheduler",
    "OrderedScheduler",
    "Outcome",
    "Wanted",
    "checked_flush_timeout",
    "SchedulerFactory",
]

logger = logging.getLogger(__name__)

DEFAULT_FLUSH_TIMEOUT_S = 1.0
"""How long a gathered request (batched, or run in the clients' order) waits at most for the
other clients' (seconds). Long enough that clients training at different speeds still share
every batch (a client that misses a flush is not waited for again till it sends, so a dead
one costs this once)."""

REQUEST_ORDERS: Final = ("clients", "arrival")
"""How requests of clients sharing a server model run when not batched: a request of each in
turn in the clients' order (:class:`OrderedScheduler`), or as they arrive (:class:`ImmediateScheduler`)."""
DEFAULT_REQUEST_ORDER: Final = "clients"

_LONGEST_WAIT_S = 60.0  # a condition wait past threading.TIMEOUT_MAX raises; waits this long at most, then looks again

Wanted = Callable[[], bool] | None
"""Asked when a call's turn comes: False if its caller has given up (see Scheduler.run)."""


@dataclass
class Outcome:
    """A computation's result, or the exception it raised, with its timing."""

    value: Any = None
    error: BaseException | None = None
    compute_s: float = 0.0
    queue_wait_s: float = 0.0


class Scheduler(ABC):
    """Decides when a server model runs the calls routed to it.

    Computations run on ``compute`` (default: the process's shared compute thread, see
    :mod:`splitflower.compute`), one at a time: give models that must overlap (e.g. on
    different GPUs) a :class:`~splitflower.compute.ComputeThread` each.

    A subclass implements :meth:`run`, called on the gRPC thread carrying each decoded
    request; it blocks until the outcome is known and never raises (a failure, a bad
    method name or argument included, is the outcome's ``error``, reported to that caller
    alone). ``still_wanted`` tells whether the caller still waits: ask it just before
    computing, and skip the call if not. :meth:`_run_now` checks and runs one call on the
    compute thread; :meth:`set_clients` and :meth:`client_finished` say who may still call.

    Example
    -------
    >>> from torch import nn
    >>> class Counting(Scheduler):
    ...     calls = 0
    ...     def run(self, client, method, tensors, still_wanted=None):
    ...         self.calls += 1
    ...         return self._run_now(client, method, tensors, still_wanted)
    >>> class Echo(ServerModel):
    ...     def echo(self, x: torch.Tensor) -> torch.Tensor:
    ...         return x
    >>> scheduler = Counting(Echo(nn.Identity()))
    >>> scheduler.run("a", "echo", {"x": torch.ones(1)}).value, scheduler.calls
    (tensor([1.]), 1)
    """

    def __init__(self, model: ServerModel, *, compute: ComputeThread | None = None) -> None:
        self.model = model
        self.compute = compute or shared_compute_thread()

    def set_clients(self, clients: Collection[Hashable]) -> None:  # noqa: B027 - optional hook
        """The clients this model serves in the current round."""

    def client_finished(self, client: Hashable) -> None:  # noqa: B027 - optional hook
        """``client`` will send no more requests this round."""

    @abstractmethod
    def run(
        self, client: Hashable, method: str, tensors: Mapping[str, torch.Tensor], still_wanted: Wanted = None
    ) -> Outcome:
        """Run ``method`` for ``client`` and return its outcome (blocks until done).

        ``still_wanted()`` False when the call's turn comes (its caller's deadline passed
        while it waited) means it does not run: the outcome is a ServerModelTimeoutError.
        """

    def _run_now(
        self, client: Hashable, method: str, tensors: Mapping[str, torch.Tensor], still_wanted: Wanted = None
    ) -> Outcome:
        """Run the call as soon as the compute thread is free."""
        arrived = time.perf_counter()
        try:
            value, seconds = self._invoke(method, tensors, _alone(client, tensors), still_wanted)
            value = _own_value(value)
        except BaseException as err:  # noqa: BLE001 - reported to the caller, server keeps serving
            # A KeyboardInterrupt or SystemExit raised by a method on a serving thread is no signal
            # (signals reach the main thread): it is that caller's error like any other.
            return Outcome(error=err)
        return Outcome(value=value, compute_s=seconds, queue_wait_s=time.perf_counter() - arrived - seconds)

    def _invoke(
        self, method: str, tensors: Mapping[str, torch.Tensor], context: CallContext, still_wanted: Wanted = None
    ) -> tuple[Any, float]:
        """Validate names, dtypes and shapes here, values and the rest on the compute
        thread; returns (value, seconds)."""
        bound = resolve_call(self.model, method, tensors)
        # One compute thread runs one job at a time: that is what serialises a model's work.
        return self.compute.run(self._checked_call, method, bound, tensors, context, still_wanted)

    def _checked_call(
        self,
        method: str,
        bound: Callable[..., Any],
        tensors: Mapping[str, torch.Tensor],
        context: CallContext,
        still_wanted: Wanted = None,
    ) -> tuple[Any, float]:
        if still_wanted is not None and not still_wanted():
            raise _gone()
        check_values(self.model, method, tensors)
        return self._call(bound, tensors, context)

    def _call(
        self, bound: Callable[..., Any], tensors: Mapping[str, torch.Tensor], context: CallContext
    ) -> tuple[Any, float]:
        device = self.model.device
        if device.type != "cpu":
            tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        start = time.perf_counter()
        # The received tensors live while the method runs: count them as in flight.
        error: BaseException | None = None
        try:
            self.model._begin_call(context)
            with self.model.memory.track(holding=payload_bytes(tensors)):
                value = bound(**tensors)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        except BaseException as err:
            error = err
            raise
        finally:
            self.model._end_call(error)
        return value, time.perf_counter() - start


class ImmediateScheduler(Scheduler):
    """Runs each call as soon as the model is free.

    Example
    -------
    >>> class Negate(ServerModel):
    ...     def negate(self, x: torch.Tensor) -> torch.Tensor:
    ...         return -x
    >>> outcome = ImmediateScheduler(Negate(torch.nn.Identity())).run("client-0", "negate", {"x": torch.ones(1)})
    >>> outcome.value, outcome.error
    (tensor([-1.]), None)
    """

    def run(
        self, client: Hashable, method: str, tensors: Mapping[str, torch.Tensor], still_wanted: Wanted = None
    ) -> Outcome:
        return self._run_now(client, method, tensors, still_wanted)


@dataclass(eq=False)  # compared by identity: its tensors have no truth value
class _Slot:
    client: Hashable
    method: str
    bound: Callable[..., Any]  # the model's method, resolved when the request came
    tensors: Mapping[str, torch.Tensor]
    arrived: float
    rows: int
    still_wanted: Wanted = None
    outcome: Outcome | None = None


@dataclass
class _Group:
    deadline: float
    slots: list[_Slot] = field(default_factory=list)
    timed_out: bool = False  # flushed on the flush timeout rather than by every client's request


def checked_flush_timeout(seconds: object) -> float:
    """``seconds`` as a flush timeout, or :class:`ConfigError` unless it is positive and finite."""
    hint = (
        ": a gathered request must run at last (1 s is the default; a deployment whose clients "
        "start seconds apart wants 10 or more)"
    )
    return checked_seconds(seconds, "flush_timeout", hint)


def _signature(method: str, tensors: Mapping[str, torch.Tensor]) -> tuple[Hashable, ...]:
    return (method, *sorted((k, v.dtype, tuple(v.shape[1:])) for k, v in tensors.items()))


class _GatheringScheduler(Scheduler):
    """Gathers a request of each active client, then runs them (see the module docstring)."""

    def __init__(
        self,
        model: ServerModel,
        *,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT_S,
        compute: ComputeThread | None = None,
    ) -> None:
        super().__init__(model, compute=compute)
        self.flush_timeout = checked_flush_timeout(flush_timeout)
        self._cond = threading.Condition()
        self._groups: dict[tuple[Hashable, ...], _Group] = {}
        self._active: set[Hashable] = set()
        self._missed: set[Hashable] = set()  # active, but missed a timed-out flush: not waited for till they send
        self._in_flight: Counter[Hashable] = Counter()  # requests taken into a flush, not yet answered, by client
        self._rank: dict[Hashable, int] = {}
        self.flushes = 0  # gatherings run
        self.timeout_flushes = 0  # of them, by the flush timeout rather than every client's request
        self.requests_served = 0  # client requests they ran

    @abstractmethod
    def _group_of(self, method: str, tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[Hashable, ...], int]:
        """The key of the group a (resolved) request joins, and its rows; raise if it cannot join one."""

    @abstractmethod
    def _run_gathered(self, slots: list[_Slot], started: float) -> None:
        """On the compute thread: run ``slots`` (checked, in the clients' order) and settle each."""

    def set_clients(self, clients: Collection[Hashable]) -> None:
        with self._cond:
            self._active = set(clients)
            self._missed.clear()
            self._rank = {client: rank for rank, client in enumerate(clients)}

    def client_finished(self, client: Hashable) -> None:
        with self._cond:
            self._active.discard(client)
            ready = self._take_if_all_waiting()
        self._run_groups(ready)

    def run(
        self, client: Hashable, method: str, tensors: Mapping[str, torch.Tensor], still_wanted: Wanted = None
    ) -> Outcome:
        try:
            bound = resolve_call(self.model, method, tensors)
            key, rows = self._group_of(method, tensors)
        except Exception as err:  # noqa: BLE001 - a bad request must not poison the others
            return Outcome(error=err)
        slot = _Slot(client, method, bound, tensors, time.perf_counter(), rows, still_wanted)
        with self._cond:
            self._missed.discard(client)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(deadline=slot.arrived + self.flush_timeout)
            group.slots.append(slot)
            ready = self._take_if_all_waiting()
        self._run_groups(ready)
        return self._outcome_of(slot, group, key)

    def _outcome_of(self, slot: _Slot, group: _Group, key: tuple[Hashable, ...]) -> Outcome:
        """Wait for ``slot``'s outcome; run its group on the flush timeout if no one has yet."""
        with self._cond:
            while slot.outcome is None:
                remaining = group.deadline - time.perf_counter()
                if remaining <= 0 and self._groups.get(key) is group:
                    del self._groups[key]
                    group.timed_out = True
                    self._in_flight.update(s.client for s in group.slots)
                    waiting = {s.client for g in (group, *self._groups.values()) for s in g.slots}
                    self._missed |= self._active - waiting - self._in_flight.keys()
                    ready = [group, *self._take_if_all_waiting()]
                    break
                # Once another caller has taken the group, its deadline no longer matters.
                self._cond.wait(min(max(remaining, 0.001), _LONGEST_WAIT_S) if self._groups.get(key) is group else None)
            else:
                return slot.outcome
        self._run_groups(ready)
        with self._cond:
            while slot.outcome is None:
                self._cond.wait()
            return slot.outcome

    def _take_if_all_waiting(self) -> list[_Group]:
        waiting = {s.client for g in self._groups.values() for s in g.slots}
        if not waiting or not self._active - self._missed <= waiting:
            return []
        groups = list(self._groups.values())
        self._groups.clear()
        self._in_flight.update(s.client for g in groups for s in g.slots)
        return groups

    def _run_groups(self, groups: list[_Group]) -> None:
        """Queue ``groups`` on the compute thread; each caller waits for its own outcome (the one
        whose request completed a group is answered with its turn, not after the whole group)."""
        for group in groups:
            # In the strategy's client order, not arrival order, so that the computation repeats.
            slots = sorted(group.slots, key=lambda s: self._rank.get(s.client, len(self._rank)))
            self.compute.submit(self._run_group, slots, time.perf_counter(), group.timed_out)

    def _run_group(self, slots: list[_Slot], started: float, timed_out: bool) -> None:
        """On the compute thread: leave out the callers gone or refused, run the rest."""
        try:
            slots = self._settle_unfit(slots, started)
            if slots:
                self.flushes += 1
                self.timeout_flushes += timed_out
                self.requests_served += len(slots)
                self._run_gathered(slots, started)
        except BaseException as err:  # noqa: BLE001 - reported to every caller still waiting
            self._settle([s for s in slots if s.outcome is None], [], started, err)

    def _settle_unfit(self, slots: list[_Slot], started: float) -> list[_Slot]:
        """Answer the slots whose caller gave up or whose values are refused; return the rest."""
        unfit: dict[int, BaseException] = {}
        for index, slot in enumerate(slots):
            if slot.still_wanted is not None and not slot.still_wanted():
                unfit[index] = _gone()
                continue
            try:
                check_values(self.model, slot.method, slot.tensors)
            except InvalidArgumentsError as err:
                unfit[index] = err
        if unfit:
            self._settle([slots[i] for i in unfit], [Outcome(error=e) for e in unfit.values()], started)
        return [slot for index, slot in enumerate(slots) if index not in unfit]

    def _settle(
        self, slots: list[_Slot], outcomes: list[Outcome], started: float, error: BaseException | None = None
    ) -> None:
        """Give each slot its outcome (``error`` for every slot, if given) and wake its caller."""
        if error is not None:
            outcomes = [Outcome(error=error) for _ in slots]
        with self._cond:
            for slot, outcome in zip(slots, outcomes, strict=True):
                outcome.queue_wait_s = started - slot.arrived
                slot.outcome = outcome
            self._in_flight.subtract(s.client for s in slots)
            self._in_flight = +self._in_flight  # drop the clients with none left
            self._cond.notify_all()


class BatchingScheduler(_GatheringScheduler):
    """Concatenates requests of the active clients into one batch (see the module docstring).

    Example
    -------
    >>> from torch import nn
    >>> class Double(ServerModel):
    ...     def double(self, x: torch.Tensor) -> torch.Tensor:
    ...         return 2 * x
    >>> scheduler = BatchingScheduler(Double(nn.Identity()), flush_timeout=0.01)
    >>> scheduler.set_clients(["a"])
    >>> scheduler.run("a", "double", {"x": torch.ones(2)}).value
    tensor([2., 2.])
    """

    @property
    def batched_requests(self) -> int:
        """Client requests the batched calls served (``requests_served``, the name it had before)."""
        return self.requests_served

    def _group_of(self, method: str, tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[Hashable, ...], int]:
        return _signature(method, tensors), _batch_size(tensors)

    def _run_gathered(self, slots: list[_Slot], started: float) -> None:
        sizes = [s.rows for s in slots]
        merged = {k: torch.cat([s.tensors[k] for s in slots]) for k in slots[0].tensors}
        ends = list(itertools.accumulate(sizes))
        rows = tuple(slice(end - size, end) for size, end in zip(sizes, ends, strict=True))
        context = CallContext(tuple(s.client for s in slots), rows)
        value, seconds = self._call(slots[0].bound, merged, context)  # one method: the group's key has it
        parts = _split_value(value, sizes)
        self._settle(slots, [Outcome(value=p, compute_s=seconds) for p in parts], started)


class OrderedScheduler(_GatheringScheduler):
    """Runs a request of each active client in turn, in the clients' order (see the module
    docstring): a model shared by clients that train at once steps in the same order in every
    run, so the run repeats bit for bit, as long as no turn ran on the flush timeout.

    Each request is computed alone, as it came (any method, any shapes); its caller is
    answered as soon as it has run, while the next client's request runs. A model serving
    one client (or none set) runs its requests at once.

    Example
    -------
    >>> from torch import nn
    >>> class Log(ServerModel):
    ...     def log(self, x: torch.Tensor) -> torch.Tensor:
    ...         return x
    >>> scheduler = OrderedScheduler(Log(nn.Identity()))
    >>> scheduler.set_clients(["a"])
    >>> scheduler.run("a", "log", {"x": torch.ones(2)}).value
    tensor([1., 1.])
    """

    _ONE_GROUP: tuple[Hashable, ...] = ()  # whatever they call, the clients take turns

    def run(
        self, client: Hashable, method: str, tensors: Mapping[str, torch.Tensor], still_wanted: Wanted = None
    ) -> Outcome:
        if len(self._rank) < 2:  # no other client to take turns with: nothing is gathered or counted
            return self._run_now(client, method, tensors, still_wanted)
        return super().run(client, method, tensors, still_wanted)

    def _group_of(self, method: str, tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[Hashable, ...], int]:
        return self._ONE_GROUP, 0  # rows: each request is computed alone

    def _run_gathered(self, slots: list[_Slot], started: float) -> None:
        for index, slot in enumerate(slots):
            turn = time.perf_counter()
            if index and slot.still_wanted is not None and not slot.still_wanted():  # (the first: checked just now)
                self._settle([slot], [Outcome(error=_gone())], turn)
                continue
            try:
                value, seconds = self._call(slot.bound, slot.tensors, _alone(slot.client, slot.tensors))
                outcome = Outcome(value=_own_value(value), compute_s=seconds)
            except BaseException as err:  # noqa: BLE001 - that caller's error; the next ones still run
                outcome = Outcome(error=err)
            self._settle([slot], [outcome], turn)


def _gone() -> ServerModelTimeoutError:
    return ServerModelTimeoutError("the caller's deadline passed while the call waited for its turn; it did not run")


def _batch_size(tensors: Mapping[str, torch.Tensor]) -> int:
    """The rows a request adds to a batch: every argument's leading dimension, all equal."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    sizes = {shape[0] for shape in shapes.values() if shape}
    if len(sizes) > 1 or any(not shape for shape in shapes.values()):
        raise InvalidArgumentsError(
            "a batching strategy concatenates every argument along dimension 0, so all "
            f"arguments need the same leading (batch) dimension; got shapes {shapes}. Give per-call "
            "values one row per example, or use a strategy that runs requests at once"
        )
    return sizes.pop() if sizes else 0


def _split_value(value: Any, sizes: list[int]) -> list[Any]:
    """Split batch-aligned tensors back per request; broadcast anything else."""
    total = sum(sizes)

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        if t.dim() and t.shape[0] == total:
            return list(torch.split(t, sizes))
        return [t] * len(sizes)

    if isinstance(value, PerCaller):
        return _per_caller(value, len(sizes))
    if value is None:
        return [None] * len(sizes)
    if isinstance(value, torch.Tensor):
        return split(value)
    if isinstance(value, Mapping):
        pieces = {k: split(v) for k, v in value.items()}
        return [{k: p[i] for k, p in pieces.items()} for i in range(len(sizes))]
    if isinstance(value, tuple | list):
        columns = [split(v) for v in value]
        return [tuple(c[i] for c in columns) for i in range(len(sizes))]
    raise TypeError(f"cannot split a batched result of type {type(value).__name__}")


def _alone(client: Hashable, tensors: Mapping[str, torch.Tensor]) -> CallContext:
    """The context of a call serving one client: all rows are its own."""
    rows = next((v.shape[0] for v in tensors.values() if v.dim()), 0)
    return CallContext((client,), (slice(0, rows),))


def _own_value(value: Any) -> Any:
    """A call serving one client: the one item of a PerCaller value, or the value itself."""
    if isinstance(value, PerCaller):
        (value,) = _per_caller(value, 1)
    return value


def _per_caller(value: PerCaller, callers: int) -> list[Any]:
    if len(value) != callers:
        raise AlgorithmError(
            f"the method returned PerCaller with {len(value)} items for a call serving {callers} callers; "
            "return one item per caller, in the order of call_context.callers"
        )
    return list(value)


SchedulerFactory = Callable[[ServerModel], Scheduler]
