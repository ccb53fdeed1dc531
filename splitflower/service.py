"""The split-learning gRPC service that the ServerApp hosts for the run's lifetime.

Clients reach server models through it, one unary call per offloaded computation, with
frames encoded by :mod:`splitflower.codec` (no protobuf code generation, no pickle). The
service authenticates each call by the token the strategy issued to that client for the
round (the call's method path, :func:`splitflower.wire.call_path`) as soon as the call's
headers arrive, before gRPC waits for its body on a service thread; it keeps each
client's requests in the order it sent them and hands them to the scheduler of the server
model that serves the client. Every failure (unknown method, bad
arguments, corrupt bytes, oversize message, missing or stale token, an exception in the
method) is answered to that caller alone with a gRPC status and an error kind; the service
keeps serving everyone else.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import secrets
import sysconfig
import threading
import time
import traceback
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
import torch

from splitflower._malloc import keep_freed_memory
from splitflower._threads import StickyExecutor
from splitflower.codec import Request, check_value, decode_request, encode_reply
from splitflower.errors import (
    CodecError,
    ConfigError,
    InvalidArgumentsError,
    ServerModelTimeoutError,
    UnknownMethodError,
)
from splitflower.scheduling import Scheduler
from splitflower.wire import (
    ABANDONED_METHOD,
    DEFAULT_MAX_MESSAGE_BYTES,
    ERROR_KIND_METADATA_KEY,
    FINISH_METHOD,
    MAX_IN_FLIGHT,
    MAX_NOTICES_IN_PROGRESS,
    TOKEN_BYTES,
    ErrorKind,
    call_path,
)

__all__ = ["TlsConfig", "SplitService", "ClientSession"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """PEM-encoded server certificate chain and key; clients verify against ``root_certificates``.

    With ``client_ca`` (PEM certificates), the service also requires each client to present a
    certificate one of them signed (mutual TLS): a peer without one cannot complete the TLS
    handshake, so it cannot open a call at all, let alone hold one of the service's threads by
    withholding a request's body. Clients pass theirs as ``ServerModelProxy(...,
    client_certificate=(chain, key))``.

    Example
    -------
    >>> TlsConfig(b"<server chain>", b"<server key>", b"<root>", client_ca=b"<client CA>")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    splitflower.errors.ConfigError: client_ca (sf-tls-client-ca) must hold PEM certificates ...; got 11 bytes ...
    """

    certificate_chain: bytes
    private_key: bytes
    root_certificates: bytes
    client_ca: bytes | None = None

    def __post_init__(self) -> None:
        # gRPC would take an empty or non-PEM client CA and then refuse every client, or fail
        # to listen with an error that blames the server's key.
        if self.client_ca is not None and _PEM_CERTIFICATE not in self.client_ca:
            raise ConfigError(
                f"client_ca (sf-tls-client-ca) must hold PEM certificates ({_PEM_CERTIFICATE.decode()}); "
                f"got {len(self.client_ca)} bytes without one"
            )


_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


# The server counts frames only (the client's TrafficMeter has the per-tensor detail), so
# accounting stays off the per-call hot path.
_WIRE_KEYS = ("up_frame_bytes", "up_messages", "down_frame_bytes", "down_messages")
_TIME_KEYS = ("server_compute_s", "server_queue_s", "server_handle_s")


# gRPC carries the message in a trailer, percent-encoding each byte that is not printable
# ASCII (3 bytes for 1); a receiver refuses trailers over 8 KiB at random, over 16 KiB always.
_MAX_MESSAGE_BYTES = 2000
# How far ahead of the next expected request a client's request may be: a real client has
# at most its in-flight window out.
_MAX_SEQ_AHEAD = 1024


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, kind: str, message: str) -> None:
        encoded = message.encode()
        if len(encoded) > _MAX_MESSAGE_BYTES:
            kept = encoded[:_MAX_MESSAGE_BYTES].decode(errors="ignore")
            message = f"{kept}... ({len(encoded) - _MAX_MESSAGE_BYTES} more bytes)"
        super().__init__(message)
        self.code, self.kind, self.message = code, kind, message


class ClientSession:
    """One client's access for one round: its scheduler, the order of its requests, and
    what the server saw of it (frame bytes and time)."""

    def __init__(self, client: Hashable, scheduler: Scheduler, max_in_progress: int = 32) -> None:
        self.client = client
        self.max_in_progress = max_in_progress
        self.scheduler = scheduler
        self.finished = False
        self.revoked = False
        self.wire = dict.fromkeys(_WIRE_KEYS, 0)
        self.seconds = dict.fromkeys(_TIME_KEYS, 0.0)
        self._next_seq = 0
        self._settled_below = 0
        self._present: set[int] = set()
        self._abandoned: set[int] = set()  # numbers the client gave up before they arrived
        # Its calls in progress, from the handler's start to its end, and whether each still
        # awaits its request frame (revoking the token cancels those); notices apart, as they
        # have a share of their own.
        self._calls: dict[grpc.ServicerContext, bool] = {}
        self._notices: dict[grpc.ServicerContext, bool] = {}
        # A plain lock taken directly on every request (a Condition's own enter and exit are
        # Python calls); its condition is notified only when a request waits on it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0

    def admit(self, context: grpc.ServicerContext, *, notice: bool = False) -> None:
        """Count a call in progress, before its request frame arrives; refused unread while
        ``max_in_progress`` of this client's calls are (a proxy sends it again): a client that
        withholds its requests' bodies, or whose requests wait for an earlier one, holds at most
        that many of the service's threads. Notices have a share of their own, since the calls
        filling the client's share may be waiting for one."""
        calls, share = (self._notices, MAX_NOTICES_IN_PROGRESS) if notice else (self._calls, self.max_in_progress)
        with self._lock:
            if self.revoked:
                raise _revoked()
            if len(calls) >= share:
                raise _Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ErrorKind.BUSY,
                    f"refused unread: {len(calls)} of this client's {'notices' if notice else 'calls'} are in "
                    f"progress, its share of the service's threads (a proxy keeps at most {MAX_IN_FLIGHT} calls in "
                    "flight plus a blocking call, and sends a call refused this way again until its timeout)",
                )
            calls[context] = True

    @property
    def calls_in_progress(self) -> int:
        """This client's calls (notices aside) the service holds a thread for: at most ``max_in_progress``."""
        return len(self._calls)

    def receive(self, requests: Iterator[bytes], context: grpc.ServicerContext, *, notice: bool = False) -> bytes:
        """Wait for an admitted call's request frame. Raises grpc.RpcError if the caller
        cancels the call, or the token is revoked, first."""
        frame = next(requests, None)
        # No lock: setting an existing key is atomic under the GIL and leaves the dict's size,
        # which revoke iterates, unchanged; a revoke racing this may cancel a call just read.
        (self._notices if notice else self._calls)[context] = False
        if frame is None:
            raise _invalid("the call ended without a request frame; send exactly one per call")
        return frame

    def release(self, context: grpc.ServicerContext, *, notice: bool = False) -> None:
        """The call has ended: its thread is free again."""
        with self._lock:
            del (self._notices if notice else self._calls)[context]

    def enter(self, seq: int, settled_below: int, context: grpc.ServicerContext, sequence_timeout: float) -> None:
        """Return once every earlier request of this client has been handled.

        Requests may arrive out of order (several are in flight on one HTTP/2 connection,
        and a small one overtakes a large one on a slow link), so a request waits for the
        earlier ones, however long they take, up to ``sequence_timeout`` or its deadline. A
        request that will never arrive (it failed on the client's side, e.g. its deadline
        passed on the way) is skipped as soon as a later request reports, in
        ``settled_below``, that the client has its outcome; it is never guessed from time.
        """
        with self._lock:
            if self.revoked:
                raise _revoked()
            if settled_below > self._settled_below:  # else nothing new to skip (checked once per request)
                self._skip_settled(settled_below)
            if seq in self._present:
                raise _invalid(
                    f"request number {seq} is already being served; the frame was sent twice, "
                    "or the token is shared by two proxies"
                )
            if seq in self._abandoned:
                raise _invalid(f"request number {seq} arrived after the client had given it up")
            if seq == self._next_seq:  # the usual case: nothing to wait for
                self._present.add(seq)
                return
            if seq < self._next_seq:
                raise _invalid(
                    f"request number {seq} arrived after later requests ran (next expected {self._next_seq}); "
                    "the client had already given it up, or the token is shared by two proxies"
                )
            if seq > self._next_seq + _MAX_SEQ_AHEAD:
                raise _invalid(
                    f"request number {seq}: the next expected is {self._next_seq}, and a request may be at most "
                    f"{_MAX_SEQ_AHEAD} numbers ahead of it (a proxy has at most {MAX_IN_FLIGHT + 1} in flight)"
                )
            self._present.add(seq)
            remaining = context.time_remaining()
            timeout = sequence_timeout if remaining is None else min(remaining, sequence_timeout)
            deadline = time.monotonic() + timeout
            while self._next_seq != seq:
                if self.revoked:
                    self._present.discard(seq)
                    raise _revoked()
                left = deadline - time.monotonic()
                if left <= 0:  # this number never runs now: later ones need not wait for it
                    self._present.discard(seq)
                    self._abandoned.add(seq)
                    self._skip_settled()
                    raise _Abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        ErrorKind.TIMEOUT,
                        f"request number {seq} waited {timeout:.1f}s for request {self._next_seq} to finish",
                    )
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1

    def abandon(self, seq: int) -> None:
        """The client gave request ``seq`` up without an answer: if it has not arrived, it
        never runs, and later requests do not wait for it."""
        with self._lock:
            if self._next_seq <= seq <= self._next_seq + _MAX_SEQ_AHEAD and seq not in self._present:
                self._abandoned.add(seq)
                self._skip_settled()

    def _skip_settled(self, settled_below: int = 0) -> None:
        """Move past requests the client has settled without the server ever seeing them."""
        self._settled_below = max(self._settled_below, settled_below)
        skipped_from = self._next_seq
        while self._next_seq not in self._present:
            if self._next_seq in self._abandoned:
                self._next_seq += 1
            elif self._next_seq < self._settled_below:
                self._next_seq = min([s for s in self._present if s > self._next_seq] + [self._settled_below])
            else:
                break
        if self._next_seq != skipped_from:
            logger.warning(
                "[server] client %s: requests %d..%d failed before reaching the server; skipping them",
                self.client,
                skipped_from,
                self._next_seq - 1,
            )
            self._abandoned = {s for s in self._abandoned if s >= self._next_seq}
            self._cond.notify_all()

    def revoke(self) -> None:
        """End the waits of this client's requests (its token is no longer valid), those still
        awaiting their request frames included."""
        with self._lock:
            self.revoked = True
            self._cond.notify_all()
            unread = [
                context for calls in (self._calls, self._notices) for context, awaiting in calls.items() if awaiting
            ]
        for context in unread:
            context.cancel()

    def leave(self, seq: int) -> None:
        """Let this client's next request run."""
        with self._lock:
            self._present.discard(seq)
            self._next_seq = seq + 1
            self._skip_settled()
            if self._waiting:
                self._cond.notify_all()


