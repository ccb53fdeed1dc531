"""Transport benchmark: what splitflower's gRPC channel costs over bare gRPC and one process.

Run from the repository root::

    .venv/bin/python benchmarks/transport.py            # full run (about 3 minutes on 2 cores)
    .venv/bin/python benchmarks/transport.py --quick    # smoke run (about 15-30 s)

It prints its figures with PASS/FAIL beside each target, writes them as JSON to
``<out-dir>/transport-<short commit>[-dirty].json`` and overwrites
``<out-dir>/transport.md`` with the latest table (``--out-dir`` defaults to
``benchmarks/results``). Both record the git commit (``-dirty`` when ``git status
--porcelain`` shows changes outside ``benchmarks/results``), the date, the machine (CPU count, platform, Python, torch,
grpcio, torch threads) and the exact command line. It is a report, not a test: it exits 0
whether the targets pass or fail, and non-zero only when something breaks.

What is measured, and how
-------------------------
Every server runs in ONE separate server process (multiprocessing, "spawn" context), so
client and server never contend for one GIL; the server process reports its ports over a
Pipe and issues session tokens on request. The client process dials its own channels.

1. **Round-trip time** of one blocking call carrying one float32 tensor of 1 KiB, 64 KiB,
   1 MiB and 8 MiB that the server echoes back: ``proxy.echo(x=tensor)`` against a
   :class:`~splitflower.service.SplitService` hosting a ServerModel whose ``echo(x)``
   returns ``x`` (ImmediateScheduler), beside a *bare gRPC echo* of the same number of
   bytes: a plain ``grpc.server`` with a generic unary-unary handler (no serializers, raw
   bytes) returning the request, called as ``channel.unary_unary(path)(payload)``. The
   bare server is gRPC as usually deployed, a ``ThreadPoolExecutor`` of the split
   service's pool size with its options (captured from ``SplitService.start`` while it
   builds its server), and the bare channel gets the proxy's options (captured the same
   way). After a warm-up, the
   two are measured in alternating blocks (6 blocks; the first variant alternates between
   blocks); the median and p90 per size are in microseconds, and the ratio is
   proxy median / bare median. Targets: 1 KiB <= 1.2, 8 MiB <= 1.3. A third variant in the
   same blocks, *codec alone*, encodes a request frame, has a handler on the bare server
   decode it and encode the tensor back, and decodes the reply: the floor for moving torch
   tensors through splitflower's codec, with none of its sessions, ordering, scheduling or
   accounting (reported as ``codec_ratio``).

2. **Wire bytes / payload bytes** at the TCP level: the client dials a counting TCP relay
   on 127.0.0.1 (a threaded socket forwarder) instead of the server; the relay counts the
   TCP stream bytes in both directions (HTTP/2 frames and everything inside them; TCP/IP
   packet headers are not counted, they depend on segmentation). After a warm-up, a fixed
   number of calls runs through the relay, and the TCP bytes are divided by the payload
   bytes (proxy: tensor bytes up + tensor bytes down; bare: request + reply bytes).
   splitflower's own accounting (``proxy.traffic.totals()``: frame + 5-byte gRPC prefix
   vs tensor bytes) is reported beside it. Targets (proxy): <= 1.10 at 1 KiB, <= 1.01
   from 64 KiB up.

3. **CSL training-step ratio**: ResNet-20 (3x32x32 random inputs, 10 classes, batch 64,
   SGD lr 0.01 momentum 0.9), cut after stage 1 (client: stem + block0..block2). (a) One
   process: forward, loss, backward and step of the unsplit model. (b) Split: the server
   process hosts a ``CSLServerModel(top)`` (``configure_fit(None, {"lr": 0.01})``) behind
   an ImmediateScheduler; the client process runs ``z = bottom(x); grad =
   proxy.forward_backward(embeddings=z, labels=y); zero_grad; z.backward(grad); step``
   with its own SGD over ``bottom``. Both processes use the same ``torch.set_num_threads``
   (torch's default on this machine unless ``--threads`` is given). CSL is sequential, so
   in (b) the client and server processes take turns on the cores rather than competing
   for them. After a warm-up, the two variants run in alternating blocks; the target is
   median split step / median one-process step <= 1.07. A bare gRPC echo of the cut
   activations' bytes (what a CSL step sends up and gets back) is timed in the same blocks;
   ``(one-process + bare echo) / one-process`` is the ratio that even bare gRPC could not
   beat on this machine (reported as ``bare_floor_ratio``). A reference split step over bare
   gRPC runs in the same blocks: the cut activations and labels go up as raw bytes, a
   handler on the bare server runs the server half on the server's compute thread and
   returns the gradient's raw bytes (``bare_split_ratio``: what two processes taking turns
   cost on this machine without any of splitflower; ``split_over_bare_split``: what
   splitflower adds to that). Phases: the split step's client forward, time blocked on the
   server, the server's compute and the client's backward + step are timed beside the same
   computation cut at the same layer in one process, once straight through and once with the
   OpenMP workers released and a 5 ms sleep between the phases (does waiting itself slow the
   next phase?), and once with the server half run on a compute thread of its own, as in the
   server process (does the thread it runs on matter?). Minor page faults per split step of
   both processes follow the timed blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import inspect
import json
import multiprocessing as mp
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from torch import nn

from splitflower._malloc import KEEP_DEFAULTS_ENV
from splitflower._openmp import KEEP_SPINNING_ENV, release_openmp_workers
from splitflower.algorithms.csl import CSLServerModel
from splitflower.codec import decode_reply, decode_request, encode_reply, encode_request
from splitflower.compute import ComputeThread, run_on_compute_thread
from splitflower.models import resnet20
from splitflower.proxy import ServerModelProxy
from splitflower.results import source_commit
from splitflower.scheduling import ImmediateScheduler
from splitflower.server_model import ServerModel
from splitflower.service import SplitService
from splitflower.split import split_model
from splitflower.wire import DEFAULT_MAX_MESSAGE_BYTES

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"

BARE_SERVICE = "splitflower.bench.BareEcho"
BARE_METHOD = "Echo"
BARE_PATH = f"/{BARE_SERVICE}/{BARE_METHOD}"
# Two references served beside the bare echo, on the same gRPC server: the codec alone, and a
# CSL step done over bare gRPC with nothing of splitflower but its compute thread.
CODEC_METHOD = "CodecEcho"
CODEC_PATH = f"/{BARE_SERVICE}/{CODEC_METHOD}"
BARE_SPLIT_METHOD = "BareSplitStep"
BARE_SPLIT_PATH = f"/{BARE_SERVICE}/{BARE_SPLIT_METHOD}"

KIB = 1024
SERVER_ERROR = "error"  # the key of a failure report from a server process to the benchmark
MIB = 1024 * 1024
SIZES: tuple[int, ...] = (KIB, 64 * KIB, MIB, 8 * MIB)

RTT_TARGETS: dict[int, float] = {KIB: 1.2, 8 * MIB: 1.3}
WIRE_TARGETS: dict[int, float] = {KIB: 1.10, 64 * KIB: 1.01, MIB: 1.01, 8 * MIB: 1.01}
CSL_TARGET = 1.07
PHASE_PAUSE_S = 0.005  # between the phases of the paused one-process reference

CSL_BATCH = 64
CSL_CUT = 4  # stem + block0..block2 = through stage 1 of ResNet-20
CSL_LR = 0.01
CSL_MOMENTUM = 0.9
SEED = 0

# Environment variables that change what is measured (thread pools, OpenMP waiting, glibc malloc).
TUNING_ENV = (
    KEEP_SPINNING_ENV,
    KEEP_DEFAULTS_ENV,
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
)


@dataclass(frozen=True)
class Plan:
    """Iteration counts of one run."""

    rtt_calls: dict[int, int]  # per variant, split over the blocks
    rtt_warmup: dict[int, int]
    blocks: int
    wire_calls: dict[int, int]
    wire_warmup: int
    csl_steps: int  # per variant, split over the blocks
    csl_blocks: int
    csl_warmup: int
    csl_fault_steps: int  # split steps whose page faults are counted (they vary from step to step)


FULL_PLAN = Plan(
    rtt_calls={KIB: 10000, 64 * KIB: 5000, MIB: 1500, 8 * MIB: 200},
    rtt_warmup={KIB: 300, 64 * KIB: 200, MIB: 50, 8 * MIB: 10},
    blocks=6,
    wire_calls={KIB: 200, 64 * KIB: 200, MIB: 200, 8 * MIB: 50},
    wire_warmup=10,
    csl_steps=120,
    csl_blocks=12,
    csl_warmup=6,
    csl_fault_steps=30,
)
QUICK_PLAN = Plan(
    rtt_calls={KIB: 200, 64 * KIB: 100, MIB: 20, 8 * MIB: 4},
    rtt_warmup={KIB: 20, 64 * KIB: 10, MIB: 4, 8 * MIB: 2},
    blocks=2,
    wire_calls={KIB: 20, 64 * KIB: 20, MIB: 10, 8 * MIB: 4},
    wire_warmup=3,
    csl_steps=4,
    csl_blocks=2,
    csl_warmup=2,
    csl_fault_steps=2,
)


def size_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


# --------------------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------------------


class EchoModel(ServerModel):
    """A server model whose one remote method sends its argument straight back."""

    def echo(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _echo_bytes(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


@contextmanager
def _spy(name: str, seen: dict[str, Any]) -> Iterator[None]:
    """Record the arguments of ``grpc.<name>(...)`` calls made while the block runs."""
    real = getattr(grpc, name)
    signature = inspect.signature(real)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(signature.bind_partial(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    setattr(grpc, name, spy)
    try:
        yield
    finally:
        setattr(grpc, name, real)


def _codec_echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Decode a request frame and encode its first tensor as the reply: the codec, nothing else."""
    return encode_reply(next(iter(decode_request(request).tensors.values())))


