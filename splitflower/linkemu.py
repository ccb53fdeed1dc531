"""Link emulation: a TCP relay that gives each client's channel a rate and a delay.

The strategy hands each client the relay's address instead of the service's (see
``SplitStrategy(link=...)`` and ``ExperimentConfig.link``), so every byte a client
exchanges with its server model crosses an emulated link such as 10 Mbit/s up,
50 Mbit/s down and 20 ms round trip (``"10mbit/50mbit/20ms"``).

How each direction of each accepted connection is shaped: a reader thread takes what
arrives (in chunks of about 2 ms of transmission, at least one 1500-byte packet) and
queues it on an emulated link that transmits one chunk after another at the direction's
rate (a FIFO serialiser without burst allowance: a chunk starts when both it has arrived
and the previous one has left) and delivers it one-way delay (RTT / 2) after its last byte
left; a writer thread forwards each chunk to the other side at its delivery time. What
waits in the relay is bounded (bandwidth-delay product plus :data:`QUEUE_BYTES`); beyond
that the reader stops reading and TCP's flow control pushes back on the sender.

What it does not model: packet loss and retransmission; queueing delay caused by other
traffic (bufferbloat) beyond the bounded queue above; TCP slow start and congestion control
on a real bottleneck (the relay's own TCP legs run over loopback, so the emulated link is
"warm" from the first byte); a medium shared by several clients (each connection gets a
link of its own); jitter, reordering, asymmetric routing, MTU effects, and the CPU cost of
a real NIC. Timing granularity is a chunk (about 2 ms of transmission) plus the accuracy of
``time.sleep`` (tens of microseconds).

Example
-------
>>> spec = parse_link("10mbit/50mbit/20ms")
>>> spec.up_bytes_per_s, spec.down_bytes_per_s, spec.rtt_s
(1250000.0, 6250000.0, 0.02)
>>> with LinkEmulator("127.0.0.1:50051", spec) as link:  # doctest: +SKIP
...     proxy = ServerModelProxy(link.address, token)
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from splitflower.errors import ConfigError

__all__ = ["QUEUE_BYTES", "LinkEmulator", "LinkSpec", "parse_link"]

logger = logging.getLogger(__name__)

QUEUE_BYTES = 256 * 1024
"""Bytes a direction may hold beyond its bandwidth-delay product before it stops reading."""

_CHUNK_SECONDS = 0.002
_MIN_CHUNK = 1500
_MAX_CHUNK = 256 * 1024

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_RATE = re.compile(_NUMBER + r"\s*(bit|kbit|mbit|gbit)", re.IGNORECASE)
_TIME = re.compile(_NUMBER + r"\s*(us|ms|s)", re.IGNORECASE)
_FORMAT_HINT = (
    "expected UP/DOWN/RTT such as '10mbit/50mbit/20ms' (rates in bit, kbit, mbit or gbit; RTT in us, ms or s)"
)


@dataclass(frozen=True)
class LinkSpec:
    """A client link: rate each way (bytes per second) and round-trip time (seconds).

    Example
    -------
    >>> str(LinkSpec(1.25e6, 6.25e6, 0.02))
    '10mbit/50mbit/20ms'
    """

    up_bytes_per_s: float
    down_bytes_per_s: float
    rtt_s: float

    def __post_init__(self) -> None:
        for name in ("up_bytes_per_s", "down_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"link {name} must be positive, got {getattr(self, name)!r}")
        if not self.rtt_s >= 0:
            raise ConfigError(f"link rtt_s must be zero or positive, got {self.rtt_s!r}")

    def __str__(self) -> str:
        def rate(value: float) -> str:
            return f"{value * 8 / 1e6:g}mbit"

        return f"{rate(self.up_bytes_per_s)}/{rate(self.down_bytes_per_s)}/{self.rtt_s * 1e3:g}ms"


def parse_link(spec: str) -> LinkSpec:
    """Parse ``"UP/DOWN/RTT"``, e.g. ``"10mbit/50mbit/20ms"``; raise ConfigError saying what is wrong.

    Example
    -------
    >>> parse_link("1gbit/1gbit/0ms").rtt_s
    0.0
    """
    if not isinstance(spec, str):
        raise ConfigError(f"link must be a string, got {type(spec).__name__}; {_FORMAT_HINT}")
    parts = [p.strip() for p in spec.split("/")]
    if len(parts) != 3:
        raise ConfigError(f"link {spec!r} has {len(parts)} part(s); {_FORMAT_HINT}")
    rates: list[float] = []
    for label, part in zip(("up rate", "down rate"), parts[:2], strict=True):
        match = _RATE.fullmatch(part)
        if match is None:
            raise ConfigError(f"link {spec!r}: cannot read the {label} {part!r}; {_FORMAT_HINT}")
        bits = float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]
        if bits <= 0:
            raise ConfigError(f"link {spec!r}: the {label} must be positive, got {part!r}; {_FORMAT_HINT}")
        rates.append(bits / 8)
    match = _TIME.fullmatch(parts[2])
    if match is None:
        raise ConfigError(f"link {spec!r}: cannot read the round-trip time {parts[2]!r}; {_FORMAT_HINT}")
    return LinkSpec(rates[0], rates[1], float(match.group(1)) * _TIME_UNITS[match.group(2).lower()])


class _Direction:
    """One direction of one connection: read, serialise at ``rate``, delay, write."""

    def __init__(
        self, source: socket.socket, sink: socket.socket, rate: float, delay: float, name: str, on_done: _Done
    ) -> None:
        self.source, self.sink, self.rate, self.delay, self.name = source, sink, rate, delay, name
        self._on_done = on_done
        self.chunk = int(min(max(rate * _CHUNK_SECONDS, _MIN_CHUNK), _MAX_CHUNK))
        self.limit = int(rate * delay) + QUEUE_BYTES
        self._queue: deque[tuple[float, bytes]] = deque()
        self._queued = 0
        self._link_free_at = 0.0
        self._eof = False
        self._cond = threading.Condition()
        self.threads = [
            threading.Thread(target=self._read, name=f"linkemu-{name}-read", daemon=True),
            threading.Thread(target=self._write, name=f"linkemu-{name}-write", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.source.recv(self.chunk)
                if not data:
                    break
                now = time.monotonic()
                with self._cond:
                    start = max(now, self._link_free_at)
                    self._link_free_at = start + len(data) / self.rate
                    self._queue.append((self._link_free_at + self.delay, data))
                    self._queued += len(data)
                    self._cond.notify_all()
                    while self._queued > self.limit and not self._eof:
                        self._cond.wait()
        except OSError as err:
            logger.debug("[linkemu] %s: read ended: %s", self.name, err)
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._eof:
                        self._cond.wait()
                    if not self._queue:
                        break
                    deliver_at, data = self._queue[0]
                wait = deliver_at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.sink.sendall(data)
                with self._cond:
                    self._queue.popleft()
                    self._queued -= len(data)
                    self._cond.notify_all()
            self.sink.shutdown(socket.SHUT_WR)  # pass the sender's half-close on
        except OSError as err:
            logger.debug("[linkemu] %s: write ended: %s", self.name, err)
            with self._cond:
                self._eof = True  # unblock the reader; the connection is going away
                self._cond.notify_all()
            self._on_done(failed=True)
            return
        self._on_done(failed=False)


class _Done:
    """Closes a connection's two sockets once both directions are done (or one failed)."""

    def __init__(self, sockets: tuple[socket.socket, socket.socket]) -> None:
        self.sockets = sockets
        self._lock = threading.Lock()
        self._remaining = 2

    def __call__(self, *, failed: bool) -> None:
        with self._lock:
            self._remaining = 0 if failed else self._remaining - 1
            finished = self._remaining == 0
        if finished:
            _close_all(self.sockets)


