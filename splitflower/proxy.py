"""The client's handle on its server model: ``self.server_model_proxy.<method>(**tensors)``.

Three ways to call, one wire:

* ``proxy.forward(embeddings=z, labels=y)`` blocks and returns the result as torch tensors
  on the caller's device (the device of the first argument);
* ``proxy.forward.future(...)`` returns a :class:`ProxyFuture` at once, so many requests
  can be outstanding;
* ``proxy.forward.send(...)`` is fire-and-forget: it returns nothing, the server sends no
  tensors back, and at most ``max_in_flight`` such calls are outstanding (``send`` blocks
  while the window is full). An error in one surfaces at the first call made once it
  is known, or at :meth:`ServerModelProxy.wait_all`.

Every form takes ``timeout=`` seconds (default: the proxy's ``default_timeout``, none unless
set: a deadline costs gRPC some work on every call), enforced as a gRPC deadline.
Requests of one proxy are executed in the order they were issued.
"""

from __future__ import annotations

import logging
import math
import reprlib
import threading
import time
from collections.abc import Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import torch

from splitflower._checks import positive_seconds
from splitflower._malloc import keep_freed_memory
from splitflower._openmp import release_openmp_workers
from splitflower.codec import decode_reply, encode_request, value_tensors
from splitflower.errors import (
    AuthenticationError,
    CodecError,
    ConfigError,
    InvalidArgumentsError,
    MessageTooLargeError,
    RemoteCallError,
    RemoteComputationError,
    ServerModelTimeoutError,
    ServerUnavailableError,
    SplitflowerError,
    UnknownMethodError,
)
from splitflower.metering import MemoryTally, TimeMeter, TrafficMeter
from splitflower.wire import (
    ABANDONED_METHOD,
    DEFAULT_MAX_MESSAGE_BYTES,
    ERROR_KIND_METADATA_KEY,
    FINISH_METHOD,
    MAX_IN_FLIGHT,
    ErrorKind,
    call_path,
)

__all__ = ["ServerModelProxy", "RemoteMethod", "ProxyFuture", "Value"]

logger = logging.getLogger(__name__)

_KIND_TO_ERROR: dict[str, type[RemoteCallError]] = {
    ErrorKind.UNKNOWN_METHOD: UnknownMethodError,
    ErrorKind.INVALID_ARGUMENTS: InvalidArgumentsError,
    ErrorKind.CORRUPT: InvalidArgumentsError,
    ErrorKind.AUTH: AuthenticationError,
    ErrorKind.TOO_LARGE: MessageTooLargeError,
    ErrorKind.COMPUTATION: RemoteComputationError,
    ErrorKind.TIMEOUT: ServerModelTimeoutError,
    ErrorKind.INTERNAL: RemoteCallError,
}

# The caller's OpenMP workers are ended before a wait only when the last blocking call
# waited at least this long (the best guess of the next wait): restarting them costs tens
# of microseconds, their spinning takes a core for about 10 ms. Waits on futures are not
# timed, so a client that only uses futures releases before every unfinished one.
_RELEASE_WORKERS_AFTER_S = 0.002

_NOTICE_TIMEOUT_S = 10.0  # a notice the server has not taken by then is of no further use

# A call the service refused unread for room (ErrorKind.BUSY) is sent again after this pause,
# doubled each time up to the maximum, until its deadline.
_BUSY_PAUSE_S = 0.005
_BUSY_MAX_PAUSE_S = 0.2


def _error_kind(error: BaseException) -> str | None:
    """The error kind the server answered ``error`` with; None if it never answered."""
    if isinstance(error, grpc.Call):
        for key, value in error.trailing_metadata() or ():
            if key == ERROR_KIND_METADATA_KEY:
                return str(value)
    return None


def _worth_resending(error: BaseException, pause: float, deadline: float | None) -> bool:
    """Whether a call that ended with ``error`` was refused unread for room and, after
    ``pause``, still has time before ``deadline`` (None: no limit) to be sent again."""
    return _error_kind(error) == ErrorKind.BUSY and (deadline is None or time.monotonic() + pause < deadline)


def _maybe_unseen(error: BaseException | None) -> bool:
    """Whether a request that ended with ``error`` may never have reached the server (the
    server answers each request it reads with an error kind in the trailing metadata; one
    refused for room it never read)."""
    if error is None:
        return False
    return _error_kind(error) in (None, ErrorKind.BUSY)


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (a time.monotonic() value; None: no limit), at least a
    millisecond, so that a wait that has run out still looks once."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


