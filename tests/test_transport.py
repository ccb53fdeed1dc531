"""Every bad input through the real gRPC channel gets a clear error, and the server keeps serving."""

from __future__ import annotations

import inspect
import math
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from conftest import connect, self_signed_certificate
from splitflower import client, codec, server_model
from splitflower.algorithms.csl import CSLServerModel
from splitflower.client import Client
from splitflower.codec import encode_request
from splitflower.compute import ComputeThread
from splitflower.data import synthetic
from splitflower.errors import (
    AuthenticationError,
    ConfigError,
    InvalidArgumentsError,
    MessageTooLargeError,
    RemoteComputationError,
    ServerModelTimeoutError,
    ServerUnavailableError,
    UnknownMethodError,
)
from splitflower.proxy import ServerModelProxy
from splitflower.scheduling import BatchingScheduler, ImmediateScheduler
from splitflower.server_model import FLOATING, ServerModel, TensorSpec, remote, remote_methods
from splitflower.service import ClientSession, SplitService, TlsConfig
from splitflower.wire import (
    ABANDONED_METHOD,
    ERROR_KIND_METADATA_KEY,
    FINISH_METHOD,
    GRPC_CALL_PREFIX,
    MAX_IN_FLIGHT,
    MAX_NOTICES_IN_PROGRESS,
    PROXY_ATTRIBUTES,
    ErrorKind,
    call_path,
)