def _close_all(sockets: tuple[socket.socket, ...] | list[socket.socket]) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected
        sock.close()


class LinkEmulator:
    """A TCP relay on ``host`` that forwards to ``target`` through an emulated link.

    Every accepted connection gets its own link (``spec``): up (towards ``target``) and
    down are shaped independently (see the module docstring for how, and what is not
    modelled). Bytes are forwarded unchanged; a half-close is passed on once everything
    before it has been delivered. :meth:`close` stops accepting and closes every
    connection.

    Example
    -------
    >>> link = LinkEmulator("127.0.0.1:50051", parse_link("10mbit/50mbit/20ms")).start()  # doctest: +SKIP
    >>> link.address  # doctest: +SKIP
    '127.0.0.1:40123'
    >>> link.close()  # doctest: +SKIP
    """

    def __init__(self, target: str, spec: LinkSpec, *, host: str = "127.0.0.1") -> None:
        target_host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"link emulator target must be HOST:PORT, got {target!r}")
        self.target = (target_host.strip("[]"), int(port))
        self.spec = spec
        self._host = host
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.connections = 0

    @property
    def address(self) -> str:
        """``HOST:PORT`` clients dial instead of the target."""
        if self._listener is None:
            raise RuntimeError("LinkEmulator.address is known once start() has run")
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> LinkEmulator:
        self._listener = socket.create_server((self._host, 0))
        accept = threading.Thread(target=self._accept, args=(self._listener,), name="linkemu-accept", daemon=True)
        self._threads.append(accept)
        accept.start()
        logger.info("[linkemu] %s -> %s:%d over %s", self.address, *self.target, self.spec)
        return self

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError as err:
                logger.warning("[linkemu] cannot reach %s:%d: %s", *self.target, err)
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            one_way = self.spec.rtt_s / 2
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self.connections += 1
                number = self.connections
                done = _Done((client, server))
                directions = (
                    _Direction(client, server, self.spec.up_bytes_per_s, one_way, f"{number}-up", done),
                    _Direction(server, client, self.spec.down_bytes_per_s, one_way, f"{number}-down", done),
                )
                self._sockets = [s for s in self._sockets if s.fileno() >= 0] + [client, server]
                self._threads = [t for t in self._threads if t.is_alive()]
                for direction in directions:
                    self._threads += direction.threads
            for direction in directions:
                direction.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and wait for the relay's threads."""
        with self._lock:
            self._closed = True
            sockets, threads = list(self._sockets), list(self._threads)
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone may not.
            _close_all([self._listener])
        _close_all(sockets)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