Value = None | torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...]


def _to_device(value: Value, device: torch.device | None) -> Value:
    if device is None or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return tuple(v.to(device) for v in value)


def _as_tensors(method: str, arguments: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    if all(isinstance(value, torch.Tensor) for value in arguments.values()):
        return arguments
    return {name: _as_tensor(method, name, value) for name, value in arguments.items()}


def _as_tensor(method: str, name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and any(stride < 0 for stride in value.strides):
        value = value.copy()  # torch shares numpy's memory only with non-negative strides (a flipped view)
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidArgumentsError(
            f"{method}: argument {name!r} must be a tensor (or numbers torch.as_tensor takes), "
            f"got {type(value).__name__} {reprlib.repr(value)}"
        ) from err


def _check_timeout(what: str, timeout: Any, error: type[SplitflowerError] = InvalidArgumentsError) -> float | None:
    """``timeout`` as seconds (None: no limit); anything but a positive finite number is refused."""
    if timeout is None:
        return None
    seconds = positive_seconds(timeout)
    if seconds is None:
        raise error(f"{what} must be a positive number of seconds, or None for no limit; got {timeout!r}")
    return seconds


class ProxyFuture:
    """An outstanding call; :meth:`result` waits for it and returns the method's value.

    Example
    -------
    >>> from splitflower.server_model import ServerModel
    >>> from splitflower.scheduling import ImmediateScheduler
    >>> from splitflower.service import SplitService
    >>> class Doubler(ServerModel):
    ...     def double(self, x: torch.Tensor) -> torch.Tensor:
    ...         return 2 * x
    >>> with SplitService() as service:
    ...     token, _ = service.open_session("client-0", ImmediateScheduler(Doubler(torch.nn.Identity())))
    ...     with ServerModelProxy(service.address, token) as proxy:
    ...         futures = [proxy.double.future(x=torch.tensor([float(i)])) for i in range(3)]
    ...         [f.result().item() for f in futures]
    [0.0, 2.0, 4.0]
    """

    def __init__(
        self,
        proxy: ServerModelProxy,
        method: str,
        call: Future[bytes],
        device: torch.device | None,
        deadline: float | None = None,
    ) -> None:
        self._proxy, self._method, self._call, self._device = proxy, method, call, device
        self._deadline = deadline  # time.monotonic() by which the call's own timeout fires
        self._value: Value = None
        self._error: BaseException | None = None
        self._settled = threading.Event()  # set by the proxy once the reply is decoded and metered

    def done(self) -> bool:
        return self._settled.is_set()

    def result(self, timeout: float | None = None) -> Value:
        """Block until the reply arrives (counted as time blocked on the channel)."""
        if not self._settled.is_set():
            self._proxy._before_waiting()
        with self._proxy.times.measure("blocked_s"):
            waited = self._give_up_if_never_sent(timeout)
            if not self._settled.wait(None if timeout is None else max(timeout - waited, 0.0)):
                raise ServerModelTimeoutError(
                    f"{self._method}: no reply within result(timeout={timeout}); the call is still outstanding"
                )
        if self._error is not None:
            raise self._error
        return _to_device(self._value, self._device)

    def _give_up_if_never_sent(self, timeout: float | None) -> float:
        """Wait until the call's own deadline (or ``timeout``, if sooner); return the
        seconds waited. A call still queued for a pool thread then is never sent; one
        already sent ends by its gRPC deadline."""
        started = time.monotonic()
        if self._deadline is None or (timeout is not None and started + timeout < self._deadline):
            return 0.0
        self._settled.wait(max(self._deadline - started, 0.0))
        self._call.cancel()  # only a call no thread has taken up is cancelled (it settles as not sent)
        return time.monotonic() - started


class RemoteMethod:
    """``proxy.<name>``: call it to block, ``.future(...)`` or ``.send(...)`` to not."""

    def __init__(self, proxy: ServerModelProxy, name: str) -> None:
        self._proxy, self._name = proxy, name

    def __call__(self, *positional: Any, timeout: float | None = None, **tensors: Any) -> Value:
        if positional:
            raise self._positional(positional, "")
        return self._proxy._blocking(self._name, tensors, _check_timeout("timeout", timeout))

    def future(self, *positional: Any, timeout: float | None = None, **tensors: Any) -> ProxyFuture:
        if positional:
            raise self._positional(positional, ".future")
        return self._proxy._start(self._name, tensors, _check_timeout("timeout", timeout), no_reply=False)

    def send(self, *positional: Any, timeout: float | None = None, **tensors: Any) -> None:
        if positional:
            raise self._positional(positional, ".send")
        self._proxy._send(self._name, tensors, _check_timeout("timeout", timeout))

    def _positional(self, positional: tuple[Any, ...], variant: str) -> InvalidArgumentsError:
        return InvalidArgumentsError(
            f"{self._name}: remote methods take keyword tensors, named as the server method's arguments; "
            f"got {len(positional)} positional: write proxy.{self._name}{variant}(name=tensor, ...)"
        )

    def __repr__(self) -> str:
        return f"<remote method {self._name!r} of {self._proxy!r}>"


class ServerModelProxy:
    """A client's channel to the server model that serves it this round.

    Built by the framework from the round config; a :class:`~splitflower.client.Client`
    finds it as ``self.server_model_proxy``. Over TLS, ``root_certificates`` verify the
    server, and ``client_certificate`` (PEM chain, PEM key) is this client's own, for a service
    that requires one (:class:`~splitflower.service.TlsConfig`'s ``client_ca``).

    Example
    -------
    >>> proxy = ServerModelProxy("127.0.0.1:50051", token=b"0" * 16)  # doctest: +SKIP
    >>> grad = proxy.forward_backward(embeddings=z, labels=y)  # doctest: +SKIP
    >>> proxy.train.send(embeddings=z, labels=y)  # doctest: +SKIP
    >>> proxy.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        address: str,
        token: bytes,
        *,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        default_timeout: float | None = None,
        max_in_flight: int = 8,
        log_prefix: str = "[client]",
        memory: MemoryTally | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
    ) -> None:
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT:
            raise ConfigError(f"max_in_flight must be 1 to {MAX_IN_FLIGHT}, got {max_in_flight}")
        if client_certificate is not None and not root_certificates:
            raise ConfigError(
                "client_certificate is for mutual TLS and needs root_certificates to verify the server with; "
                "the service's round config gives them when it serves over TLS"
            )
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.default_timeout = _check_timeout("default_timeout", default_timeout, ConfigError)
        self.log_prefix = log_prefix
        self.traffic = TrafficMeter()
        self.times = TimeMeter()
        self.memory = memory or MemoryTally()
        keep_freed_memory()
        path = call_path(token)  # checks the token before a channel opens
        self._next_seq = 0
        self._unsettled: set[int] = set()  # numbers of requests sent whose outcome is not back
        self._seq_lock = threading.Lock()
        self._seq_changed = threading.Condition(self._seq_lock)  # notified as requests settle
        self._window = threading.BoundedSemaphore(max_in_flight)
        self._window_size = max_in_flight
        self._unsettled_sends = 0  # fire-and-forget calls without their outcome (under _seq_changed)
        self._closing = False  # close() waits on _seq_changed for the last request to settle
        # gRPC's own futures start a polling thread whenever the channel has been idle; a
        # small pool running blocking calls avoids that start-up and bounds concurrency.
        self._executor = ThreadPoolExecutor(max_in_flight, thread_name_prefix="splitflower-proxy")
        self._deferred_error: BaseException | None = None
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_http_proxy", 0),
        ]
        self._over_tls = bool(root_certificates)
        if root_certificates:
            chain, key = client_certificate or (None, None)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates, private_key=key, certificate_chain=chain
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._call: grpc.UnaryUnaryMultiCallable = self._channel.unary_unary(path)
        self._notice: grpc.UnaryUnaryMultiCallable = self._channel.unary_unary(call_path(token, notice=True))
        self._closed = False
        self._last_wait_s = math.inf  # how long the last blocking call waited

    def __getattr__(self, name: str) -> RemoteMethod:
        if name.startswith("__"):
            raise AttributeError(name)  # Python's own protocol probes (copy, pickle) end here
        if name.startswith("_"):
            raise UnknownMethodError(f"{name!r} is private: private server-model methods are not callable remotely")
        return RemoteMethod(self, name)

    def __repr__(self) -> str:
        return f"ServerModelProxy({self.address!r})"

    def call(self, method: str, /, *, timeout: float | None = None, **tensors: Any) -> Value:
        """Blocking call by method name (same as ``getattr(proxy, method)(...)``)."""
        return RemoteMethod(self, method)(timeout=timeout, **tensors)

    def _prepare(
        self, method: str, arguments: Mapping[str, Any], no_reply: bool
    ) -> tuple[bytes, torch.device | None, int]:
        if self._deferred_error is not None:
            self._raise_deferred()
        if self._closed:
            raise RemoteCallError(f"{self.log_prefix} proxy is closed; {method} was not sent")
        tensors = _as_tensors(method, arguments)
        first = next(iter(tensors.values()), None)
        device = None if first is None or first.is_cpu else first.device
        with self._seq_lock:
            # The server runs this client's requests in the order of these numbers; a frame
            # that is never sent must not use one up.
            seq = self._next_seq
            # Every number below min(unsettled) has its outcome here: if the server never saw
            # one of them, it failed on the way and the server need not wait for it.
            settled_below = min(self._unsettled, default=seq)
            frame = encode_request(seq, method, tensors, no_reply=no_reply, settled_below=settled_below)
            if len(frame) > self.max_message_bytes:
                raise MessageTooLargeError(
                    f"{method}: request is {len(frame)} bytes, over the limit of {self.max_message_bytes}; "
                    "send smaller batches or raise max_message_bytes on the service"
                )
            self._next_seq += 1
            self._unsettled.add(seq)
        self.traffic.record("up", method, tensors, frame_bytes=len(frame))
        return frame, device, seq

    def _settle(self, seq: int, error: BaseException | None = None) -> None:
        """Record that request ``seq`` has its outcome here. If it failed without the server
        answering it while later requests are out, those make the server wait for it: a
        notice tells the server it was abandoned."""
        with self._seq_lock:  # _seq_changed's lock, taken directly: this runs on every call
            self._unsettled.discard(seq)
            if self._closing:
                self._seq_changed.notify_all()
            overtaken = _maybe_unseen(error) and any(later > seq for later in self._unsettled)
        if overtaken:
            self._notify_abandoned(seq)

    def _notify_abandoned(self, seq: int, deadline: float | None = None, pause: float = _BUSY_PAUSE_S) -> None:
        if self._closed:  # its calls end because the channel closed; the server revokes the session
            return
        deadline = deadline or time.monotonic() + _NOTICE_TIMEOUT_S
        frame = encode_request(seq, ABANDONED_METHOD, {}, no_reply=True)
        try:
            notice = self._notice.future(frame, timeout=_left(deadline))  # gRPC's own future: no sender thread
        except (ValueError, grpc.RpcError) as err:  # the channel closed meanwhile
            logger.debug("%s a notice of an abandoned request was not sent: %s", self.log_prefix, err)
            return
        self.traffic.record("up", ABANDONED_METHOD, {}, frame_bytes=len(frame))
        notice.add_done_callback(lambda done: self._after_notice(done, seq, deadline, pause))

    def _after_notice(self, notice: grpc.Future, seq: int, deadline: float, pause: float) -> None:
        error = notice.exception()
        if error is None:
            return
        if self._closed:  # the server revokes the session; nothing waits for the notice
            return
        if _worth_resending(error, pause, deadline):
            again = threading.Timer(pause, self._notify_abandoned, (seq, deadline, min(2 * pause, _BUSY_MAX_PAUSE_S)))
            again.daemon = True
            again.start()
        else:
            logger.debug("%s a notice of an abandoned request was not delivered: %s", self.log_prefix, error)

    def _deadline(self, timeout: float | None) -> float | None:
        return self.default_timeout if timeout is None else timeout

    def _blocking(self, method: str, arguments: Mapping[str, Any], timeout: float | None) -> Value:
        frame, device, seq = self._prepare(method, arguments, no_reply=False)
        self.memory.add_in_flight(len(frame))
        self._before_waiting()
        started = time.perf_counter()
        error: grpc.RpcError | None = None
        seconds = self._deadline(timeout)
        try:
            reply = self._invoke(frame, None if seconds is None else time.monotonic() + seconds)
        except grpc.RpcError as err:
            error = err
            raise self._translate(method, err) from None
        finally:
            blocked = time.perf_counter() - started
            self._last_wait_s = blocked
            self.memory.add_in_flight(-len(frame))
            self._settle(seq, error)
        return _to_device(self._finish_reply(method, reply, blocked), device)

    def _before_waiting(self) -> None:
        # Left spinning, the caller's OpenMP workers would take cores from a server on this
        # machine. (Released before the request is sent: gRPC's blocking call sends and waits.)
        if self._last_wait_s >= _RELEASE_WORKERS_AFTER_S:
            release_openmp_workers()

    def _start(
        self,
        method: str,
        arguments: Mapping[str, Any],
        timeout: float | None,
        *,
        no_reply: bool,
        deadline: float | None = None,
    ) -> ProxyFuture:
        frame, device, seq = self._prepare(method, arguments, no_reply)
        # The encoded request is held until its reply arrives: count it as the party's memory.
        self.memory.add_in_flight(len(frame))
        # The timeout counts from the call, not from when a pool thread takes it up.
        if deadline is None:
            seconds = self._deadline(timeout)
            deadline = None if seconds is None else time.monotonic() + seconds
        call = self._executor.submit(self._call_before, frame, method, deadline)
        future = ProxyFuture(self, method, call, device, deadline)
        call.add_done_callback(lambda done: self._take_outcome(future, done, seq, len(frame), no_reply))
        return future

    def _take_outcome(self, future: ProxyFuture, call: Future[bytes], seq: int, frame_bytes: int, send: bool) -> None:
        """All a finished call leaves to do, once, in this order: decode and meter its reply
        (or take its error), free its frame, keep a send's error for the next call and open
        the send window, resolve the future, and settle its number (which close() waits for)."""
        raw_error: BaseException | None = None
        try:
            future._value = self._finish_reply(future._method, call.result())
        except grpc.RpcError as err:
            raw_error, future._error = err, self._translate(future._method, err)
        except CancelledError as err:  # taken off the queue by result() when its deadline passed
            raw_error, future._error = err, self._not_sent(future._method)
        except BaseException as err:  # noqa: BLE001 - raised by result(), in the caller's thread
            raw_error = future._error = err
        self.memory.add_in_flight(-frame_bytes)
        if send:
            if future._error is not None:
                self._defer(future._error)
            self._window.release()
            with self._seq_changed:
                self._unsettled_sends -= 1
                self._seq_changed.notify_all()
        future._settled.set()
        self._settle(seq, raw_error)

    def _call_before(self, frame: bytes, method: str, deadline: float | None) -> bytes:
        if deadline is not None and deadline <= time.monotonic():
            raise self._not_sent(method)
        return self._invoke(frame, deadline)

    def _invoke(self, frame: bytes, deadline: float | None) -> bytes:
        """The gRPC call, made again after a pause while the service refuses it unread for room
        (it never ran), until ``deadline`` (a time.monotonic() value; None: no limit). A call
        sent again is metered once."""
        pause = _BUSY_PAUSE_S
        while True:
            try:
                return self._call(frame, timeout=_left(deadline))  # type: ignore[no-any-return]
            except grpc.RpcError as err:
                if not _worth_resending(err, pause, deadline):
                    raise
            time.sleep(pause)
            pause = min(2 * pause, _BUSY_MAX_PAUSE_S)

    def _not_sent(self, method: str) -> ServerModelTimeoutError:
        return ServerModelTimeoutError(
            f"{method}: its timeout passed before a sender thread took it up (at most {self._window_size} calls "
            "are in flight at once); it was not sent"
        )

    def _send(self, method: str, arguments: Mapping[str, Any], timeout: float | None) -> None:
        seconds = self._deadline(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        with self.times.measure("blocked_s"):
            if not self._window.acquire(timeout=seconds):
                raise ServerModelTimeoutError(
                    f"{method}: {self._window_size} fire-and-forget calls were still unacknowledged after "
                    f"its timeout of {seconds}s; it was not sent"
                )
        with self._seq_changed:
            self._unsettled_sends += 1
        try:
            self._start(method, arguments, timeout, no_reply=True, deadline=deadline)
        except BaseException:
            self._window.release()
            with self._seq_changed:
                self._unsettled_sends -= 1
            raise

    def _defer(self, error: BaseException) -> None:
        logger.warning("%s fire-and-forget call failed: %s", self.log_prefix, error)
        if self._deferred_error is None:
            self._deferred_error = error

    def _take_deferred(self) -> RemoteCallError | None:
        """The first failure of a fire-and-forget call since the last one taken, to raise now."""
        error, self._deferred_error = self._deferred_error, None
        if error is None:
            return None
        kind = type(error) if isinstance(error, RemoteCallError) else RemoteCallError
        taken = kind(f"an earlier fire-and-forget call failed: {error}")
        taken.__cause__ = error
        return taken

    def _raise_deferred(self) -> None:
        error = self._take_deferred()
        if error is not None:
            raise error

    def _finish_reply(self, method: str, frame: bytes, blocked_s: float = 0.0) -> Value:
        try:
            reply = decode_reply(frame)
        except CodecError as err:
            raise RemoteCallError(f"{method}: the server's reply is corrupt: {err}") from err
        self.times.add_all(
            blocked_s=blocked_s, server_compute_s=reply.server_compute_s, server_queue_s=reply.queue_wait_s
        )
        value = reply.value
        self.traffic.record("down", method, value_tensors(value), frame_bytes=len(frame))
        return value

    def _translate(self, method: str, err: grpc.RpcError) -> RemoteCallError:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        kind = _error_kind(err)
        if kind == ErrorKind.BUSY:
            return ServerModelTimeoutError(
                f"{method}: the service refused it for room until its timeout; it never ran ({details})"
            )
        if kind in _KIND_TO_ERROR:
            return _KIND_TO_ERROR[kind](f"{method}: {details}")  # server messages leave the method out
        if code == grpc.StatusCode.UNIMPLEMENTED and kind is None:  # the service routes calls by token alone
            return AuthenticationError(
                f"{method}: the service at {self.address} refused this client's token: token not issued for the "
                "current round (wrong or expired; a client gets its token from the strategy's round config), or "
                "the service runs another splitflower version"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerModelTimeoutError(
                f"{method}: no reply within the call's timeout ({details}). The server may have run it, or "
                "may still run it: sending it again may, say, train twice on one batch"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return MessageTooLargeError(
                f"{method}: message over the size limit ({details}); the service accepts at most "
                f"{self.max_message_bytes} bytes unless configured otherwise"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = (
                "; over TLS, check that root_certificates verify the server's certificate and, where the service "
                "requires client certificates (mutual TLS), that this client presents one its client CA signed "
                "(a SuperNode's sf-tls-client-certificate and sf-tls-client-private-key)"
                if self._over_tls
                else ""
            )
            return ServerUnavailableError(
                f"{method}: split-learning service at {self.address} unreachable ({details}){hint}"
            )
        return RemoteCallError(f"{method}: {code}: {details}")

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait for every fire-and-forget call to complete; raise the first failure."""
        with self.times.measure("blocked_s"), self._seq_changed:
            if not self._seq_changed.wait_for(lambda: self._unsettled_sends == 0, timeout):
                raise ServerModelTimeoutError(
                    f"{self._unsettled_sends} fire-and-forget calls still outstanding after {timeout}s"
                )
        self._raise_deferred()

    def close(self, timeout: float | None = None) -> None:
        """Wait for outstanding calls (futures too: their replies stay readable), tell the
        server this client is done (even if a fire-and-forget call failed: a batching server
        stops waiting for it either way), close the channel, then raise the first failure of
        a fire-and-forget call. ``timeout`` bounds the whole of it."""
        if self._closed:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        error: RemoteCallError | None = None
        try:
            with self.times.measure("blocked_s"), self._seq_changed:
                self._closing = True
                if not self._seq_changed.wait_for(lambda: not self._unsettled, _left(deadline)):
                    error = ServerModelTimeoutError(f"{len(self._unsettled)} calls still outstanding after {timeout}s")
            error = self._take_deferred() or error
            try:  # on this thread: the sender threads may all be busy with calls that never end
                self._blocking(FINISH_METHOD, {}, _left(deadline))
            except RemoteCallError as err:
                if error is None:
                    error = err
                else:
                    logger.warning("%s telling the server this client is done failed too: %s", self.log_prefix, err)
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)
            self._channel.close()
        if error is not None:
            raise error

    def __enter__(self) -> ServerModelProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