class _BareSplitTop:
    """The server half of a CSL step over bare gRPC: raw cut bytes + labels in, raw gradient
    bytes out, computed on the process's compute thread like a ServerModel's methods. It
    repeats CSLServerModel.forward_backward's computation by hand so that the reference
    carries none of splitflower's per-step memory accounting (checked equal before timing)."""

    def __init__(self) -> None:
        _, bottom, self.top = _csl_halves(SEED)
        with torch.no_grad():
            self.cut_shape = (CSL_BATCH, *bottom(torch.zeros(1, 3, 32, 32)).shape[1:])
        self.cut_numel = int(np.prod(self.cut_shape))
        self.optimizer = torch.optim.SGD(self.top.parameters(), lr=CSL_LR, momentum=CSL_MOMENTUM)

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return run_on_compute_thread(self._step, request)

    def _step(self, request: bytes) -> bytes:
        z = torch.frombuffer(request, dtype=torch.float32, count=self.cut_numel).view(self.cut_shape)
        z.requires_grad_()
        labels = torch.frombuffer(request, dtype=torch.int64, offset=4 * self.cut_numel)
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.top(z), labels).backward()
        self.optimizer.step()
        if z.grad is None:
            raise RuntimeError("the bare split step produced no gradient for the cut activations")
        return z.grad.numpy().tobytes()