class SplitService:
    """A gRPC server giving clients access to server models.

    Parameters
    ----------
    host, port:
        Where to listen; port 0 picks a free port (see :attr:`address`).
    advertised_host:
        The host clients should dial, when it differs from ``host`` (e.g. listening on
        ``0.0.0.0`` and advertising the machine's LAN address).
    max_message_bytes:
        Largest request or reply accepted, in bytes.
    tls:
        Serve over TLS with this certificate; clients receive ``root_certificates``.
    max_workers:
        Threads carrying requests, at first: gathering requests (batched, or in the clients'
        order) holds one thread per waiting client, so a strategy raises it each round to
        what its clients may have in flight (:meth:`reserve_workers`). One client may have at
        most half of them in progress, and always the 33 calls a proxy may have in flight
        (calls waiting for their request bodies, or for its earlier requests, included).
    sequence_timeout:
        How long a request may wait for this client's earlier requests to arrive and finish
        (at most; its own deadline may be shorter). Requests that failed on the client's
        side are skipped without waiting (see :meth:`ClientSession.enter`).

    Example
    -------
    >>> service = SplitService(port=0)
    >>> service.start()
    >>> service.address.startswith("127.0.0.1:")
    True
    >>> service.stop()
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertised_host: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: TlsConfig | None = None,
        max_workers: int = 64,
        sequence_timeout: float = 120.0,
    ) -> None:
        if max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        self.host, self.port = host, port
        self.advertised_host = advertised_host or ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
        self.max_message_bytes = max_message_bytes
        self.tls = tls
        self.sequence_timeout = sequence_timeout
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._executor: StickyExecutor | None = None
        self._sessions: dict[bytes, ClientSession] = {}
        # A call's method path -> its session's handler; read by _Router on each call's headers.
        self._routes: dict[str, grpc.RpcMethodHandler] = {}
        self._lock = threading.Lock()
        self.bound_port = 0

    @property
    def address(self) -> str:
        """``host:port`` for clients to dial (valid after :meth:`start`)."""
        return f"{self.advertised_host}:{self.bound_port}"

    @property
    def root_certificates(self) -> bytes | None:
        return self.tls.root_certificates if self.tls else None

    def start(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        keep_freed_memory()
        executor = self._executor = StickyExecutor(self._max_workers, "splitflower-rpc")
        server = grpc.server(executor, options=options)
        server.add_generic_rpc_handlers((_Router(self._routes),))
        bind = f"{self.host}:{self.port}"
        cause: RuntimeError | None = None
        try:  # gRPC returns 0, or (newer versions) raises, when it cannot listen
            if self.tls:
                creds = grpc.ssl_server_credentials(
                    [(self.tls.private_key, self.tls.certificate_chain)],
                    root_certificates=self.tls.client_ca,
                    require_client_auth=self.tls.client_ca is not None,
                )
                self.bound_port = server.add_secure_port(bind, creds)
            else:
                self.bound_port = server.add_insecure_port(bind)
        except RuntimeError as err:
            self.bound_port, cause = 0, err
        if not self.bound_port:
            executor.shutdown(wait=False)
            why = (
                "the TLS private key does not match the certificate or is not a PEM key, or the address is "
                "not this machine's or is taken; check the key and certificate (sf-tls-*), sf-host and sf-port"
                if self.tls
                else "the address is not this machine's, or the port is taken; pick another host (sf-host) or port"
            )
            raise ConfigError(f"cannot listen on {bind}: {why}") from cause
        server.start()
        self._server = server
        logger.info(
            "[server] split-learning service listening on %s (tls=%s)",
            bind.replace(":0", f":{self.bound_port}"),
            bool(self.tls),
        )

    def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            logger.info("[server] split-learning service stopped")

    def __enter__(self) -> SplitService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reserve_workers(self, count: int) -> None:
        """Let up to ``count`` requests be served at once (if more than ``max_workers``): enough
        for every client's requests in flight, so that a request that waits for other clients'
        (a batching or ordered scheduler gathers one of each) never waits behind theirs for a
        thread. Threads start as requests come; a client's share stays as ``max_workers`` sets it."""
        if self._executor is not None:
            self._executor.raise_max_workers(count)

    def open_session(self, client: Hashable, scheduler: Scheduler) -> tuple[bytes, ClientSession]:
        """Issue a fresh token giving ``client`` access to ``scheduler``'s model."""
        token = secrets.token_bytes(TOKEN_BYTES)
        # One client's requests waiting for its earlier ones may hold half the threads, and
        # always as many as a proxy keeps in flight.
        in_progress = max(self._max_workers // 2, MAX_IN_FLIGHT + 1)
        session = ClientSession(client, scheduler, max_in_progress=in_progress)
        # Client-streaming to gRPC, one message on the wire: the handler starts before the body
        # arrives, so the session can bound how many of its calls wait for theirs.
        handler = grpc.stream_unary_rpc_method_handler(functools.partial(self._handle, session))
        notices = grpc.stream_unary_rpc_method_handler(functools.partial(self._handle, session, notice=True))
        with self._lock:
            self._sessions[token] = session
            self._routes[call_path(token)] = handler
            self._routes[call_path(token, notice=True)] = notices
        return token, session

    def close_session(self, token: bytes) -> None:
        """Revoke a token; the client's later requests are refused."""
        with self._lock:
            session = self._sessions.pop(token, None)
            self._routes.pop(call_path(token), None)
            self._routes.pop(call_path(token, notice=True), None)
        if session is not None:
            session.revoke()
        if session is not None and not session.finished:
            session.finished = True
            session.scheduler.client_finished(session.client)

    def _handle(
        self, session: ClientSession, requests: Iterator[bytes], context: grpc.ServicerContext, *, notice: bool = False
    ) -> bytes:
        try:
            session.admit(context, notice=notice)
            try:
                # grpc.RpcError from receive: the call was cancelled (by its caller, or by revoking
                # the token) before its frame came; there is nobody to answer.
                frame = session.receive(requests, context, notice=notice)
                try:
                    return _serve_notice(session, frame) if notice else self._serve(session, frame, context)
                except _Abort:
                    raise
                except BaseException as err:  # a bug here must still answer the caller
                    logger.exception("[server] unexpected error while serving a request")
                    raise _Abort(grpc.StatusCode.INTERNAL, ErrorKind.INTERNAL, f"server error: {err!r}") from err
            finally:
                session.release(context, notice=notice)
        except _Abort as abort:
            _answer(abort, context)

    def _serve(self, session: ClientSession, frame: bytes, context: grpc.ServicerContext) -> bytes:
        arrived = time.perf_counter()
        request = _decoded(frame)
        if request.method == ABANDONED_METHOD:
            raise _invalid(f"{ABANDONED_METHOD} notices go to the notice path (call_path(token, notice=True))")
        if session.finished and request.method != FINISH_METHOD:
            # Closing a session revokes it, then marks it finished.
            raise (
                _revoked()
                if session.revoked
                else _invalid("this client already finished its round; no further calls run")
            )
        session.enter(request.seq, request.settled_below, context, self.sequence_timeout)
        try:  # everything below runs for one request of this client at a time
            wire, seconds = session.wire, session.seconds
            wire["up_frame_bytes"] += len(frame)
            wire["up_messages"] += 1
            if request.method == FINISH_METHOD:
                session.finished = True
                session.scheduler.client_finished(session.client)
                reply = encode_reply(None)
            else:
                reply = self._run(session, request, context)
            wire["down_frame_bytes"] += len(reply)
            wire["down_messages"] += 1
            seconds["server_handle_s"] += time.perf_counter() - arrived
            return reply
        finally:
            session.leave(request.seq)

    def _run(self, session: ClientSession, request: Request, context: grpc.ServicerContext) -> bytes:
        scheduler = session.scheduler
        if _takes_still_wanted(type(scheduler)):
            # A revoked token (its round timed out) trains nothing more, whatever it had queued.
            still_wanted = lambda: context.is_active() and not session.revoked  # noqa: E731
            outcome = scheduler.run(session.client, request.method, request.tensors, still_wanted=still_wanted)
        else:  # a scheduler written before still_wanted existed
            outcome = scheduler.run(session.client, request.method, request.tensors)
        if outcome.error is not None:
            raise _error_to_abort(request.method, outcome.error, session.client)
        session.seconds["server_compute_s"] += outcome.compute_s
        session.seconds["server_queue_s"] += outcome.queue_wait_s
        try:
            if request.no_reply:
                check_value(outcome.value)  # a return value no call form could carry is a bug either way
            value = None if request.no_reply else outcome.value
            reply = encode_reply(value, server_compute_s=outcome.compute_s, queue_wait_s=outcome.queue_wait_s)
        except CodecError as err:
            raise _Abort(
                grpc.StatusCode.INTERNAL,
                ErrorKind.COMPUTATION,
                f"it ran (what it changed stays changed), but its return value cannot be sent: {err}",
            ) from err
        if len(reply) > self.max_message_bytes:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                ErrorKind.TOO_LARGE,
                f"its reply is {len(reply)} bytes, over the limit of "
                f"{self.max_message_bytes}; raise max_message_bytes or return less",
            )
        return reply


