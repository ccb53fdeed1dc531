"""Measurement: bytes per direction and method, what crossed the wire, peak memory, time.

Definitions (the results schema in the README refers to these):

* **payload bytes**: tensor data only, ``numel * element_size`` summed over the tensors of
  a call, as the decoupled-SL paper counts communication.
* **wire bytes**: the bytes of each gRPC message splitflower sends (frame header, tensor
  table, alignment padding and data) plus gRPC's 5-byte length prefix. HTTP/2 and TCP
  framing are not visible to the application; ``benchmarks/transport.py`` measures them
  with a counting TCP relay and records the ratio.
* **memory tally** (CPU; deterministic): bytes of parameters + gradients + optimizer state
  of the party's modules, plus the peak of live autograd-saved tensors (counted once per
  storage through :func:`torch.autograd.graph.saved_tensors_hooks`), plus the encoded
  requests still in flight (whole frames, header included: the process holds them until
  they are answered). On CUDA the allocator's ``max_memory_allocated`` is reported
  as well. Process peak RSS (``ru_maxrss``) is reported beside it; in simulation several
  virtual clients share a process, so RSS is per process, not per client.
* **time**: wall time of the party's work, split into compute and time blocked on the
  channel; the server reports its compute time in each reply so that the client can split
  blocked time into server compute and communication (incl. queueing).
"""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from splitflower.codec import payload_bytes
from splitflower.errors import StaleGraphError
from splitflower.wire import MetricKey

__all__ = [
    "GRPC_PREFIX_BYTES",
    "TrafficMeter",
    "MemoryTally",
    "TimeMeter",
    "peak_rss_bytes",
    "module_state_bytes",
]