class Toy(ServerModel):
    """Echo, a batch-checked method, a failing one, a slow one and an order recorder."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())
        self.seen: list[int] = []

    @remote(
        z=TensorSpec(dtypes=FLOATING, shape=("batch", 3)), labels=TensorSpec(dtypes=(torch.int64,), shape=("batch",))
    )
    def score(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return z.sum(1) + labels

    def echo(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def fail(self, x: torch.Tensor, message: torch.Tensor | None = None) -> None:
        raise ValueError("deliberate failure" + "!" * (0 if message is None else int(message)))

    def count(self, x: torch.Tensor) -> dict[str, float]:  # a float inside: no call form can carry it back
        self.seen.append(len(x))
        return {"n": float(len(x))}

    def interrupt(self, x: torch.Tensor) -> None:
        raise KeyboardInterrupt  # not a signal on a serving thread: the caller's error

    def fail_wide(self, x: torch.Tensor) -> None:
        raise ValueError("\u4e2d" * 5000)  # 3 bytes each in UTF-8, 9 once gRPC percent-encodes them

    def slow(self, seconds: torch.Tensor) -> None:
        time.sleep(float(seconds))

    def large(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(3 << 18)  # 3 MiB: a small reply sent after it may arrive first

    def record(self, i: torch.Tensor) -> None:
        self.seen.append(int(i))

    def _secret(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _still_serves(proxy: ServerModelProxy) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(proxy.echo(x=x), x)


def test_blocking_future_and_fire_and_forget(service: SplitService) -> None:
    model = Toy()
    proxy = connect(service, model)
    x = torch.randn(4, 3)
    torch.testing.assert_close(proxy.echo(x=x), x)
    futures = [proxy.echo.future(x=x + i) for i in range(6)]
    for i, future in enumerate(futures):
        torch.testing.assert_close(future.result(), x + i)
    for i in range(20):
        proxy.record.send(i=torch.tensor(i))  # fire-and-forget: returns at once
    proxy.wait_all()
    assert model.seen == list(range(20)), "requests of one client run in the order issued"
    assert proxy.traffic.by_method()["record"]["down_payload_bytes"] == 0
    proxy.close()


def test_unknown_method_lists_what_exists(service: SplitService) -> None:
    proxy = connect(service, Toy())
    with pytest.raises(UnknownMethodError, match=r"nope.*does not exist.*echo"):
        proxy.nope(x=torch.ones(1))
    _still_serves(proxy)


def test_private_and_framework_methods_are_refused(service: SplitService) -> None:
    proxy = connect(service, Toy())
    with pytest.raises(UnknownMethodError, match="private"):
        proxy._secret(x=torch.ones(1))
    with pytest.raises(UnknownMethodError, match="framework"):
        proxy.configure_fit(x=torch.ones(1))
    with pytest.raises(UnknownMethodError):
        proxy.call("_secret", x=torch.ones(1))
    _still_serves(proxy)


def test_local_helpers_are_refused_and_the_model_is_untouched(service: SplitService) -> None:
    model = CSLServerModel(nn.Linear(4, 3))
    model.configure_fit(None, {"lr": 0.5})
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    proxy = connect(service, model)
    with pytest.raises(UnknownMethodError, match="local"):
        proxy.train_on(embeddings=torch.ones(2, 4), labels=torch.zeros(2, dtype=torch.int64))
    torch.testing.assert_close(model.model.state_dict(), before)
    assert model.num_examples == 0
    assert "forward_backward" in remote_methods(CSLServerModel)
    proxy.close()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"z": torch.ones(2, 3)}, r"missing \['labels'\]"),
        ({"z": torch.ones(2, 3), "labels": torch.zeros(2, dtype=torch.int64), "extra": torch.ones(1)}, "unexpected"),
        (
            {"z": torch.ones(2, 3, dtype=torch.int32), "labels": torch.zeros(2, dtype=torch.int64)},
            "expected dtype float32",
        ),
        ({"z": torch.ones(2, 4), "labels": torch.zeros(2, dtype=torch.int64)}, "dimension 1 must be 3, got 4"),
        ({"z": torch.ones(2, 3), "labels": torch.zeros(5, dtype=torch.int64)}, "'batch'"),
        ({"z": torch.ones(2, 3, 1), "labels": torch.zeros(2, dtype=torch.int64)}, r"expected shape \['batch', 3\]"),
    ],
)
def test_bad_arguments_name_expected_and_received(
    service: SplitService, arguments: dict[str, Any], message: str
) -> None:
    proxy = connect(service, Toy())
    with pytest.raises(InvalidArgumentsError, match=message):
        proxy.score(**arguments)
    _still_serves(proxy)


def test_exception_in_method_reaches_caller_with_the_line_that_raised(
    service: SplitService, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = connect(service, Toy())
    line = inspect.getsourcelines(Toy.fail)[1] + 1
    where = rf"\(at {re.escape(Path(__file__).name)}:{line}, in fail\)"
    with pytest.raises(RemoteComputationError, match=rf"^fail: raised ValueError: deliberate failure {where}"):
        proxy.fail(x=torch.ones(1))
    logged = [r for r in caplog.records if r.name == "splitflower.service" and "fail raised" in r.getMessage()]
    assert logged and logged[0].exc_info is not None, "the server logs the traceback"
    _still_serves(proxy)


@pytest.mark.parametrize("batching", [False, True])
def test_a_keyboard_interrupt_raised_by_a_method_is_its_caller_s_error(service: SplitService, batching: bool) -> None:
    model = Toy()
    proxy = connect(service, BatchingScheduler(model, flush_timeout=0.01) if batching else model, default_timeout=10)
    with pytest.raises(RemoteComputationError, match="raised KeyboardInterrupt"):
        proxy.interrupt(x=torch.ones(1))
    _still_serves(proxy)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"x": "abc"}, r"echo: argument 'x' must be a tensor .*got str 'abc'"),
        ({"x": None}, r"echo: argument 'x' must be a tensor .*got NoneType None"),
        ({"x": torch.ones(1), "timeout": "1"}, r"timeout must be a positive number of seconds.*got '1'"),
        ({"x": torch.ones(1), "timeout": 0}, r"timeout must be a positive number of seconds.*got 0"),
        ({"x": torch.ones(1), "timeout": math.nan}, r"timeout must be a positive number of seconds.*got nan"),
    ],
)
def test_arguments_the_proxy_cannot_send_are_refused_before_sending(
    service: SplitService, arguments: dict[str, Any], message: str
) -> None:
    proxy = connect(service, Toy())
    for form in (proxy.echo, proxy.echo.future, proxy.echo.send):
        with pytest.raises(InvalidArgumentsError, match=message):
            form(**arguments)
    assert proxy.traffic.totals()["up_messages"] == 0, "nothing was sent"
    _still_serves(proxy)
    with pytest.raises(ConfigError, match=r"default_timeout must be a positive number of seconds.*got -1"):
        ServerModelProxy(service.address, b"0" * 16, default_timeout=-1)
    torch.testing.assert_close(proxy.echo(x=torch.ones(1), timeout=np.float32(5.0)), torch.ones(1))


def test_a_flipped_numpy_view_is_sent_as_its_values(service: SplitService) -> None:
    flipped = np.arange(4.0)[::-1]  # a negative stride, which torch cannot share
    torch.testing.assert_close(connect(service, Toy()).echo(x=flipped), torch.tensor([3.0, 2.0, 1.0, 0.0]).double())


def test_server_model_methods_the_proxy_could_not_reach_are_refused_when_defined() -> None:
    with pytest.raises(TypeError, match=r"Closing.close: the client's proxy has an attribute of that name"):

        class Closing(ServerModel):
            def close(self, x: torch.Tensor) -> torch.Tensor:
                return x

    with pytest.raises(TypeError, match=r"Typo.echo: @remote declares \['embedings'\], which echo\(\) does not take"):

        class Typo(ServerModel):
            @remote(embedings=TensorSpec(dtypes=FLOATING))
            def echo(self, embeddings: torch.Tensor) -> torch.Tensor:
                return embeddings

    def add_double(cls: type[ServerModel]) -> type[ServerModel]:
        cls.double = lambda self, x: 2 * x  # type: ignore[attr-defined]
        return cls

    @add_double
    class Decorated(ServerModel):
        pass

    assert "double" in remote_methods(Decorated), "a method a class decorator adds is callable"

    proxy = ServerModelProxy("127.0.0.1:1", b"0" * 16)
    proxy_names = {name for name in dir(ServerModelProxy) if not name.startswith("_")}
    proxy_names |= {name for name in vars(proxy) if not name.startswith("_")}
    with pytest.raises(ServerUnavailableError):  # nothing listens there; the channel is closed all the same
        proxy.close(timeout=0.1)
    assert proxy_names == PROXY_ATTRIBUTES, "wire.PROXY_ATTRIBUTES must list the proxy's public attributes"


@pytest.mark.parametrize(("base", "name"), [(ServerModel, "loss_fn"), (ServerModel, "model"), (Client, "loss_fn")])
def test_a_method_the_base_class_would_hide_behind_an_attribute_is_refused_when_defined(base: type, name: str) -> None:
    hint = "pass loss_fn=" if name == "loss_fn" else "rename it"
    with pytest.raises(TypeError, match=rf"Custom.{name}: {base.__name__}.__init__ sets self.{name}.*{hint}"):
        type("Custom", (base,), {name: lambda self, logits, labels: logits})
    with pytest.raises(TypeError, match=rf"Custom.{name}: {base.__name__}.__init__ sets self.{name}"):
        type("Custom", (base,), {name: staticmethod(lambda logits, labels: logits)})
    instance = ServerModel(nn.Identity()) if base is ServerModel else Client(nn.Identity(), synthetic(4, 4)[0])
    public = {key for key in vars(instance) if not key.startswith("_")}
    listed = server_model._SERVER_MODEL_ATTRIBUTES if base is ServerModel else client._CLIENT_ATTRIBUTES
    assert public <= listed, f"every attribute {base.__name__}.__init__ sets must be listed: {public - listed}"


def _raw(
    service: SplitService, token: bytes, frame: bytes, timeout: float = 5, *, notice: bool = False
) -> bytes | grpc.RpcError:
    """Send a hand-made frame with ``token``; the reply frame, or the error gRPC raised."""
    with grpc.insecure_channel(service.address) as channel:
        try:
            reply: bytes = channel.unary_unary(call_path(token, notice=notice))(frame, timeout=timeout)
        except grpc.RpcError as err:
            return err
    return reply


def _raw_call(service: SplitService, token: bytes, frame: bytes) -> grpc.RpcError:
    result = _raw(service, token, frame)
    assert isinstance(result, grpc.RpcError), "the frame was accepted"
    return result


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "bad-dtype"])
def test_corrupt_bytes_are_rejected(service: SplitService, corruption: str) -> None:
    proxy = connect(service, Toy())
    token, _ = service.open_session("corrupting", ImmediateScheduler(Toy()))
    frame = encode_request(0, "echo", {"x": torch.ones(8)})
    bad = {
        "garbage": b"\x00\x01not a frame at all",
        "truncated": frame[:-5],
        "bad-dtype": frame.replace(b"x\x01\x01", b"x\x63\x01", 1),
    }[corruption]
    error = _raw_call(service, token, bad)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "corrupt request" in (error.details() or "")
    assert dict(error.trailing_metadata() or ())[ERROR_KIND_METADATA_KEY] == ErrorKind.CORRUPT
    _still_serves(proxy)


# One float32 tensor "x" of 65 dimensions of size 1 (with its 4 bytes of data and padding),
# and one of shape [0, 2**32 - 1, 2**32 - 1] (no data, but strides that overflow int64).
_BAD_SHAPES = {
    "65-dimensions": (b"\x01\x01x\x01\x41" + b"\x01\x00\x00\x00" * 65, b"\0" * 8, "65 dimensions, at most 64"),
    "stride-overflow": (b"\x01\x01x\x01\x03" + b"\x00" * 4 + b"\xff" * 8, b"", "too large to index"),
}


def _frame(table: bytes, data: bytes = b"", method: bytes = b"echo") -> bytes:
    """A request frame built by hand (the codec refuses to encode a bad one): header, method, table, data."""
    head = codec._REQUEST_HEAD.pack(codec._MAGIC, codec._VERSION, codec._KIND_REQUEST, 0, 0, 0, len(table))
    body = head + bytes([len(method)]) + method + table
    return body + b"\0" * codec._pad(len(body)) + data


@pytest.mark.parametrize("case", list(_BAD_SHAPES))
def test_corrupt_shapes_get_a_clear_error(service: SplitService, case: str) -> None:
    token, _ = service.open_session("corrupting", ImmediateScheduler(Toy()))
    table, data, message = _BAD_SHAPES[case]
    error = _raw_call(service, token, _frame(table, data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or ""), error.details()
    assert dict(error.trailing_metadata() or ())[ERROR_KIND_METADATA_KEY] == ErrorKind.CORRUPT
    _still_serves(connect(service, Toy()))


def test_a_stranger_s_frame_is_refused_before_it_is_parsed(service: SplitService) -> None:
    unknown_dtype = b"\x01\x01x\x63\x00"  # would be refused as corrupt, had it been parsed
    error = _raw_call(service, b"\0" * 16, _frame(unknown_dtype))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_request_number_sent_twice_or_far_ahead_is_refused(service: SplitService) -> None:
    token, _ = service.open_session("replaying", ImmediateScheduler(Toy()))
    slow = encode_request(0, "slow", {"seconds": torch.tensor(0.5)})
    first = ThreadPoolExecutor(1).submit(_raw, service, token, slow)
    time.sleep(0.2)
    assert "already being served" in (_raw_call(service, token, slow).details() or "")
    assert isinstance(first.result(), bytes), "the first copy still ran"
    ahead = _raw_call(service, token, encode_request(5000, "echo", {"x": torch.ones(1)}, settled_below=1))
    assert ahead.code() == grpc.StatusCode.INVALID_ARGUMENT and "the next expected is 1" in (ahead.details() or "")


def test_revoking_a_token_ends_the_waits_of_its_requests(service: SplitService) -> None:
    token, _ = service.open_session("revoked", ImmediateScheduler(Toy()))
    waiting = ThreadPoolExecutor(1).submit(
        _raw, service, token, encode_request(3, "echo", {"x": torch.ones(1)}, settled_below=0), 30
    )
    time.sleep(0.2)
    started = time.perf_counter()
    service.close_session(token)
    error = waiting.result(timeout=5)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.perf_counter() - started < 2


def test_calls_after_the_client_finished_are_refused(service: SplitService) -> None:
    model = Toy()
    token, _ = service.open_session("finished", ImmediateScheduler(model))
    assert isinstance(_raw(service, token, encode_request(0, FINISH_METHOD, {})), bytes)
    error = _raw_call(service, token, _record_frame(1, 0))
    assert "already finished its round" in (error.details() or "")
    assert model.seen == []


def test_a_long_error_message_arrives_shortened(service: SplitService) -> None:
    proxy = connect(service, Toy())
    with pytest.raises(RemoteComputationError, match=r"more bytes\)$"):
        proxy.fail(x=torch.ones(1), message=torch.tensor(20_000))
    with pytest.raises(RemoteComputationError, match=r"\u4e2d+\.\.\. \(\d+ more bytes\)$"):
        proxy.fail_wide(x=torch.ones(1))
    _still_serves(proxy)


def test_a_client_with_the_largest_in_flight_window_is_served(service: SplitService) -> None:
    model = Toy()
    proxy = connect(service, model, max_in_flight=MAX_IN_FLIGHT)
    for i in range(2 * MAX_IN_FLIGHT):
        proxy.slow.send(seconds=torch.tensor(0.01))
        proxy.record.send(i=torch.tensor(i))
    proxy.wait_all()
    assert model.seen == list(range(2 * MAX_IN_FLIGHT))
    with pytest.raises(ConfigError, match=f"1 to {MAX_IN_FLIGHT}"):
        connect(service, model, max_in_flight=MAX_IN_FLIGHT + 1)


class _SchedulerWithoutStillWanted(ImmediateScheduler):
    """A scheduler written against the three-argument run of earlier versions."""

    def run(self, client: object, method: str, tensors: Any) -> Any:  # type: ignore[override]
        return super().run(client, method, tensors)


def test_a_scheduler_whose_run_takes_no_still_wanted_still_serves(service: SplitService) -> None:
    _still_serves(connect(service, _SchedulerWithoutStillWanted(Toy())))


class Members(ServerModel):
    """A static method (callable remotely) and a property (not; its getter must not run)."""

    getter_runs = 0

    @staticmethod
    def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y

    @property
    def weights_sum(self) -> torch.Tensor:
        Members.getter_runs += 1
        return torch.zeros(())


def test_static_methods_are_callable_and_properties_are_not_run(service: SplitService) -> None:
    proxy = connect(service, Members(nn.Identity()))
    torch.testing.assert_close(proxy.add(x=torch.ones(2), y=torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(UnknownMethodError, match="not a method"):
        proxy.weights_sum()
    assert Members.getter_runs == 0
    proxy.close()


def test_missing_wrong_and_expired_tokens(service: SplitService) -> None:
    model = Toy()
    good = connect(service, model)
    for token in (b"\0" * 16, b"not-the-token-xx"):
        with pytest.raises(AuthenticationError, match="token not issued"):
            ServerModelProxy(service.address, token).echo(x=torch.ones(1))
    token, _ = service.open_session("late", ImmediateScheduler(model))
    service.close_session(token)
    with pytest.raises(AuthenticationError):
        ServerModelProxy(service.address, token).echo(x=torch.ones(1))
    for malformed, got in ((b"short", "5 bytes"), ("0" * 16, "str")):
        with pytest.raises(ConfigError, match=f"a token is 16 bytes .*sf-token.*, got {got}"):
            ServerModelProxy(service.address, malformed)  # type: ignore[arg-type]
    _still_serves(good)


def test_message_size_limit_on_both_ends(service: SplitService) -> None:
    proxy = connect(service, Toy())
    too_big = torch.ones(2 * 1024 * 1024)  # 8 MiB against a 4 MiB service limit
    with pytest.raises(MessageTooLargeError, match="over the limit of 4194304"):
        proxy.echo(x=too_big)
    unaware = connect(service, Toy(), client="unaware", max_message_bytes=64 * 1024 * 1024)
    with pytest.raises(MessageTooLargeError, match="size limit"):
        unaware.echo(x=too_big)
    _still_serves(proxy)
    _still_serves(unaware)


def test_timeout_fires_and_server_keeps_serving(service: SplitService) -> None:
    slow = connect(service, Toy(), client="slow")
    started = time.perf_counter()
    with pytest.raises(ServerModelTimeoutError, match="The server may have run it, or may still run it"):
        slow.slow(seconds=torch.tensor(2.0), timeout=0.3)
    assert time.perf_counter() - started < 1.5
    _still_serves(connect(service, Toy(), client="other"))


def test_a_fire_and_forget_timeout_includes_the_wait_for_room(service: SplitService) -> None:
    proxy = connect(service, Toy(), max_in_flight=1)
    proxy.slow.send(seconds=torch.tensor(1.0))
    started = time.perf_counter()
    proxy.slow.send(seconds=torch.tensor(1.0), timeout=1.2)  # room after 1.0 s, done after 2.0 s
    with pytest.raises(ServerModelTimeoutError):
        proxy.wait_all()
    assert time.perf_counter() - started < 1.8  # (wide: a loaded 2-core machine is slow to wake threads)


@pytest.mark.parametrize("form", ["future", "send"])
def test_timeout_counts_from_the_call_even_when_it_waits_for_room(service: SplitService, form: str) -> None:
    proxy = connect(service, Toy(), client="queued", max_in_flight=1)
    busy = proxy.slow.future(seconds=torch.tensor(1.5)) if form == "future" else None
    if form == "send":
        proxy.slow.send(seconds=torch.tensor(1.5))
    started = time.perf_counter()
    with pytest.raises(ServerModelTimeoutError, match="not sent"):
        if form == "future":
            proxy.echo.future(x=torch.ones(1), timeout=0.3).result()
        else:
            proxy.echo.send(x=torch.ones(1), timeout=0.3)
    assert time.perf_counter() - started < 1.0
    if busy is not None:
        busy.result()
    proxy.wait_all()
    _still_serves(proxy)
    proxy.close()


def test_a_call_whose_caller_gave_up_while_it_waited_does_not_run(service: SplitService) -> None:
    model = Toy()
    scheduler = ImmediateScheduler(model)  # one model: calls of both clients take turns
    busy = ThreadPoolExecutor(1).submit(connect(service, scheduler, client="busy").slow, seconds=torch.tensor(1.0))
    time.sleep(0.2)
    with pytest.raises(ServerModelTimeoutError):
        connect(service, scheduler, client="impatient").record(i=torch.tensor(42), timeout=0.3)
    busy.result()
    time.sleep(0.3)
    assert model.seen == [], "the call ran after its caller had given up"


def test_a_return_value_that_cannot_be_sent_is_an_error_in_every_call_form(service: SplitService) -> None:
    model = Toy()
    proxy = connect(service, model)
    with pytest.raises(RemoteComputationError, match=r"^count: it ran .* but its return value cannot be sent"):
        proxy.count(x=torch.ones(2))
    proxy.count.send(x=torch.ones(3))
    with pytest.raises(RemoteComputationError, match="cannot be sent"):
        proxy.wait_all()
    assert model.seen == [2, 3], "the method ran both times"
    _still_serves(proxy)


def test_models_on_their_own_compute_threads_do_not_wait_for_each_other(service: SplitService) -> None:
    slow = connect(service, ImmediateScheduler(Toy(), compute=ComputeThread()), client="a")
    fast = connect(service, ImmediateScheduler(Toy(), compute=ComputeThread()), client="b")
    worker = threading.Thread(target=lambda: slow.slow(seconds=torch.tensor(1.5)))
    worker.start()
    time.sleep(0.1)
    started = time.perf_counter()
    _still_serves(fast)
    assert time.perf_counter() - started < 0.5
    worker.join()


def test_a_long_computation_does_not_block_the_transport(service: SplitService) -> None:
    """On the shared compute thread computations queue up, but requests are still received,
    checked and answered: a bad one is refused at once, a good one runs when its turn comes."""
    slow, other = connect(service, Toy(), client="a"), connect(service, Toy(), client="b")
    worker = threading.Thread(target=lambda: slow.slow(seconds=torch.tensor(1.5)))
    worker.start()
    time.sleep(0.1)
    started = time.perf_counter()
    with pytest.raises(AuthenticationError):
        ServerModelProxy(service.address, b"\1" * 16).echo(x=torch.ones(1))
    with pytest.raises(InvalidArgumentsError):
        other.echo(y=torch.ones(1))
    assert time.perf_counter() - started < 0.5
    _still_serves(other)
    worker.join()


def test_fire_and_forget_error_surfaces_at_wait_all(service: SplitService) -> None:
    proxy = connect(service, Toy())
    proxy.fail.send(x=torch.ones(1))
    with pytest.raises(RemoteComputationError, match="earlier fire-and-forget"):
        proxy.wait_all()
    _still_serves(proxy)


def test_unreachable_service_is_reported() -> None:
    proxy = ServerModelProxy("127.0.0.1:1", b"\0" * 16, default_timeout=2.0)
    with pytest.raises((ServerUnavailableError, ServerModelTimeoutError), match="echo"):
        proxy.echo(x=torch.ones(1))


def test_results_return_on_callers_device_and_dtypes_roundtrip(service: SplitService) -> None:
    proxy = connect(service, Toy())
    for dtype in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
    ):
        x = (torch.arange(12) % 2).to(dtype).reshape(3, 4)
        back = proxy.echo(x=x.t())  # non-contiguous input
        assert isinstance(back, torch.Tensor) and back.dtype == dtype
        torch.testing.assert_close(back, x.t())
    torch.testing.assert_close(proxy.echo(x=torch.empty(0, 5)), torch.empty(0, 5))


def test_tls_clients_verify_the_server_certificate() -> None:
    pytest.importorskip("cryptography")
    cert, key = self_signed_certificate()
    other_cert, _ = self_signed_certificate()
    service = SplitService(tls=TlsConfig(cert, key, cert))
    service.start()
    try:
        model = Toy()
        token, _ = service.open_session("c", ImmediateScheduler(model))
        proxy = ServerModelProxy(service.address, token, root_certificates=cert)
        _still_serves(proxy)
        for roots in (other_cert, None):
            stranger = ServerModelProxy(service.address, token, root_certificates=roots, default_timeout=3.0)
            with pytest.raises((ServerUnavailableError, ServerModelTimeoutError)):
                stranger.echo(x=torch.ones(1))
        _still_serves(proxy)
    finally:
        service.stop(grace=0)


def _calls_withholding_their_bodies(
    channels: list[grpc.Channel], until: threading.Event, path: str = GRPC_CALL_PREFIX
) -> list[grpc.Future]:
    """A call to ``path`` on each channel that sends its headers and no body until ``until`` is set."""

    def no_body() -> Iterator[bytes]:
        until.wait(60)
        yield from ()

    return [channel.stream_unary(path).future(no_body()) for channel in channels]


def _wait_until_its_share_is_taken(session: ClientSession) -> None:
    deadline = time.monotonic() + 10
    while session.calls_in_progress < session.max_in_progress:
        assert time.monotonic() < deadline, f"{session.calls_in_progress} of {session.max_in_progress} calls came"
        time.sleep(0.05)


def test_a_stranger_is_refused_on_arrival_even_while_every_thread_is_taken() -> None:
    """gRPC waits for a call's body on a service thread, with no time limit; the service finds
    the caller's session from the call's path when its headers arrive, and gRPC refuses a
    path holding no live token there, before giving the call a thread."""
    service = SplitService(max_workers=2)
    service.start()
    try:
        token, _ = service.open_session("withholding", ImmediateScheduler(Toy()))
        withheld = threading.Event()
        with grpc.insecure_channel(service.address) as channel:
            holding = _calls_withholding_their_bodies([channel] * 2, withheld, call_path(token))  # noqa: F841
            strangers = [GRPC_CALL_PREFIX, GRPC_CALL_PREFIX + "Call", call_path(b"\0" * 16)] * 2
            stalls = [_calls_withholding_their_bodies([channel], withheld, path)[0] for path in strangers]
            for stall in stalls:
                with pytest.raises(grpc.RpcError) as refused:
                    stall.result(timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            stranger = ServerModelProxy(service.address, b"\1" * 16, default_timeout=5.0)
            with pytest.raises(AuthenticationError, match="token not issued for the current round"):
                stranger.echo(x=torch.ones(1))
            with pytest.raises(AuthenticationError):
                stranger.close()  # telling the service it is done is refused too; the channel closes
            other = connect(service, Toy(), default_timeout=0.5)
            with pytest.raises(ServerModelTimeoutError):  # the threads were all taken meanwhile
                other.echo(x=torch.ones(1))
            withheld.set()
        other.default_timeout = 5.0
        _still_serves(other)
    finally:
        service.stop(grace=0)


def test_a_client_holds_at_most_its_share_of_the_threads_and_revoking_its_token_frees_them() -> None:
    """A client of the round can hold threads with calls that withhold their bodies or wait for
    an earlier request, but together no more than its share: a call over it is refused unread,
    another client is still served, and closing the client's session ends all of them."""
    service = SplitService(max_workers=2 * (MAX_IN_FLIGHT + 1))
    service.start()
    try:
        token, session = service.open_session("withholding", ImmediateScheduler(Toy()))
        other = connect(service, Toy(), default_timeout=5.0)
        withheld = threading.Event()
        with grpc.insecure_channel(service.address) as channel, ThreadPoolExecutor(2) as background:
            waiting = [background.submit(_raw, service, token, _record_frame(seq, 0), 30) for seq in (1, 2)]
            paths = [call_path(token)] * (session.max_in_progress - len(waiting))
            stalls = _calls_withholding_their_bodies([channel] * len(paths), withheld, paths[0])
            _wait_until_its_share_is_taken(session)
            error = _raw_call(service, token, _record_frame(3, 0))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"refused unread: {session.max_in_progress} of this client's calls" in (error.details() or "")
            _still_serves(other)
            started = time.perf_counter()
            service.close_session(token)
            for stall in stalls:
                with pytest.raises(grpc.RpcError) as ended:
                    stall.result(timeout=5)
                assert ended.value.code() == grpc.StatusCode.CANCELLED
            for request in waiting:
                result = request.result(timeout=5)
                assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.UNAUTHENTICATED
            assert time.perf_counter() - started < 5
            withheld.set()
        _still_serves(other)
    finally:
        service.stop(grace=0)