def _serve_notice(session: ClientSession, frame: bytes) -> bytes:
    """A notice that a request will not come: it takes no turn in the client's order."""
    request = _decoded(frame)
    if request.method != ABANDONED_METHOD:
        raise _invalid(f"the notice path takes {ABANDONED_METHOD} notices only, got {request.method!r}")
    session.abandon(request.seq)
    return encode_reply(None)


def _decoded(frame: bytes) -> Request:
    try:
        return decode_request(frame)
    except CodecError as err:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, ErrorKind.CORRUPT, f"corrupt request: {err}") from err


def _answer(abort: _Abort, context: grpc.ServicerContext) -> NoReturn:
    context.set_trailing_metadata(((ERROR_KIND_METADATA_KEY, abort.kind),))
    context.abort(abort.code, abort.message)
    raise abort  # unreachable: abort raises


class _Router(grpc.GenericRpcHandler):
    """Finds a call's handler from its method path alone, on gRPC's polling thread when the
    call's headers arrive. A path holding no live token finds none, and gRPC refuses the call
    there (UNIMPLEMENTED) without giving it a thread or reading its body; the proxy explains
    that status as a token not issued for the current round."""

    def __init__(self, routes: dict[str, grpc.RpcMethodHandler]) -> None:
        self._routes = routes

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._routes.get(handler_call_details.method)  # type: ignore[attr-defined]  # atomic under the GIL