GRPC_PREFIX_BYTES = 5


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_state_bytes(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of parameters, their gradients and the optimizer's tensors."""
    total = 0
    for module in modules:
        for param in module.parameters():
            total += param.numel() * param.element_size()
            if param.grad is not None:
                total += param.grad.numel() * param.grad.element_size()
        total += payload_bytes(list(module.buffers()))
    if optimizer is not None:
        for state in optimizer.state.values():
            total += payload_bytes([v for v in state.values() if isinstance(v, torch.Tensor)])
    return total


@dataclass
class _Direction:
    calls: int = 0
    payload: int = 0
    wire: int = 0


@dataclass
class TrafficMeter:
    """Counts bytes per direction and method and records the wire manifest.

    Thread-safe: gRPC callbacks record from their own threads.

    Example
    -------
    >>> meter = TrafficMeter()
    >>> meter.record("up", "forward", {"z": torch.ones(4)}, frame_bytes=64)
    >>> meter.totals()["up_payload_bytes"]
    16
    """

    _by_method: dict[tuple[str, str], _Direction] = field(default_factory=dict)
    _manifest: dict[tuple[str, str, str, torch.dtype, tuple[int, ...]], list[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, direction: str, method: str, tensors: Mapping[str, torch.Tensor], *, frame_bytes: int) -> None:
        """Count one message of ``frame_bytes`` carrying ``tensors`` in ``direction``."""
        with self._lock:
            entry = self._by_method.get((direction, method))
            if entry is None:
                entry = self._by_method[(direction, method)] = _Direction()
            entry.calls += 1
            entry.wire += frame_bytes + GRPC_PREFIX_BYTES
            for name, tensor in tensors.items():
                nbytes = tensor.nbytes
                entry.payload += nbytes
                key = (direction, method, name, tensor.dtype, tensor.shape[1:])
                seen = self._manifest.get(key)
                if seen is None:
                    seen = self._manifest[key] = [0, 0]
                seen[0] += 1
                seen[1] += nbytes

    def totals(self) -> dict[str, int]:
        """Flat totals: ``{up,down}_{payload,wire}_bytes`` and ``{up,down}_messages``."""
        out = {f"{d}_{k}": 0 for d in ("up", "down") for k in ("payload_bytes", "wire_bytes", "messages")}
        with self._lock:
            for (direction, _), entry in self._by_method.items():
                out[f"{direction}_payload_bytes"] += entry.payload
                out[f"{direction}_wire_bytes"] += entry.wire
                out[f"{direction}_messages"] += entry.calls
        return out

    def by_method(self) -> dict[str, dict[str, int]]:
        """``{method: {up_payload_bytes, up_wire_bytes, up_messages, down_...}}``."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for (direction, method), entry in self._by_method.items():
                slot = out.setdefault(method, {})
                slot[f"{direction}_payload_bytes"] = entry.payload
                slot[f"{direction}_wire_bytes"] = entry.wire
                slot[f"{direction}_messages"] = entry.calls
        return out

    def manifest(self) -> list[dict[str, object]]:
        """Every distinct (direction, method, tensor name, dtype, per-sample shape) seen,
        with how many messages carried it and its payload bytes in total."""
        with self._lock:
            items = sorted(
                ((d, m, n, str(t).removeprefix("torch."), tuple(s)), list(v))
                for (d, m, n, t, s), v in self._manifest.items()
            )
        return [
            {
                "direction": d,
                "method": m,
                "name": n,
                "dtype": t,
                "sample_shape": list(s),
                "count": c,
                "payload_bytes": b,
            }
            for (d, m, n, t, s), (c, b) in items
        ]


class _SavedHandle:
    """Stands for one autograd-saved tensor; releases its bytes when autograd drops it."""

    __slots__ = ("key", "nbytes", "tally", "tensor", "version")

    def __init__(self, tally: MemoryTally, tensor: torch.Tensor, key: int, nbytes: int) -> None:
        self.tally, self.tensor, self.key, self.nbytes = tally, tensor, key, nbytes
        self.version = tensor._version

    def __del__(self) -> None:
        self.tally._release(self.key, self.nbytes)


class MemoryTally:
    """Deterministic tally of a party's training memory (see the module docstring).

    Use :meth:`track` around forward/backward work; :meth:`observe_state` after optimizer
    steps; :meth:`add_in_flight` for the frames of outstanding requests.

    Example
    -------
    >>> tally = MemoryTally()
    >>> layer = nn.Linear(4, 4)
    >>> with tally.track():
    ...     layer(torch.ones(8, 4, requires_grad=True)).sum().backward()
    >>> tally.observe_state([layer], None)
    >>> tally.peak_bytes > 0
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._storages: Counter[int] = Counter()
        self._saved = 0
        self._in_flight = 0
        self._state = 0
        self.peak_saved_bytes = 0
        self.peak_state_bytes = 0
        self.peak_in_flight_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _update_peak(self) -> None:
        self.peak_saved_bytes = max(self.peak_saved_bytes, self._saved)
        self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self._in_flight)
        self.peak_bytes = max(self.peak_bytes, self._state + self._saved + self._in_flight)

    def _pack(self, tensor: torch.Tensor) -> _SavedHandle:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        with self._lock:
            if self._storages[key] == 0:
                self._saved += nbytes
            self._storages[key] += 1
            self._update_peak()
        return _SavedHandle(self, tensor, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        with self._lock:
            self._storages[key] -= 1
            if self._storages[key] == 0:
                del self._storages[key]
                self._saved -= nbytes

    @staticmethod
    def _unpack(handle: _SavedHandle) -> torch.Tensor:
        # With saved-tensor hooks installed, torch no longer checks that a saved tensor is
        # unchanged when backward reads it; without this check, a stale graph (say, one kept
        # across another client's optimizer step) would give wrong gradients silently.
        if handle.tensor._version != handle.version:
            raise StaleGraphError(
                f"a tensor autograd saved for backward ({list(handle.tensor.shape)}, {handle.tensor.dtype}) "
                f"was modified by an inplace operation after it was saved (version {handle.version}, now "
                f"{handle.tensor._version}), so its gradients would be wrong; backpropagate before changing "
                "it (e.g. before an optimizer step on weights the graph uses), or clone it"
            )
        return handle.tensor

    def track(self, holding: int = 0) -> _Tracking:
        """Count tensors autograd saves for backward while the block runs, and ``holding``
        bytes of inputs in flight. Not re-entrant from two threads at once."""
        return _Tracking(self, holding)

    def observe_state(self, modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
        """Record the current parameter + gradient + optimizer-state bytes."""
        state = module_state_bytes(modules, optimizer)
        with self._lock:
            self._state = state
            self.peak_state_bytes = max(self.peak_state_bytes, state)
            self._update_peak()

    def add_in_flight(self, nbytes: int) -> None:
        """Count (or, negative, release) the bytes of encoded requests not yet answered."""
        with self._lock:
            self._in_flight += nbytes
            self._update_peak()

    def summary(self, prefix: str) -> dict[str, float]:
        """Peak figures as flat metrics named ``{prefix}_...``."""
        figures = (self.peak_bytes, self.peak_saved_bytes, self.peak_state_bytes, self.peak_in_flight_bytes)
        values = [*figures, peak_rss_bytes()]
        out = {f"{prefix}_{name}": float(v) for name, v in zip(MetricKey.MEMORY_FIGURES, values, strict=True)}
        if torch.cuda.is_available():
            out[f"{prefix}_cuda_max_allocated_bytes"] = float(torch.cuda.max_memory_allocated())
        return out


class _Tracking:
    """``with tally.track():`` as a plain class: this runs once per server call."""

    __slots__ = ("holding", "tally")

    def __init__(self, tally: MemoryTally, holding: int) -> None:
        self.tally, self.holding = tally, holding

    def __enter__(self) -> None:
        if self.holding:
            self.tally.add_in_flight(self.holding)
        self.tally._hooks.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.tally._hooks.__exit__(*exc)
        if self.holding:
            self.tally.add_in_flight(-self.holding)


class TimeMeter:
    """Accumulates named durations; ``with meter.measure("blocked"): ...``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    def add_all(self, **seconds: float) -> None:
        """Several durations under one lock acquisition."""
        with self._lock:
            for name, value in seconds.items():
                self.seconds[name] += value

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)