def test_calls_and_notices_refused_for_room_are_sent_again_until_room_frees_or_their_timeout_passes() -> None:
    """While a client's share of the service's threads is taken, its other calls are refused
    unread; the proxy sends them again. One whose timeout passes first never ran, and the
    notice that it will not come gets through the same way, so the next call does not wait
    for it."""
    service = SplitService(sequence_timeout=60.0)
    service.start()
    try:
        model = Toy()
        token, session = service.open_session("crowded", ImmediateScheduler(model))
        session.max_in_progress = 2
        proxy = ServerModelProxy(service.address, token)
        withheld = threading.Event()
        with grpc.insecure_channel(service.address) as channel:
            stalls = _calls_withholding_their_bodies([channel, channel], withheld, call_path(token))
            notices = [call_path(token, notice=True)] * MAX_NOTICES_IN_PROGRESS  # the notices' own share
            stalls += _calls_withholding_their_bodies([channel] * len(notices), withheld, notices[0])
            _wait_until_its_share_is_taken(session)
            given_up = proxy.record.future(i=torch.tensor(0), timeout=0.5)
            later = proxy.record.future(i=torch.tensor(1), timeout=30.0)
            with pytest.raises(ServerModelTimeoutError, match="refused it for room until its timeout; it never ran"):
                given_up.result()
            deadline = time.monotonic() + 10
            while proxy.traffic.by_method().get(ABANDONED_METHOD, {}).get("up_messages", 0) < 2:
                assert time.monotonic() < deadline, "the notice that request 0 will not come was not sent again"
                time.sleep(0.05)
            assert not later.done()
            withheld.set()
            assert later.result(timeout=5) is None  # well within the sequence timeout: 0 was skipped
        assert model.seen == [1]
        _still_serves(proxy)
        proxy.close()
    finally:
        service.stop(grace=0)