@functools.cache
def _takes_still_wanted(scheduler_cls: type[Scheduler]) -> bool:
    parameters = inspect.signature(scheduler_cls.run).parameters.values()
    return any(p.name == "still_wanted" or p.kind is p.VAR_KEYWORD for p in parameters)


def _revoked() -> _Abort:
    return _Abort(grpc.StatusCode.UNAUTHENTICATED, ErrorKind.AUTH, "the token was revoked")


def _invalid(message: str) -> _Abort:
    return _Abort(grpc.StatusCode.INVALID_ARGUMENT, ErrorKind.INVALID_ARGUMENTS, message)


def _error_to_abort(method: str, error: BaseException, client: Hashable) -> _Abort:
    if isinstance(error, UnknownMethodError):
        return _Abort(grpc.StatusCode.UNIMPLEMENTED, ErrorKind.UNKNOWN_METHOD, str(error))
    if isinstance(error, InvalidArgumentsError):
        return _Abort(grpc.StatusCode.INVALID_ARGUMENT, ErrorKind.INVALID_ARGUMENTS, str(error))
    if isinstance(error, ServerModelTimeoutError):
        return _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, ErrorKind.TIMEOUT, str(error))
    logger.warning("[server] %s raised for client %s: %r", method, client, error, exc_info=error)
    return _Abort(
        grpc.StatusCode.INTERNAL,
        ErrorKind.COMPUTATION,
        f"raised {type(error).__name__}: {error}{_where(error)}",
    )


_LIBRARY_DIRS = tuple(
    {
        str(Path(path).resolve()) + os.sep
        for path in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], torch.__path__[0])
    }
)
_FRAMEWORK_DIR = Path(__file__).resolve().parent


def _where(error: BaseException) -> str:
    """`` (at FILE:LINE, in FUNCTION)``: the innermost frame of the traceback in algorithm or
    model code (not the standard library's, torch's or the framework's own modules), so that
    the caller sees which line failed; the file's name only (the server's folders are its own
    business); empty when there is none."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename).resolve()
        if not str(path).startswith(_LIBRARY_DIRS) and path.parent != _FRAMEWORK_DIR:
            return f" (at {path.name}:{frame.lineno}, in {frame.name})"
    return ""