def _start_bare_echo(options: Sequence[tuple[str, Any]], max_workers: int) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(max_workers, "bare-echo"), options=list(options))
    handlers = {
        BARE_METHOD: grpc.unary_unary_rpc_method_handler(_echo_bytes),
        CODEC_METHOD: grpc.unary_unary_rpc_method_handler(_codec_echo),
        BARE_SPLIT_METHOD: grpc.unary_unary_rpc_method_handler(run_on_compute_thread(_BareSplitTop)),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BARE_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        raise RuntimeError("bare echo server could not bind a port")
    server.start()
    return server, port


def _csl_halves(seed: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The same ResNet-20 in every process: (whole model, bottom, top)."""
    torch.manual_seed(seed)
    model = resnet20(num_classes=10, in_channels=3)
    bottom, top = split_model(model, CSL_CUT)
    return model, bottom, top


def _csl_server_model(seed: int) -> CSLServerModel:
    _, _, top = _csl_halves(seed)
    server_model = CSLServerModel(top)
    server_model.configure_fit(None, {"lr": CSL_LR})
    return server_model


def server_main(conn: Connection, threads: int) -> None:
    """Entry point of the server process: bare echo + SplitService, sessions on request."""
    service: SplitService | None = None
    bare: grpc.Server | None = None
    try:
        torch.set_num_threads(threads)
        service = SplitService("127.0.0.1", 0, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
        seen: dict[str, Any] = {}
        with _spy("server", seen):
            service.start()
        options = list(seen.get("options") or [])
        pool = seen.get("thread_pool")
        workers = int(getattr(pool, "_max_workers", 64))
        bare, bare_port = _start_bare_echo(options, workers)
        conn.send(
            {
                "service": service.address,
                "bare": f"127.0.0.1:{bare_port}",
                "server_options": [list(o) for o in options],
                "server_pool": f"{type(pool).__name__}(max_workers={workers})",
                "torch_threads": torch.get_num_threads(),
            }
        )
        opened = 0
        while True:
            command, *args = conn.recv()
            if command == "stop":
                conn.send("stopped")
                break
            opened += 1
            if command == "open-echo":
                token, _ = service.open_session(("echo", opened), ImmediateScheduler(EchoModel(nn.Identity())))
            elif command == "open-csl":
                # As SplitStrategy does: build and configure server models on the compute thread.
                server_model = run_on_compute_thread(_csl_server_model, int(args[0]))
                token, _ = service.open_session(("csl", opened), ImmediateScheduler(server_model))
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(token)
    except BaseException:
        try:
            conn.send({SERVER_ERROR: traceback.format_exc()})
        except OSError:
            pass
        raise
    finally:
        if bare is not None:
            bare.stop(0.5).wait()
        if service is not None:
            service.stop(0.5)
        conn.close()


class ServerProcess:
    """The spawned server process and the pipe to it: ``target(conn, *args)`` (by default this
    benchmark's :func:`server_main`) sends what it serves first (``info``), answers "stop" with
    "stopped", and reports a failure as ``{SERVER_ERROR: traceback}``."""

    def __init__(self, *args: Any, target: Callable[..., None] = server_main) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, *args), name="transport-server")
        self.process.start()
        child.close()
        try:
            self.info: dict[str, Any] = self._receive(timeout=120)
        except BaseException:
            self.stop()
            raise

    def _receive(self, timeout: float = 60) -> Any:
        if not self._conn.poll(timeout):
            raise RuntimeError(f"server process did not answer within {timeout}s")
        reply = self._conn.recv()
        if isinstance(reply, dict) and SERVER_ERROR in reply:
            raise RuntimeError(f"server process failed:\n{reply[SERVER_ERROR]}")
        return reply

    def ask(self, *command: object) -> Any:
        self._conn.send(command)
        return self._receive()

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.ask("stop")
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
            self._conn.close()


# --------------------------------------------------------------------------------------
# Client side helpers
# --------------------------------------------------------------------------------------


class CountingRelay:
    """A TCP forwarder on 127.0.0.1 that counts the stream bytes in each direction."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.up = 0
        self.down = 0
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            for sock in (downstream, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [downstream, upstream]
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, is_up: bool) -> None:
        buffer = bytearray(4 * MIB)
        view = memoryview(buffer)
        try:
            while True:
                n = source.recv_into(buffer)
                if n == 0:
                    break
                # Count before forwarding, so a reply the client has received is counted.
                with self._lock:
                    if is_up:
                        self.up += n
                    else:
                        self.down += n
                sink.sendall(view[:n])
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass


def _summary(samples_us: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(samples_us, dtype=np.float64)
    return float(np.median(values)), float(np.percentile(values, 90))


def _timed(call: Callable[[], object], n: int, untimed: Callable[[], object] | None = None) -> list[float]:
    """Durations of ``n`` calls in microseconds (each after ``untimed()``, if given)."""
    clock = time.perf_counter_ns
    out: list[float] = []
    for _ in range(n):
        if untimed is not None:
            untimed()
        start = clock()
        call()
        out.append((clock() - start) / 1000.0)
    return out


@dataclass
class Samples:
    """Durations (microseconds) of each variant, and the median of each of its blocks."""

    all: dict[str, list[float]]
    block_medians: dict[str, list[float]]

    def __getitem__(self, name: str) -> list[float]:
        return self.all[name]


def _interleaved(
    calls: dict[str, Callable[[], object]],
    total: int,
    blocks: int,
    untimed: Mapping[str, Callable[[], object]] | None = None,
) -> Samples:
    """Run each variant ``total`` times in ``blocks`` alternating blocks; first variant alternates.
    ``untimed[name]``, if given, runs before each of that variant's calls, outside the timing."""
    names = list(calls)
    samples = Samples({name: [] for name in names}, {name: [] for name in names})
    per_block = [total // blocks + (1 if b < total % blocks else 0) for b in range(blocks)]
    for b, n in enumerate(per_block):
        order = names if b % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            block = _timed(calls[name], n, (untimed or {}).get(name))
            samples.all[name] += block
            samples.block_medians[name].append(round(float(np.median(block)), 1))
    return samples


def _bare_channel(address: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    return grpc.insecure_channel(address, options=list(options))


def _proxy_channel_options(address: str) -> list[tuple[str, Any]]:
    """The options ServerModelProxy gives its channel (captured while one is built)."""
    seen: dict[str, Any] = {}
    with _spy("insecure_channel", seen):
        probe = ServerModelProxy(address, b"\0" * 16, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
    probe._channel.close()  # never used: closing it directly sends nothing to the server
    return list(seen.get("options") or [])


def _proxy(server: ServerProcess, address: str, command: str, *args: object) -> ServerModelProxy:
    token: bytes = server.ask(command, *args)
    return ServerModelProxy(address, token, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)


def _proxy_echo(proxy: ServerModelProxy, tensor: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        return proxy.echo(x=tensor)  # attribute lookup per call, as in real use

    return call


def _codec_echo_call(codec_call: Callable[..., bytes], tensor: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        return decode_reply(codec_call(encode_request(0, "echo", {"x": tensor}))).value

    return call


def _payload(size: int) -> tuple[torch.Tensor, bytes]:
    generator = torch.Generator().manual_seed(size)
    tensor = torch.randn(size // 4, generator=generator, dtype=torch.float32)
    return tensor, tensor.numpy().tobytes()


# --------------------------------------------------------------------------------------
# 1. Round-trip time
# --------------------------------------------------------------------------------------


def measure_rtt(server: ServerProcess, plan: Plan, channel_options: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    proxy = _proxy(server, server.info["service"], "open-echo")
    channel = _bare_channel(server.info["bare"], channel_options)
    bare_call = channel.unary_unary(BARE_PATH)
    codec_call = channel.unary_unary(CODEC_PATH)
    rows: list[dict[str, Any]] = []
    try:
        for size in SIZES:
            tensor, raw = _payload(size)
            echoed = proxy.echo(x=tensor)
            if not isinstance(echoed, torch.Tensor) or not torch.equal(echoed, tensor):
                raise RuntimeError(f"proxy echo of {size_label(size)} came back different")
            if bare_call(raw) != raw:
                raise RuntimeError(f"bare echo of {size_label(size)} came back different")
            codec_echo = _codec_echo_call(codec_call, tensor)
            if not torch.equal(codec_echo(), tensor):
                raise RuntimeError(f"codec echo of {size_label(size)} came back different")
            variants: dict[str, Callable[[], object]] = {
                "bare": functools.partial(bare_call, raw),
                "proxy": _proxy_echo(proxy, tensor),
                "codec": codec_echo,
            }
            for call in variants.values():
                _timed(call, plan.rtt_warmup[size])
            samples = _interleaved(variants, plan.rtt_calls[size], plan.blocks)
            bare_median, bare_p90 = _summary(samples["bare"])
            proxy_median, proxy_p90 = _summary(samples["proxy"])
            codec_median, _ = _summary(samples["codec"])
            ratio = proxy_median / bare_median
            target = RTT_TARGETS.get(size)
            row: dict[str, Any] = {
                "size_bytes": size,
                "size": size_label(size),
                "calls_per_variant": plan.rtt_calls[size],
                "blocks": plan.blocks,
                "bare_median_us": round(bare_median, 1),
                "bare_p90_us": round(bare_p90, 1),
                "proxy_median_us": round(proxy_median, 1),
                "proxy_p90_us": round(proxy_p90, 1),
                "ratio": round(ratio, 3),
                "target": target,
                "pass": None if target is None else ratio <= target,
                "codec_median_us": round(codec_median, 1),
                "codec_ratio": round(codec_median / bare_median, 3),
                "bare_block_medians_us": samples.block_medians["bare"],
                "proxy_block_medians_us": samples.block_medians["proxy"],
                "codec_block_medians_us": samples.block_medians["codec"],
            }
            rows.append(row)
            print(
                f"  {row['size']:>7}: bare {bare_median:10.1f} us (p90 {bare_p90:10.1f})  "
                f"proxy {proxy_median:10.1f} us (p90 {proxy_p90:10.1f})  ratio {ratio:6.3f}  "
                f"{_verdict(row['pass'], target, '<=')}  (codec alone {row['codec_ratio']:.3f})",
                flush=True,
            )
    finally:
        proxy.close()
        channel.close()
    return rows


def _verdict(passed: bool | None, target: float | None, op: str) -> str:
    if passed is None or target is None:
        return "(no target)"
    return f"target {op} {target:g}: {'PASS' if passed else 'FAIL'}"


# --------------------------------------------------------------------------------------
# 2. Wire bytes through a counting relay
# --------------------------------------------------------------------------------------


def _settle() -> None:
    # Let trailing control frames (WINDOW_UPDATE, PING acks) cross the relay.
    time.sleep(0.2)


def measure_wire(server: ServerProcess, plan: Plan, channel_options: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    proxy_relay = CountingRelay(server.info["service"])
    bare_relay = CountingRelay(server.info["bare"])
    proxy = _proxy(server, proxy_relay.address, "open-echo")
    channel = _bare_channel(bare_relay.address, channel_options)
    bare_call = channel.unary_unary(BARE_PATH)
    rows: list[dict[str, Any]] = []
    try:
        for size in SIZES:
            tensor, raw = _payload(size)
            n = plan.wire_calls[size]
            for _ in range(plan.wire_warmup):
                bare_call(raw)
                proxy.echo(x=tensor)
            _settle()

            before = sum(bare_relay.counts())
            for _ in range(n):
                bare_call(raw)
            _settle()
            bare_tcp = sum(bare_relay.counts()) - before
            bare_payload = 2 * len(raw) * n

            before = sum(proxy_relay.counts())
            accounted_before = proxy.traffic.totals()
            for _ in range(n):
                proxy.echo(x=tensor)
            _settle()
            proxy_tcp = sum(proxy_relay.counts()) - before
            accounted_after = proxy.traffic.totals()
            tensor_bytes = tensor.numel() * tensor.element_size()
            proxy_payload = 2 * tensor_bytes * n
            acc = {k: accounted_after[k] - accounted_before[k] for k in accounted_after}
            acc_wire = acc["up_wire_bytes"] + acc["down_wire_bytes"]
            acc_payload = acc["up_payload_bytes"] + acc["down_payload_bytes"]

            ratio = proxy_tcp / proxy_payload
            target = WIRE_TARGETS.get(size)
            row: dict[str, Any] = {
                "size_bytes": size,
                "size": size_label(size),
                "calls": n,
                "bare_tcp_bytes": bare_tcp,
                "bare_payload_bytes": bare_payload,
                "bare_ratio": round(bare_tcp / bare_payload, 5),
                "bare_overhead_bytes_per_call": round((bare_tcp - bare_payload) / n, 1),
                "proxy_tcp_bytes": proxy_tcp,
                "proxy_payload_bytes": proxy_payload,
                "proxy_ratio": round(ratio, 5),
                "proxy_overhead_bytes_per_call": round((proxy_tcp - proxy_payload) / n, 1),
                "accounted_wire_bytes": acc_wire,
                "accounted_payload_bytes": acc_payload,
                "accounted_ratio": round(acc_wire / acc_payload, 5) if acc_payload else None,
                "target": target,
                "pass": None if target is None else ratio <= target,
            }
            rows.append(row)
            print(
                f"  {row['size']:>7}: bare {row['bare_ratio']:.4f} "
                f"(+{row['bare_overhead_bytes_per_call']:.0f} B/call)  proxy {ratio:.4f} "
                f"(+{row['proxy_overhead_bytes_per_call']:.0f} B/call)  splitflower-accounted "
                f"{row['accounted_ratio']:.4f}  {_verdict(row['pass'], target, '<=')}",
                flush=True,
            )
    finally:
        proxy.close()
        channel.close()
        proxy_relay.close()
        bare_relay.close()
    return rows


# --------------------------------------------------------------------------------------
# 3. CSL training step
# --------------------------------------------------------------------------------------


class Phases:
    """Durations (ms) of a step's phases, by name: ``with phases("name"): ...``."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.ms.setdefault(name, []).append((time.perf_counter() - start) * 1000)

    def medians(self) -> dict[str, float]:
        return {name: round(float(np.median(values)), 2) for name, values in self.ms.items()}


def _no_phases(_: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def csl_split_step(
    proxy: ServerModelProxy,
    bottom: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    phases: Callable[[str], contextlib.AbstractContextManager[None]] = _no_phases,
) -> Callable[[], None]:
    """One CSL step through the proxy: forward the bottom, get dL/dz back, backpropagate, step."""

    def step() -> None:
        with phases("client_forward"):
            z = bottom(x)
        with phases("blocked_on_server"):
            grad = proxy.forward_backward(embeddings=z, labels=y)
        with phases("client_backward_step"):
            optimizer.zero_grad()
            z.backward(grad)
            optimizer.step()

    return step


def csl_one_process_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """One step of the unsplit model in this process: what the split step is measured against."""

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def _one_process_cut_step(
    bottom: nn.Module,
    top: nn.Module,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    x: torch.Tensor,
    y: torch.Tensor,
    phases: Phases,
    pause_s: float = 0.0,
    server_thread: ComputeThread | None = None,
) -> Callable[[], None]:
    """The split step's computation in one process, phase by phase: the bottom's forward, the
    top's forward, backward and step on detached cut activations, the bottom's backward and
    step. With ``pause_s``, the thread releases its OpenMP workers and sleeps that long between
    the phases, as a party waiting on the other would. With ``server_thread``, the top's phase
    runs on that thread, as it does on the server's compute thread, after this thread released
    its OpenMP workers, as a client does before a long wait (the compute thread releases its own
    when idle): one OpenMP team at a time, as in each of the two processes."""

    def wait() -> None:
        if pause_s:
            release_openmp_workers()
            time.sleep(pause_s)

    def server_half(z: torch.Tensor) -> torch.Tensor:
        cut = z.detach().requires_grad_()
        optimizers[1].zero_grad()
        nn.functional.cross_entropy(top(cut), y).backward()
        optimizers[1].step()
        if cut.grad is None:
            raise RuntimeError("the one-process cut step produced no gradient for the cut activations")
        return cut.grad

    def step() -> None:
        with phases("client_forward"):
            z = bottom(x)
        wait()
        if server_thread is None:
            with phases("server_half"):
                grad = server_half(z)
        else:
            release_openmp_workers()
            with phases("server_half"):
                grad = server_thread.run(server_half, z)
        wait()
        with phases("client_backward_step"):
            optimizers[0].zero_grad()
            z.backward(grad)
            optimizers[0].step()

    return step


def _minor_faults(pid: int) -> int:
    """Minor page faults of process ``pid`` so far (Linux /proc)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def fault_counter(server_pid: int) -> Callable[[int], dict[str, float]]:
    """Start counting minor page faults of this (client) process and the server process; the
    function returned gives them per step, for the number of steps run since."""
    client, server = _minor_faults(os.getpid()), _minor_faults(server_pid)

    def per_step(steps: int) -> dict[str, float]:
        return {
            "client": round((_minor_faults(os.getpid()) - client) / steps, 1),
            "server": round((_minor_faults(server_pid) - server) / steps, 1),
        }

    return per_step


def _faults_per_step(step: Callable[[], None], server_pid: int | None, steps: int) -> dict[str, float] | None:
    """Minor page faults per step in the client process and in the server process."""
    if server_pid is None or not Path("/proc/self/stat").exists():
        return None
    per_step = fault_counter(server_pid)
    for _ in range(steps):
        step()
    return per_step(steps)


def csl_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The CSL step's batch (inputs, labels): the same in every run."""
    generator = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(CSL_BATCH, 3, 32, 32, generator=generator)
    return x, torch.randint(0, 10, (CSL_BATCH,), generator=generator)


def _bare_split_request(z: torch.Tensor, labels_raw: bytes) -> bytes:
    """What the bare split sends up: the cut activations' raw bytes, then the labels'."""
    return b"".join((z.detach().numpy().data.cast("B"), labels_raw))


def _check_bare_split_matches(
    proxy: ServerModelProxy,
    bare_split_call: Callable[[bytes], bytes],
    bottom: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    labels_raw: bytes,
) -> None:
    """Both server halves start from the same weights: their first gradients must agree."""
    z = bottom(x).detach()
    split_grad = proxy.forward_backward(embeddings=z, labels=y)
    reply = bare_split_call(_bare_split_request(z, labels_raw))
    bare_grad = torch.frombuffer(bytearray(reply), dtype=torch.float32).view(z.shape)
    if not isinstance(split_grad, torch.Tensor) or not torch.allclose(split_grad, bare_grad, atol=1e-6):
        raise RuntimeError("the bare split reference computes another gradient than CSLServerModel")


def measure_csl(
    server: ServerProcess, plan: Plan, threads: int, channel_options: Sequence[tuple[str, Any]]
) -> dict[str, Any]:
    x, y = csl_batch()
    model, bottom, _ = _csl_halves(SEED)
    _, bare_bottom, _ = _csl_halves(SEED)
    _, cut_bottom, cut_top = _csl_halves(SEED)
    for module in (model, bottom, bare_bottom, cut_bottom, cut_top):
        module.train()
    cut_optimizers = (
        torch.optim.SGD(cut_bottom.parameters(), lr=CSL_LR, momentum=CSL_MOMENTUM),
        torch.optim.SGD(cut_top.parameters(), lr=CSL_LR, momentum=CSL_MOMENTUM),
    )
    full_optimizer = torch.optim.SGD(model.parameters(), lr=CSL_LR, momentum=CSL_MOMENTUM)
    bottom_optimizer = torch.optim.SGD(bottom.parameters(), lr=CSL_LR, momentum=CSL_MOMENTUM)
    bare_optimizer = torch.optim.SGD(bare_bottom.parameters(), lr=CSL_LR, momentum=CSL_MOMENTUM)
    labels_raw = y.numpy().tobytes()
    proxy = _proxy(server, server.info["service"], "open-csl", SEED)
    channel = _bare_channel(server.info["bare"], channel_options)
    bare_call = channel.unary_unary(BARE_PATH)
    bare_split_call = channel.unary_unary(BARE_SPLIT_PATH)

    one_process_step = csl_one_process_step(model, full_optimizer, x, y)
    split_phases, cut_phases, paused_phases, threaded_phases = Phases(), Phases(), Phases(), Phases()
    split_step = csl_split_step(proxy, bottom, bottom_optimizer, x, y, split_phases)
    server_compute_ms: list[float] = []

    def split_step_and_server_compute() -> None:
        before = proxy.times.seconds.get("server_compute_s", 0.0)
        split_step()
        server_compute_ms.append((proxy.times.seconds["server_compute_s"] - before) * 1000)

    def bare_split_step() -> None:
        z = bare_bottom(x)
        reply = bare_split_call(_bare_split_request(z, labels_raw))
        grad = torch.frombuffer(reply, dtype=torch.float32).view(z.shape)
        bare_optimizer.zero_grad()
        z.backward(grad)
        bare_optimizer.step()

    try:
        _check_bare_split_matches(proxy, bare_split_call, bottom, x, y, labels_raw)
        with torch.no_grad():
            cut = tuple(bottom(x[:1]).shape[1:])
        cut_raw = bytes(4 * CSL_BATCH * int(np.prod(cut)))
        variants: dict[str, Callable[[], object]] = {
            "one_process": one_process_step,
            "split": split_step_and_server_compute,
            "bare_split": bare_split_step,
            "bare_echo_cut": lambda: bare_call(cut_raw),
            "one_process_cut": _one_process_cut_step(cut_bottom, cut_top, cut_optimizers, x, y, cut_phases),
            "one_process_cut_paused": _one_process_cut_step(
                cut_bottom, cut_top, cut_optimizers, x, y, paused_phases, pause_s=PHASE_PAUSE_S
            ),
            "one_process_cut_compute_thread": _one_process_cut_step(
                cut_bottom, cut_top, cut_optimizers, x, y, threaded_phases, server_thread=ComputeThread("cut-server")
            ),
        }
        for call in variants.values():
            _timed(call, plan.csl_warmup)
        for phases in (split_phases, cut_phases, paused_phases, threaded_phases):
            phases.ms.clear()
        server_compute_ms.clear()
        times_before = dict(proxy.times.seconds)
        samples = _interleaved(variants, plan.csl_steps, plan.csl_blocks)
        times_after = dict(proxy.times.seconds)
        faults = _faults_per_step(split_step, server.process.pid, plan.csl_fault_steps)
    finally:
        proxy.close()
        channel.close()
    one_median, one_p90 = _summary(samples["one_process"])
    split_median, split_p90 = _summary(samples["split"])
    bare_cut_median, _ = _summary(samples["bare_echo_cut"])
    bare_split_median, _ = _summary(samples["bare_split"])
    n = len(samples["split"])
    blocked = (times_after.get("blocked_s", 0.0) - times_before.get("blocked_s", 0.0)) / n
    server_compute = (times_after.get("server_compute_s", 0.0) - times_before.get("server_compute_s", 0.0)) / n
    ratio = split_median / one_median
    cut_bytes = 4 * CSL_BATCH * int(np.prod(cut))
    result: dict[str, Any] = {
        "model": "resnet20",
        "cut": "after stage 1 (client: stem + block0..block2)",
        "cut_shape": list(cut),
        "batch": CSL_BATCH,
        "cut_payload_bytes_per_direction": cut_bytes,
        "optimizer": f"SGD(lr={CSL_LR}, momentum={CSL_MOMENTUM})",
        "torch_threads_per_process": threads,
        "steps_per_variant": n,
        "blocks": plan.csl_blocks,
        "one_process_median_ms": round(one_median / 1000, 2),
        "one_process_p90_ms": round(one_p90 / 1000, 2),
        "split_median_ms": round(split_median / 1000, 2),
        "split_p90_ms": round(split_p90 / 1000, 2),
        "split_mean_blocked_ms": round(blocked * 1000, 2),
        "split_mean_server_compute_ms": round(server_compute * 1000, 2),
        "split_mean_transport_ms": round((blocked - server_compute) * 1000, 2),
        "bare_echo_cut_median_ms": round(bare_cut_median / 1000, 2),
        "block_medians_ms": {k: [round(v / 1000, 2) for v in b] for k, b in samples.block_medians.items()},
        "bare_floor_ratio": round((one_median + bare_cut_median) / one_median, 3),
        "bare_split_median_ms": round(bare_split_median / 1000, 2),
        "bare_split_ratio": round(bare_split_median / one_median, 3),
        "split_over_bare_split": round(split_median / bare_split_median, 3),
        "ratio": round(ratio, 3),
        "target": CSL_TARGET,
        "pass": ratio <= CSL_TARGET,
        "phase_medians_ms": {
            "split": {**split_phases.medians(), "server_compute": round(float(np.median(server_compute_ms)), 2)},
            "one_process_cut": cut_phases.medians(),
            f"one_process_cut_paused_{PHASE_PAUSE_S * 1000:g}ms": paused_phases.medians(),
            "one_process_cut_server_half_on_a_compute_thread": threaded_phases.medians(),
        },
        "one_process_cut_median_ms": round(_summary(samples["one_process_cut"])[0] / 1000, 2),
        "split_minor_faults_per_step": faults,
        "split_fault_steps": plan.csl_fault_steps,
    }
    print(
        f"  one process {result['one_process_median_ms']:.1f} ms (p90 {result['one_process_p90_ms']:.1f})  "
        f"split {result['split_median_ms']:.1f} ms (p90 {result['split_p90_ms']:.1f})  ratio {ratio:.3f}  "
        f"{_verdict(result['pass'], CSL_TARGET, '<=')}",
        flush=True,
    )
    print(
        f"  split step breakdown (means): blocked on the server {result['split_mean_blocked_ms']:.1f} ms = "
        f"server compute {result['split_mean_server_compute_ms']:.1f} ms + transport and framework "
        f"{result['split_mean_transport_ms']:.1f} ms; cut {list(cut)} = {cut_bytes / MIB:.1f} MiB each way",
        flush=True,
    )
    print(
        f"  bare gRPC echo of the cut bytes {result['bare_echo_cut_median_ms']:.1f} ms: even bare gRPC would give "
        f"a ratio of {result['bare_floor_ratio']:.3f}",
        flush=True,
    )
    print(
        f"  the same split step over bare gRPC (raw bytes, no splitflower but its compute thread) "
        f"{result['bare_split_median_ms']:.1f} ms: ratio {result['bare_split_ratio']:.3f} to one process; "
        f"splitflower's split step is {result['split_over_bare_split']:.3f}x that",
        flush=True,
    )
    print(f"  phase medians (ms): {result['phase_medians_ms']}", flush=True)
    return result


# --------------------------------------------------------------------------------------
# Provenance and reporting
# --------------------------------------------------------------------------------------


def provenance() -> dict[str, Any]:
    # Results written by earlier runs do not make the measured code dirty.
    commit = source_commit(exclude=["benchmarks/results"])
    dirty = commit.endswith("+dirty")
    marker = "-dirty" if dirty else ""
    commit = commit.removesuffix("+dirty")
    return {
        "commit": commit + marker,
        "commit_short": commit[:7] + marker,
        "dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
    }


def new_record(benchmark: str, threads: int = 0) -> dict[str, Any]:
    """A benchmark's record, begun: its name, :func:`provenance` and :func:`machine_info`
    (``threads`` 0: the runs' own default)."""
    return {"benchmark": benchmark, **provenance(), "machine": machine_info(threads)}


CliRunner = Callable[[list[str]], None]
"""Runs ``splitflower <argv>`` to its end, raising if it fails."""


def run_cli_in_fresh_process(argv: list[str]) -> None:
    """How benchmarks run ``splitflower``: a fresh process each (a Flower simulation on Ray)."""
    subprocess.run([sys.executable, "-m", "splitflower.cli", *argv], check=True, stdout=subprocess.DEVNULL)


def write_record(record: dict[str, Any], out_dir: Path) -> Path:
    """Write ``record`` (which holds its ``benchmark`` name and :func:`provenance`) as
    ``<out_dir>/<benchmark>-<short commit>.json``; say where."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record['benchmark']}-{record['commit_short']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def machine_info(threads: int) -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model or platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "torch_threads": threads,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "env": {k: os.environ[k] for k in TUNING_ENV if k in os.environ},
    }


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in results["rtt"]:
        if row["target"] is not None:
            out.append(
                {
                    "name": f"rtt ratio {row['size']}",
                    "value": row["ratio"],
                    "target": row["target"],
                    "pass": row["pass"],
                }
            )
    for row in results["wire"]:
        if row["target"] is not None:
            out.append(
                {
                    "name": f"proxy wire/payload {row['size']}",
                    "value": row["proxy_ratio"],
                    "target": row["target"],
                    "pass": row["pass"],
                }
            )
    csl = results["csl"]
    out.append(
        {"name": "CSL split/one-process step", "value": csl["ratio"], "target": csl["target"], "pass": csl["pass"]}
    )
    return out


def _mark(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Transport benchmark (latest run)",
        "",
        f"- commit: `{results['commit']}`",
        f"- date: {results['date']}",
        f"- command: `{results['command']}`" + (" (quick: smoke-run iteration counts)" if results["quick"] else ""),
        f"- machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['platform']}, Python {m['python']}, "
        f"torch {m['torch']}, grpcio {m['grpcio']}, torch threads {m['torch_threads']} per process, "
        f"load average at start {m['load_average_at_start']}, tuning environment {m['env'] or 'none'}",
        f"- server: {results['server']['server_pool']}, options {results['server']['server_options']}; "
        f"client channel options {results['server']['channel_options']}",
        "",
        "## 1. Round-trip time of one blocking call (float32 tensor echoed back)",
        "",
        "| size | calls/variant | bare median µs | bare p90 µs | proxy median µs | proxy p90 µs "
        "| proxy/bare (medians) | target | result | codec alone µs | codec alone/bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rtt"]:
        target = f"<= {r['target']:g}" if r["target"] is not None else "-"
        lines.append(
            f"| {r['size']} | {r['calls_per_variant']} | {r['bare_median_us']:.1f} | {r['bare_p90_us']:.1f} "
            f"| {r['proxy_median_us']:.1f} | {r['proxy_p90_us']:.1f} | {r['ratio']:.3f} | {target} "
            f"| {_mark(r['pass'])} | {r['codec_median_us']:.1f} | {r['codec_ratio']:.3f} |"
        )
    lines += [
        "",
        "Codec alone: the client encodes a request frame, a handler on the bare server decodes it and encodes "
        "the tensor back, the client decodes the reply; no sessions, ordering, scheduling, compute thread or "
        "accounting. It is the floor for any transport that moves torch tensors through this codec.",
        "",
        "## 2. Wire bytes / payload bytes (TCP stream bytes through a counting relay)",
        "",
        "| size | calls | bare TCP/payload | bare overhead B/call | proxy TCP/payload | proxy overhead B/call "
        "| splitflower-accounted wire/payload | target (proxy) | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["wire"]:
        target = f"<= {r['target']:g}" if r["target"] is not None else "-"
        lines.append(
            f"| {r['size']} | {r['calls']} | {r['bare_ratio']:.4f} | {r['bare_overhead_bytes_per_call']:.0f} "
            f"| {r['proxy_ratio']:.4f} | {r['proxy_overhead_bytes_per_call']:.0f} | {r['accounted_ratio']:.4f} "
            f"| {target} | {_mark(r['pass'])} |"
        )
    c = results["csl"]
    lines += [
        "",
        f"## 3. CSL training step: ResNet-20, cut after stage 1 ({c['cut_shape']}), batch {c['batch']}, "
        f"{c['optimizer']}",
        "",
        "| variant | steps | median ms | p90 ms |",
        "|---|---|---|---|",
        f"| one process | {c['steps_per_variant']} | {c['one_process_median_ms']:.1f} "
        f"| {c['one_process_p90_ms']:.1f} |",
        f"| split (client + server process) | {c['steps_per_variant']} | {c['split_median_ms']:.1f} "
        f"| {c['split_p90_ms']:.1f} |",
        f"| reference: the same split over bare gRPC | {c['steps_per_variant']} | {c['bare_split_median_ms']:.1f} "
        "| - |",
        "",
        f"Ratio split/one-process (medians): **{c['ratio']:.3f}** (target <= {c['target']:g}: "
        f"{_mark(c['pass'])}). Split step, means: blocked on the server {c['split_mean_blocked_ms']:.1f} ms = "
        f"server compute {c['split_mean_server_compute_ms']:.1f} ms + transport/framework "
        f"{c['split_mean_transport_ms']:.1f} ms; {c['cut_payload_bytes_per_direction'] / MIB:.1f} MiB each way. "
        f"A bare gRPC echo of those bytes takes {c['bare_echo_cut_median_ms']:.1f} ms (median, same blocks): "
        f"(one process + bare echo) / one process = {c['bare_floor_ratio']:.3f}, the best ratio any gRPC "
        "transport could reach here if computing in two processes cost nothing extra. The reference split over "
        "bare gRPC (cut bytes and labels as raw bytes, the server half run on the server's compute thread, the "
        "gradient returned as raw bytes: nothing of splitflower's codec, sessions or accounting) gives "
        f"{c['bare_split_ratio']:.3f} to one process; splitflower's split step is {c['split_over_bare_split']:.3f}x "
        "that reference.",
        "",
        *_phase_lines(c),
        "",
        "## Targets",
        "",
        "| target | value | limit | result |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(f"| {t['name']} | {t['value']} | <= {t['target']:g} | {_mark(t['pass'])} |")
    lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Servers (bare echo and SplitService) run in one separate spawned process; the client process dials them, "
    "so client and server do not share a GIL.",
    "The bare echo is a grpc.server with the split service's thread-pool type, size and options and a generic "
    "raw-bytes unary-unary handler; its channel has the proxy's channel options. Bare calls pass no deadline; "
    "the proxy's calls carry its default deadline, as in real use.",
    "Bare and proxy calls (and one-process and split CSL steps) are measured in alternating blocks after a "
    "warm-up; the first variant alternates between blocks.",
    "TCP bytes are stream bytes counted by a relay (HTTP/2 frames and their contents); TCP/IP headers are not "
    "counted. Payload: tensor bytes up + down (proxy), request + reply bytes (bare).",
    "CSL is sequential: in the split run the client process waits while the server process computes and vice "
    "versa, so each process using all torch threads takes turns on the cores rather than competing; the "
    "one-process baseline runs with the same thread count while the server process idles.",
    "From 1 MiB up, times depend on glibc malloc's adaptive mmap/trim thresholds (multi-MiB frames that are "
    "allocated fresh and page-faulted in on every call); they shift with allocation history, so a variant can "
    "switch speed mid-run. The JSON keeps per-block medians to show it; malloc-related environment variables "
    "in effect are recorded under machine.env.",
    "A report, not a test: the script exits 0 whether targets pass or fail.",
]


def _phase_lines(c: dict[str, Any]) -> list[str]:
    """Section 3's phase table: where the split step's time goes, beside the same computation
    in one process (straight through, with a pause between the phases, and with the server half
    on a compute thread of its own)."""
    phases = c["phase_medians_ms"]
    split, cut = phases["split"], phases["one_process_cut"]
    paused_name = next(name for name in phases if name.startswith("one_process_cut_paused"))
    paused = phases[paused_name]
    threaded = phases["one_process_cut_server_half_on_a_compute_thread"]
    rows = [
        ("client forward", "client_forward", "client_forward"),
        ("server half (split: its compute on the server)", "server_compute", "server_half"),
        ("client backward + step", "client_backward_step", "client_backward_step"),
    ]
    lines = [
        "Phase medians (ms), the split step beside the same computation cut at the same layer in one process "
        f"(whole step {c['one_process_cut_median_ms']:.1f} ms), and that one-process run with "
        f"{paused_name.rsplit('_', 1)[-1]} pauses between the phases (OpenMP workers released first, as a "
        "waiting party's are), and with the server half run on a compute thread of its own (the OpenMP "
        "workers of the thread before released, so that one team runs at a time, as in each process of the split):",
        "",
        "| phase | split | one process | one process, paused | one process, server half on a compute thread "
        "| split / one process |",
        "|---|---|---|---|---|---|",
    ]
    for label, split_key, cut_key in rows:
        lines.append(
            f"| {label} | {split[split_key]:.1f} | {cut[cut_key]:.1f} | {paused[cut_key]:.1f} "
            f"| {threaded[cut_key]:.1f} | {split[split_key] / cut[cut_key]:.3f} |"
        )
    lines.append(f"| blocked on the server (split only) | {split['blocked_on_server']:.1f} | - | - | - | - |")
    faults = c.get("split_minor_faults_per_step")
    if faults:
        lines += [
            "",
            f"Minor page faults per split step, over {c['split_fault_steps']} steps after the timed blocks: "
            f"client {faults['client']}, server {faults['server']}.",
        ]
    return lines


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"transport-{results['commit_short']}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path = out_dir / "transport.md"
    md_path.write_text(markdown(results))
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="far fewer iterations (a smoke run)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where results go (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads in both processes (default: torch's default here, %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    results: dict[str, Any] = {"benchmark": "transport", **provenance(), "quick": bool(args.quick)}
    results["machine"] = machine_info(args.threads)
    print(f"transport benchmark at {results['commit']} ({results['date']})")
    print(f"  command: {results['command']}")
    m = results["machine"]
    print(
        f"  machine: {m['cpu_count']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
        f"grpcio {m['grpcio']}, torch threads {m['torch_threads']}, load {m['load_average_at_start']}"
    )

    server = ServerProcess(args.threads)
    try:
        if server.info["torch_threads"] != args.threads:
            raise RuntimeError(f"server process runs {server.info['torch_threads']} torch threads, not {args.threads}")
        channel_options = _proxy_channel_options(server.info["service"])
        results["server"] = {
            "server_pool": server.info["server_pool"],
            "server_options": server.info["server_options"],
            "channel_options": [list(o) for o in channel_options],
        }
        sections: dict[str, float] = {}
        mark = time.perf_counter()
        print("1. round-trip time, blocking call with one float32 tensor echoed back (proxy vs bare gRPC)")
        results["rtt"] = measure_rtt(server, plan, channel_options)
        sections["rtt"], mark = round(time.perf_counter() - mark, 1), time.perf_counter()
        print("2. wire bytes / payload bytes through a counting TCP relay")
        results["wire"] = measure_wire(server, plan, channel_options)
        sections["wire"], mark = round(time.perf_counter() - mark, 1), time.perf_counter()
        print(
            f"3. CSL training step, ResNet-20 cut after stage 1, batch {CSL_BATCH}, {args.threads} torch threads "
            "per process (client and server take turns on the cores)"
        )
        results["csl"] = measure_csl(server, plan, args.threads, channel_options)
        sections["csl"] = round(time.perf_counter() - mark, 1)
        results["section_s"] = sections
    finally:
        server.stop()

    results["targets"] = _targets(results)
    results["notes"] = NOTES
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    json_path, md_path = write_results(results, args.out_dir)
    passed = sum(1 for t in results["targets"] if t["pass"])
    print(
        f"targets: {passed}/{len(results['targets'])} PASS; "
        + ", ".join(f"{t['name']} {_mark(t['pass'])}" for t in results["targets"])
    )
    print(f"wrote {json_path} and {md_path} in {results['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