def test_a_notice_gets_through_while_the_calls_waiting_for_it_fill_the_client_s_share(service: SplitService) -> None:
    """Requests waiting for one that will never come can fill the client's share of the
    threads; the notice that it will not come has a share of its own, so they run at once
    instead of waiting out the sequence timeout."""
    model = Toy()
    token, session = service.open_session("noticed", ImmediateScheduler(model))
    session.max_in_progress = 2
    with ThreadPoolExecutor(2) as background:
        waiting = [background.submit(_raw, service, token, _record_frame(seq, 0), 30) for seq in (1, 2)]
        _wait_until_its_share_is_taken(session)
        notice = encode_request(0, ABANDONED_METHOD, {}, no_reply=True)
        assert isinstance(_raw(service, token, notice, notice=True), bytes)
        assert all(isinstance(request.result(timeout=3), bytes) for request in waiting)
    assert model.seen == [1, 2]
    error = _raw_call(service, token, notice)
    assert "notices go to the notice path" in (error.details() or "")


def test_mutual_tls_serves_only_clients_whose_certificate_the_service_trusts() -> None:
    """With a client CA, a peer without a trusted certificate cannot open a call at all, so it
    cannot hold the service's threads (not even by withholding a request's body)."""
    pytest.importorskip("cryptography")
    server_cert, server_key = self_signed_certificate()
    client_cert, client_key = self_signed_certificate()
    stranger_cert, stranger_key = self_signed_certificate()
    service = SplitService(tls=TlsConfig(server_cert, server_key, server_cert, client_ca=client_cert), max_workers=2)
    service.start()
    try:
        token, _ = service.open_session("c", ImmediateScheduler(Toy()))
        proxy = ServerModelProxy(
            service.address, token, root_certificates=server_cert, client_certificate=(client_cert, client_key)
        )
        _still_serves(proxy)
        credentials = grpc.ssl_channel_credentials(root_certificates=server_cert)
        channels = [grpc.secure_channel(service.address, credentials) for _ in range(4)]  # twice the threads
        withheld = threading.Event()
        for stall in _calls_withholding_their_bodies(channels, withheld):
            with pytest.raises(grpc.RpcError) as refused:
                stall.result(timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        started = time.perf_counter()
        _still_serves(proxy)
        assert time.perf_counter() - started < 2
        for certificate in (None, (stranger_cert, stranger_key)):
            stranger = ServerModelProxy(
                service.address,
                token,
                root_certificates=server_cert,
                client_certificate=certificate,
                default_timeout=3.0,
            )
            with pytest.raises(ServerUnavailableError, match=r"requires client certificates \(mutual TLS\)"):
                stranger.echo(x=torch.ones(1))
            with pytest.raises(ServerUnavailableError):
                stranger.close()
        _still_serves(proxy)
        withheld.set()
        for channel in channels:
            channel.close()
    finally:
        service.stop(grace=0)


def test_a_client_certificate_without_roots_or_a_client_ca_without_a_certificate_is_refused() -> None:
    with pytest.raises(ConfigError, match="client_certificate is for mutual TLS and needs root_certificates"):
        ServerModelProxy("127.0.0.1:1", b"0" * 16, client_certificate=(b"chain", b"key"))
    for junk in (b"", b"not a certificate"):
        with pytest.raises(ConfigError, match=rf"must hold PEM certificates .* got {len(junk)} bytes without one"):
            TlsConfig(b"chain", b"key", b"roots", client_ca=junk)


def test_a_service_that_cannot_listen_says_which_setting_to_check() -> None:
    pytest.importorskip("cryptography")
    cert, _ = self_signed_certificate()
    _, other_key = self_signed_certificate()
    with pytest.raises(ConfigError, match=r"cannot listen on 127.0.0.1:0: the TLS private key does not match"):
        SplitService(tls=TlsConfig(cert, other_key, cert)).start()
    with pytest.raises(ConfigError, match=r"cannot listen on 192.0.2.1:0: the address is not this machine's"):
        SplitService("192.0.2.1", 0).start()  # TEST-NET-1: never a local address


def _record_frame(seq: int, settled_below: int) -> bytes:
    return encode_request(seq, "record", {"i": torch.tensor(seq)}, settled_below=settled_below)


def test_a_request_overtaken_on_the_way_waits_for_its_late_predecessor(service: SplitService) -> None:
    """On a slow link a small request can overtake a large one by seconds: the later one
    waits (its client still awaits the earlier), and both run in the client's order."""
    model = Toy()
    token, _ = service.open_session("slow-link", ImmediateScheduler(model))
    with ThreadPoolExecutor(1) as background:
        later = background.submit(_raw, service, token, _record_frame(1, 0), 10)
        time.sleep(2.0)
        results = [_raw(service, token, _record_frame(0, 0), 10), later.result(10)]
    assert all(isinstance(r, bytes) for r in results), results
    assert model.seen == [0, 1]


def test_a_request_the_client_gave_up_on_is_skipped_once_a_later_request_says_so(service: SplitService) -> None:
    model = Toy()
    token, _ = service.open_session("gave-up", ImmediateScheduler(model))
    with ThreadPoolExecutor(1) as background:
        waiting = background.submit(_raw, service, token, _record_frame(1, 0), 10)
        time.sleep(0.5)
        assert model.seen == []  # request 0 may still be on its way: request 1 waits
        # "everything below 1 has settled here":
        results = [_raw(service, token, _record_frame(2, 1), 10), waiting.result(10)]
    assert model.seen == [1, 2]
    assert all(isinstance(r, bytes) for r in results), results
    error = _raw_call(service, token, _record_frame(0, 0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already given it up" in (error.details() or "")


def test_a_future_given_up_before_it_was_sent_does_not_hold_up_the_next(service: SplitService) -> None:
    model = Toy()
    proxy = connect(service, model, max_in_flight=2)
    slow = [proxy.slow.future(seconds=torch.tensor(0.4)) for _ in range(2)]  # both sender threads busy
    never = proxy.echo.future(x=torch.ones(1), timeout=0.1)  # its deadline passes in the queue
    after = proxy.record.future(i=torch.tensor(7))  # encoded while `never` was still pending
    after.result(timeout=3.0)  # the service's sequence timeout is 5 s: it must not wait for `never`
    with pytest.raises(ServerModelTimeoutError, match="it was not sent"):
        never.result()
    assert [f.result() for f in slow] == [None, None]
    assert model.seen == [7]
    assert proxy.traffic.by_method()[ABANDONED_METHOD]["up_messages"] == 1
    _still_serves(proxy)


def test_a_future_s_reply_is_metered_once_whether_it_is_read_never_or_thrice(service: SplitService) -> None:
    proxy = connect(service, Toy())
    x = torch.ones(256)
    read, unread = proxy.echo.future(x=x), proxy.echo.future(x=x)
    for _ in range(3):
        torch.testing.assert_close(read.result(), x)
    proxy.close()
    assert unread.done()
    echo = proxy.traffic.by_method()["echo"]
    assert (echo["down_messages"], echo["down_payload_bytes"]) == (2, 2 * x.nbytes)


def test_closing_waits_for_outstanding_futures_and_finishes_after_a_failed_send(service: SplitService) -> None:
    model = Toy()
    token, session = service.open_session("closer", ImmediateScheduler(model))
    proxy = ServerModelProxy(service.address, token, max_message_bytes=service.max_message_bytes)
    futures = [proxy.large.future(x=torch.ones(1)) for _ in range(4)]
    proxy.fail.send(x=torch.ones(1))
    with pytest.raises(RemoteComputationError, match="deliberate failure"):
        proxy.close()
    assert session.finished, "the server was told the client is done, though a send had failed"
    replies = [f.result() for f in futures]
    assert all(isinstance(r, torch.Tensor) and r.shape == (3 << 18,) for r in replies)


def test_a_request_that_timed_out_waiting_for_its_turn_does_not_hold_up_the_next(service: SplitService) -> None:
    model = Toy()
    token, _ = service.open_session("gave-up-waiting", ImmediateScheduler(model))
    gave_up = _raw(service, token, _record_frame(1, 0), 0.3)  # waits for 0, which has not come
    assert isinstance(gave_up, grpc.RpcError) and gave_up.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(_raw(service, token, _record_frame(0, 0)), bytes)
    after = _raw(service, token, _record_frame(2, 0), 3)  # the service's sequence timeout is 5 s
    assert isinstance(after, bytes), after
    assert model.seen == [0, 2]


def test_each_fire_and_forget_reply_is_metered_once(service: SplitService) -> None:
    proxy = connect(service, Toy())
    for i in range(5):
        proxy.record.send(i=torch.tensor(i))
    proxy.wait_all()
    assert proxy.traffic.by_method()["record"]["down_messages"] == 5
    proxy.close()
