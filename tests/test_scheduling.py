"""Gathering requests across clients (batched, or run in the clients' order) never hangs:
unequal batch counts, different methods, dead clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from conftest import connect
from splitflower.errors import (
    AuthenticationError,
    ConfigError,
    InvalidArgumentsError,
    RemoteCallError,
    RemoteComputationError,
    ServerModelTimeoutError,
)
from splitflower.proxy import ServerModelProxy
from splitflower.scheduling import BatchingScheduler, OrderedScheduler
from splitflower.server_model import PerCaller, ServerModel
from splitflower.service import SplitService
from splitflower.strategy import SplitStrategy


class _Crash(BaseException):
    pass


class Counter(ServerModel):
    """Records the batch size of every computation it runs."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())
        self.batches: list[tuple[str, int]] = []

    def double(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(("double", len(x)))
        return 2 * x

    def negate(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(("negate", len(x)))
        return -x

    def crash(self, x: torch.Tensor) -> None:
        raise _Crash("not an Exception")

    def scale(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        self.batches.append(("scale", len(x)))
        return x * factor


def _run_clients(jobs: list[Callable[[], None]], limit: float) -> float:
    errors: list[BaseException] = []

    def guard(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=guard, args=(job,), daemon=True) for job in jobs]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=limit)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    return time.perf_counter() - started


def test_unequal_batch_counts_finish_and_are_batched(service: SplitService) -> None:
    model = Counter()
    scheduler = BatchingScheduler(model, flush_timeout=0.2)
    counts = {0: 2, 1: 5, 2: 9}
    scheduler.set_clients(list(counts))

    def client(i: int) -> Callable[[], None]:
        def run() -> None:
            proxy = connect(service, scheduler, client=i)
            for step in range(counts[i]):
                x = torch.full((4,), float(step))
                torch.testing.assert_close(proxy.double(x=x), 2 * x)
            proxy.close()  # tells the scheduler to stop waiting for this client

        return run

    _run_clients([client(i) for i in counts], limit=30)
    assert sum(size for _, size in model.batches) == 4 * sum(counts.values())
    assert len(model.batches) < sum(counts.values()), "requests of several clients shared a batch"


def test_clients_calling_different_methods_do_not_wait_for_the_timeout(service: SplitService) -> None:
    model = Counter()
    scheduler = BatchingScheduler(model, flush_timeout=10.0)
    scheduler.set_clients(["a", "b"])

    def client(name: str, method: str) -> Callable[[], None]:
        def run() -> None:
            proxy = connect(service, scheduler, client=name)
            for _ in range(3):
                proxy.call(method, x=torch.ones(2))
            proxy.close()

        return run

    elapsed = _run_clients([client("a", "double"), client("b", "negate")], limit=30)
    assert elapsed < 5.0
    assert scheduler.timeout_flushes == 0


@pytest.mark.parametrize("gathering", [BatchingScheduler, OrderedScheduler])
def test_client_that_dies_mid_round_does_not_block_the_others(
    service: SplitService, gathering: type[BatchingScheduler | OrderedScheduler]
) -> None:
    model = Counter()
    scheduler = gathering(model, flush_timeout=0.3)
    scheduler.set_clients(["dead", "alive"])
    dead_token, _ = service.open_session("dead", scheduler)

    def alive() -> None:
        proxy = connect(service, scheduler, client="alive")
        for _ in range(6):
            proxy.double(x=torch.ones(3))
        proxy.close()

    def dead() -> None:
        proxy = ServerModelProxy(service.address, dead_token)
        proxy.double(x=torch.ones(3))
        proxy.double(x=torch.ones(3))
        proxy._channel.close()  # gone without saying goodbye

    elapsed = _run_clients([dead, alive], limit=30)
    assert elapsed < 10
    assert scheduler.timeout_flushes == 1, "once it missed a flush, the dead client is not waited for again"
    service.close_session(dead_token)  # what the strategy does when the client's reply fails


def test_a_client_that_missed_a_flush_is_waited_for_again_once_it_sends(service: SplitService) -> None:
    model = Counter()
    scheduler = BatchingScheduler(model, flush_timeout=0.2)
    scheduler.set_clients(["steady", "stalls"])

    def client(name: str) -> Callable[[], None]:
        def run() -> None:
            proxy = connect(service, scheduler, client=name)
            for step in range(8 if name == "stalls" else 24):  # steady goes on after the stall
                time.sleep(0.6 if name == "stalls" and step == 1 else 0.05)
                proxy.double(x=torch.ones(3))
            proxy.close()

        return run

    _run_clients([client("steady"), client("stalls")], limit=30)
    assert scheduler.timeout_flushes == 1
    whole = [size for _, size in model.batches].count(6)
    assert whole >= 2, f"after the stall, batches held both clients again: {model.batches}"


def test_arguments_that_cannot_be_batched_are_refused_and_the_batch_still_runs(service: SplitService) -> None:
    model = Counter()
    scheduler = BatchingScheduler(model, flush_timeout=0.3)
    scheduler.set_clients(["bad", "good"])
    refusals: list[str] = []

    def bad() -> None:
        proxy = connect(service, scheduler, client="bad")
        for factor in (torch.tensor(2.0), torch.ones(2)):  # no batch dimension; wrong batch size
            try:
                proxy.scale(x=torch.ones(3), factor=factor)
            except InvalidArgumentsError as err:
                refusals.append(str(err))
        torch.testing.assert_close(proxy.scale(x=torch.ones(3), factor=torch.full((3,), 2.0)), torch.full((3,), 2.0))
        proxy.close()

    def good() -> None:
        proxy = connect(service, scheduler, client="good")
        for _ in range(3):
            torch.testing.assert_close(
                proxy.scale(x=torch.ones(2), factor=torch.full((2,), 3.0)), torch.full((2,), 3.0)
            )
        proxy.close()

    _run_clients([bad, good], limit=30)
    assert len(refusals) == 2
    assert all("same leading (batch) dimension" in message and "factor" in message for message in refusals)
    assert sum(size for _, size in model.batches) == 3 + 3 * 2


def test_a_batched_call_that_raises_a_base_exception_still_answers_every_caller() -> None:
    scheduler = BatchingScheduler(Counter(), flush_timeout=5.0)
    scheduler.set_clients(["a", "b"])
    answered: list[str] = []

    def call(client: str) -> None:
        outcome = scheduler.run(client, "crash", {"x": torch.ones(1)})  # the thread that ran it too
        if isinstance(outcome.error, _Crash):
            answered.append(client)

    threads = [threading.Thread(target=call, args=(c,), daemon=True) for c in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(answered) == ["a", "b"], "a caller of the batch hung"


def test_a_batched_request_whose_caller_gave_up_is_left_out_of_the_batch(service: SplitService) -> None:
    model = Counter()
    scheduler = BatchingScheduler(model, flush_timeout=1.0)
    scheduler.set_clients(["impatient", "absent"])
    with pytest.raises(ServerModelTimeoutError):
        connect(service, scheduler, client="impatient").double(x=torch.ones(2), timeout=0.3)
    time.sleep(1.2)  # past the flush timeout
    assert model.batches == [], "the request ran after its caller had given up"


class Stats(ServerModel):
    def own_mean(self, z: torch.Tensor) -> PerCaller:
        return PerCaller(z[rows].mean() for rows in self.call_context.rows)

    def histogram(self, z: torch.Tensor) -> PerCaller:  # as many entries as the batch has rows, not per row
        return PerCaller([torch.arange(float(len(z)))] * len(self.call_context.callers))

    def miscounted(self, z: torch.Tensor) -> PerCaller:
        return PerCaller([z.sum()])


@pytest.mark.parametrize("batching", [True, False])
def test_a_method_returning_per_caller_values_gives_each_caller_its_own(service: SplitService, batching: bool) -> None:
    model = Stats(nn.Identity())
    scheduler = BatchingScheduler(model, flush_timeout=5.0) if batching else model
    if isinstance(scheduler, BatchingScheduler):
        scheduler.set_clients(["one row", "three rows"])
    batches = {"one row": torch.tensor([1.0]), "three rows": torch.tensor([2.0, 3.0, 4.0])}
    total = 4 if batching else None

    def client(name: str) -> Callable[[], None]:
        def run() -> None:
            proxy = connect(service, scheduler, client=name, default_timeout=10)
            z = batches[name]
            torch.testing.assert_close(proxy.own_mean(z=z), z.mean())
            torch.testing.assert_close(proxy.histogram(z=z), torch.arange(float(total or len(z))))
            if batching:
                with pytest.raises(RemoteComputationError, match="PerCaller with 1 items for a call serving 2"):
                    proxy.miscounted(z=z)
            proxy.close()

        return run

    _run_clients([client(name) for name in batches], limit=20)


def test_requests_run_a_client_at_a_time_in_the_clients_order_whatever_order_they_arrive_in(
    service: SplitService,
) -> None:
    model = Counter()
    scheduler = OrderedScheduler(model, flush_timeout=10.0)
    rows = {"a": 1, "b": 2, "c": 3}  # the rows of each client's requests name it in model.batches
    steps = {"a": 3, "b": 3, "c": 2}  # c finishes first: a and b go on taking turns without it
    scheduler.set_clients(list(rows))

    def client(name: str, delay: float) -> Callable[[], None]:
        def run() -> None:
            proxy = connect(service, scheduler, client=name)
            time.sleep(delay)
            for step in range(steps[name]):
                x = torch.full((rows[name],), float(step))
                method = "double" if step % 2 else "negate"  # any method, any shapes, in one turn
                torch.testing.assert_close(proxy.call(method, x=x), 2 * x if step % 2 else -x)
            proxy.close()

        return run

    # c sends first, a last: arrival order is the reverse of the clients' order.
    elapsed = _run_clients([client("a", 0.4), client("b", 0.2), client("c", 0.0)], limit=30)
    order = [size for _, size in model.batches]
    assert order == [1, 2, 3, 1, 2, 3, 1, 2], f"turns in the clients' order, each request alone: {model.batches}"
    assert (scheduler.flushes, scheduler.requests_served, scheduler.timeout_flushes) == (3, 8, 0)
    assert elapsed < 5.0


def test_a_request_that_fails_in_its_turn_leaves_the_others_of_that_turn_answered(service: SplitService) -> None:
    model = Counter()
    scheduler = OrderedScheduler(model, flush_timeout=10.0)
    scheduler.set_clients(["a", "b", "c"])
    failed: list[str] = []

    def client(name: str) -> Callable[[], None]:
        def run() -> None:
            proxy = connect(service, scheduler, client=name)
            if name == "b":
                with pytest.raises(RemoteComputationError):
                    proxy.crash(x=torch.ones(1))
                failed.append(name)
            torch.testing.assert_close(proxy.double(x=torch.ones(2)), torch.full((2,), 2.0))
            proxy.close()

        return run

    _run_clients([client(name) for name in "abc"], limit=30)
    assert failed == ["b"]
    assert len(model.batches) == 3, "a's and c's requests of b's failing turn ran, and b's next one"
    assert (scheduler.flushes, scheduler.requests_served, scheduler.timeout_flushes) == (2, 4, 0)


def test_a_model_serving_one_client_runs_its_requests_at_once_and_gathers_nothing() -> None:
    scheduler = OrderedScheduler(Counter(), flush_timeout=10.0)
    scheduler.set_clients(["only"])
    started = time.perf_counter()
    torch.testing.assert_close(scheduler.run("only", "double", {"x": torch.ones(2)}).value, torch.full((2,), 2.0))
    assert time.perf_counter() - started < 1.0
    assert (scheduler.flushes, scheduler.requests_served) == (0, 0)


class Slow(Counter):
    """Takes a while per request, so that the order callers are answered in shows."""

    def double(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)
        return super().double(x)


def test_each_caller_is_answered_when_its_own_turn_has_run_not_after_the_whole_cycle() -> None:
    scheduler = OrderedScheduler(Slow(), flush_timeout=10.0)
    scheduler.set_clients(["a", "b", "c"])
    answered: list[str] = []

    def call(client: str, delay: float) -> Callable[[], None]:
        def run() -> None:
            time.sleep(delay)
            assert scheduler.run(client, "double", {"x": torch.ones(1)}).error is None
            answered.append(client)

        return run

    # a comes last, so its request completes the cycle: it runs first, and a must not wait for b's and c's.
    _run_clients([call("a", 0.3), call("b", 0.0), call("c", 0.1)], limit=30)
    assert answered == ["a", "b", "c"]


def test_a_request_whose_caller_gave_up_before_its_turn_does_not_run() -> None:
    model = Slow()
    scheduler = OrderedScheduler(model, flush_timeout=10.0)
    scheduler.set_clients(["a", "b", "c"])
    gave_up_at = time.perf_counter() + 0.3  # after a's turn has begun, before c's (each takes 0.2 s)
    outcomes: dict[str, BaseException | None] = {}

    def call(client: str) -> Callable[[], None]:
        def run() -> None:
            wanted = (lambda: time.perf_counter() < gave_up_at) if client == "c" else None
            outcomes[client] = scheduler.run(client, "double", {"x": torch.full((1,), 1.0)}, wanted).error

        return run

    _run_clients([call(client) for client in "abc"], limit=30)
    assert outcomes["a"] is None and outcomes["b"] is None
    assert isinstance(outcomes["c"], ServerModelTimeoutError)
    assert len(model.batches) == 2, "c's request ran although its caller had given up when its turn came"


def test_every_client_s_requests_in_flight_get_a_thread_so_no_cycle_runs_on_the_timeout() -> None:
    service = SplitService(port=0, max_workers=4, sequence_timeout=5.0)
    service.start()
    try:
        scheduler = OrderedScheduler(Counter(), flush_timeout=3.0)
        clients = ["a", "b", "c", "d", "e", "f"]  # more than the service's threads
        scheduler.set_clients(clients)
        service.reserve_workers(len(clients) * 5)  # what the strategy reserves: each client's in flight + 1

        def client(name: str) -> Callable[[], None]:
            def run() -> None:
                proxy = connect(service, scheduler, client=name, max_in_flight=4)
                for _ in range(12):
                    proxy.double.send(x=torch.ones(2))
                proxy.close()

            return run

        elapsed = _run_clients([client(name) for name in clients], limit=60)
    finally:
        service.stop(grace=0)
    assert scheduler.timeout_flushes == 0 and scheduler.requests_served == 72
    assert elapsed < 2.5


@pytest.mark.parametrize("scheduler_class", [BatchingScheduler, OrderedScheduler])
@pytest.mark.parametrize("seconds", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_a_flush_timeout_that_is_not_positive_finite_seconds_is_refused(
    scheduler_class: type[BatchingScheduler | OrderedScheduler], seconds: object
) -> None:
    with pytest.raises(ConfigError, match="flush_timeout must be a positive, finite number of seconds"):
        scheduler_class(Counter(), flush_timeout=seconds)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="flush_timeout"):
        SplitStrategy(flush_timeout=seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheduler_class", [BatchingScheduler, OrderedScheduler])
def test_a_flush_timeout_longer_than_a_thread_can_wait_still_gathers(
    scheduler_class: type[BatchingScheduler | OrderedScheduler],
) -> None:
    scheduler = scheduler_class(Counter(), flush_timeout=1e10)  # past threading.TIMEOUT_MAX
    scheduler.set_clients(["a", "b"])
    outcomes: dict[str, object] = {}

    def call(client: str, delay: float) -> Callable[[], None]:
        def run() -> None:
            time.sleep(delay)
            outcomes[client] = scheduler.run(client, "double", {"x": torch.ones(1)}).error

        return run

    _run_clients([call("a", 0.0), call("b", 0.2)], limit=30)
    assert outcomes == {"a": None, "b": None}


def test_a_gathered_request_of_a_client_whose_token_was_revoked_does_not_run(service: SplitService) -> None:
    model = Counter()
    scheduler = OrderedScheduler(model, flush_timeout=30.0)
    scheduler.set_clients(["late", "on-time"])
    late_token, _ = service.open_session("late", scheduler)
    late = ServerModelProxy(service.address, late_token, max_message_bytes=service.max_message_bytes)
    waiting = late.double.future(x=torch.ones(3))
    time.sleep(0.3)  # queued, waiting for the other client's request
    service.close_session(late_token)  # as a round that timed out does
    on_time = connect(service, scheduler, client="on-time")
    torch.testing.assert_close(on_time.double(x=torch.ones(2)), 2 * torch.ones(2))
    with pytest.raises(RemoteCallError):
        waiting.result(timeout=10)
    assert model.batches == [("double", 2)], "the revoked client's request trained the model"
    with pytest.raises(AuthenticationError):  # its finishing notice too
        late.close()
    on_time.close()
