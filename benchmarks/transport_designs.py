"""Transport designs that were timed and left, beside the design splitflower keeps: what each
would change on a small blocking call on this machine.

``benchmarks/transport.py`` finds a 1 KiB ``proxy.echo`` 1.4 to 2.2 times the bare gRPC echo
(target 1.2x), and ``benchmarks/rtt_breakdown.py`` says where the time goes. This script times the
alternatives to the parts of that design::

    .venv/bin/python benchmarks/transport_designs.py [--calls 9000] [--size 1024]
        [--halt-poll-ns 200000]

1. Server: gRPC's thread-pool server (with SplitService's executor) against a ``grpc.aio`` server (one event
   loop on one thread), each answering at once and after handing the request to a compute
   thread and back, as SplitService hands every computation to its model's compute thread.
   Raw bytes echoed; the servers run in a second process. Beside them, splitflower's proxy
   echo twice: served by SplitService as it ships, and by a SplitService whose gRPC handlers
   run on the model's compute thread itself (no hand-off; rejected: gRPC's synchronous server
   waits for a request's body on the handler's thread, with no time limit, so any peer that
   sends headers and withholds the body would stop every computation; see
   ``docs/performance.md``).
2. Client: a call that blocks against one that polls its future for up to ``--poll-us``
   before blocking (so that its thread is awake when the reply comes), back to back and after
   ``--work-us`` of client work between calls (a proxy call encodes before and decodes after).
   The work is not timed.
3. Idle policy, only with ``--halt-poll-ns N`` (root; it writes
   ``/sys/module/haltpoll/parameters/guest_halt_poll_ns``, and sets it back at the end): the
   bare echo and splitflower's proxy echo of ``transport.py``, with the guest's idle vCPUs
   halting at once (this VM's setting, 0) and polling up to N ns first, setting by setting in
   alternating blocks. Whether the proxy's excess over the bare echo is waking halted vCPUs.

Variants run in alternating blocks after a warm-up; figures are medians of all calls. It
writes ``<out-dir>/transport-designs-<short commit>[-dirty].json``. A report, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport  # the sibling benchmark: its servers, proxy and records

from splitflower import service as service_module
from splitflower._threads import StickyExecutor
from splitflower.compute import ComputeThread
from splitflower.proxy import ServerModelProxy
from splitflower.scheduling import ImmediateScheduler
from splitflower.service import SplitService

SERVICE = "splitflower.bench.Designs"
ECHO, HANDOFF = "Echo", "HandoffEcho"
PROXY_SHIPPED = "splitflower proxy echo"
PROXY_INLINE = "proxy echo, handlers on compute"
HALT_POLL_PARAMETER = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
WARMUP_CALLS = 300


def _identity(request: bytes) -> bytes:
    return request


def _sync_server(options: Sequence[tuple[str, Any]], compute: ComputeThread) -> tuple[grpc.Server, int]:
    handlers = {
        ECHO: grpc.unary_unary_rpc_method_handler(lambda request, _: request),
        HANDOFF: grpc.unary_unary_rpc_method_handler(lambda request, _: compute.run(_identity, request)),
    }
    server = grpc.server(StickyExecutor(64, "designs-sync"), options=list(options))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port  # gRPC stops a server that is garbage-collected


def _aio_server(options: Sequence[tuple[str, Any]], compute: ComputeThread) -> int:
    """A grpc.aio server on an event loop of its own thread; its port once it listens."""
    ready: list[int] = []
    listening = threading.Event()

    async def echo(request: bytes, _: object) -> bytes:
        return request

    async def handoff(request: bytes, _: object) -> bytes:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[bytes] = loop.create_future()
        compute.submit(lambda: loop.call_soon_threadsafe(answered.set_result, _identity(request)))
        return await answered

    async def serve() -> None:
        handlers = {
            ECHO: grpc.unary_unary_rpc_method_handler(echo),
            HANDOFF: grpc.unary_unary_rpc_method_handler(handoff),
        }
        server = grpc.aio.server(options=list(options))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        ready.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        listening.set()
        await server.wait_for_termination()

    threading.Thread(target=asyncio.run, args=(serve(),), name="designs-aio", daemon=True).start()
    if not listening.wait(60):
        raise RuntimeError("the grpc.aio server did not start within 60 s")
    return ready[0]


class _OnComputeThread(Executor):
    """An executor for a gRPC server that runs each task on one compute thread, in order."""

    def __init__(self, compute: ComputeThread) -> None:
        self._compute = compute

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def task() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as err:  # noqa: BLE001 - handed to the future's owner
                    future.set_exception(err)

        self._compute.submit(task)
        return future

    def raise_max_workers(self, max_workers: int) -> None:
        """One thread, whatever SplitService asks for."""


def _echo_service(compute: ComputeThread | None) -> tuple[SplitService, dict[str, Any]]:
    """A SplitService with an echo session on its own compute thread; with ``compute``, its
    gRPC handlers run on that thread too, so a computation runs where its request was handled."""
    service = SplitService()
    if compute is None:
        compute = ComputeThread("designs-service-compute")
        service.start()
    else:
        on_compute = _OnComputeThread(compute)
        # SplitService.start builds its gRPC executor: give it this one instead.
        with mock.patch.object(service_module, "StickyExecutor", lambda *_, **__: on_compute):
            service.start()
        if service._executor is not on_compute:
            raise RuntimeError("the service did not take the compute-thread executor; its handlers would not run there")
    token, _ = service.open_session("echo", ImmediateScheduler(transport.EchoModel(nn.Identity()), compute=compute))
    return service, {"address": service.address, "token": token}


def server_main(conn: Connection, options: list[tuple[str, Any]]) -> None:
    """Entry point of the designs' server process (a :class:`transport.ServerProcess` target):
    the servers up, their ports sent, then serve until the parent says stop (daemon threads
    end with the process)."""
    try:
        sync_server, sync_port = _sync_server(options, ComputeThread("designs-sync-compute"))
        aio_port = _aio_server(options, ComputeThread("designs-aio-compute"))
        shipped, shipped_session = _echo_service(None)
        inline, inline_session = _echo_service(ComputeThread("designs-inline-compute"))
        conn.send(
            {
                "sync": f"127.0.0.1:{sync_port}",
                "aio": f"127.0.0.1:{aio_port}",
                PROXY_SHIPPED: shipped_session,
                PROXY_INLINE: inline_session,
            }
        )
        conn.recv()  # "stop"
        sync_server.stop(0)
        shipped.stop(0)
        inline.stop(0)
        conn.send("stopped")
    except BaseException:
        conn.send({transport.SERVER_ERROR: traceback.format_exc()})
        raise
    finally:
        conn.close()


def _spin(microseconds: float) -> None:
    end = time.perf_counter_ns() + int(microseconds * 1000)
    while time.perf_counter_ns() < end:
        pass


def _alternating(variants: dict[str, tuple[Callable[[], object], float]], total: int, blocks: int) -> dict[str, Any]:
    """Each variant (call, client work before each call, in us) after a warm-up, then ``total``
    times in alternating blocks (``transport._interleaved``); its median and block medians."""
    calls = {name: call for name, (call, _) in variants.items()}
    work = {name: functools.partial(_spin, work_us) for name, (_, work_us) in variants.items() if work_us}
    for name, call in calls.items():
        transport._timed(call, WARMUP_CALLS, work.get(name))
    samples = transport._interleaved(calls, total, blocks, work)
    return {
        name: {"median_us": round(float(np.median(samples[name])), 1), "block_medians_us": samples.block_medians[name]}
        for name in calls
    }


def _polling(call: grpc.UnaryUnaryMultiCallable, payload: bytes, poll_us: float) -> Callable[[], object]:
    def polled() -> object:
        future = call.future(payload)
        end = time.perf_counter_ns() + int(poll_us * 1000)
        while not future.done() and time.perf_counter_ns() < end:
            pass
        return future.result()

    return polled


def servers(address: dict[str, Any], options: Sequence[tuple[str, Any]], payload: bytes, calls: int) -> dict[str, Any]:
    """Section 1: thread-pool against aio, each at once and with a compute-thread hand-off;
    splitflower's proxy echo with and without its handlers on the compute thread."""
    variants: dict[str, tuple[Callable[[], object], float]] = {}
    channels: list[grpc.Channel | ServerModelProxy] = []
    for kind in ("sync", "aio"):
        channel = grpc.insecure_channel(address[kind], options=list(options))
        channels.append(channel)
        for method in (ECHO, HANDOFF):
            call = channel.unary_unary(f"/{SERVICE}/{method}")
            if call(payload) != payload:
                raise RuntimeError(f"{kind} {method} came back different")
            variants[f"{kind} {method}"] = (functools.partial(call, payload), 0.0)
    tensor = torch.frombuffer(bytearray(payload), dtype=torch.float32)
    for name in (PROXY_SHIPPED, PROXY_INLINE):
        proxy = ServerModelProxy(address[name]["address"], address[name]["token"])
        channels.append(proxy)
        echoed = proxy.echo(x=tensor)
        if not isinstance(echoed, torch.Tensor) or not torch.equal(echoed, tensor):
            raise RuntimeError(f"the {name} came back different")
        variants[name] = (functools.partial(proxy.echo, x=tensor), 0.0)
    try:
        return _alternating(variants, calls, blocks=6)
    finally:
        for channel in channels:
            channel.close()


def clients(
    address: str, options: Sequence[tuple[str, Any]], payload: bytes, calls: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Section 2: blocking against polling, back to back and after client work."""
    channel = grpc.insecure_channel(address, options=list(options))
    call = channel.unary_unary(f"/{SERVICE}/{ECHO}")
    polled = _polling(call, payload, args.poll_us)
    if polled() != payload:
        raise RuntimeError("the polled echo came back different")
    variants: dict[str, tuple[Callable[[], object], float]] = {}
    for work_us in (0.0, args.work_us):
        variants[f"blocking, {work_us:g} us work"] = (lambda: call(payload), work_us)
        variants[f"polling {args.poll_us:g} us, {work_us:g} us work"] = (polled, work_us)
    try:
        return _alternating(variants, calls, blocks=6)
    finally:
        channel.close()


def _set_halt_poll(ns: int) -> None:
    HALT_POLL_PARAMETER.write_text(f"{ns}\n")


def idle_policy(server: transport.ServerProcess, payload: bytes, calls: int, poll_ns: int) -> dict[str, Any]:
    """Section 3: bare and proxy echo with the guest halting at once and polling ``poll_ns``."""
    before = int(HALT_POLL_PARAMETER.read_text())
    # A SIGTERM (timeout, a scheduler) ends this run through the finally below, which sets the
    # kernel parameter back; the default action would leave it changed.
    signal.signal(signal.SIGTERM, lambda number, _: sys.exit(128 + number))
    options = transport._proxy_channel_options(server.info["service"])
    channel = grpc.insecure_channel(server.info["bare"], options=options)
    bare = channel.unary_unary(transport.BARE_PATH)
    proxy = transport._proxy(server, server.info["service"], "open-echo")
    tensor = torch.frombuffer(bytearray(payload), dtype=torch.float32)
    runs: dict[str, list[dict[str, Any]]] = {"0": [], str(poll_ns): []}
    try:
        for rep in range(4):
            for setting in (0, poll_ns) if rep % 2 == 0 else (poll_ns, 0):
                _set_halt_poll(setting)
                runs[str(setting)].append(
                    _alternating(
                        {"bare": (lambda: bare(payload), 0.0), "proxy": (lambda: proxy.echo(x=tensor), 0.0)},
                        calls // 4,
                        blocks=2,
                    )
                )
    finally:
        _set_halt_poll(before)
        proxy.close()
        channel.close()
    return {"halt_poll_ns_before": before, "runs": runs, "summary": _idle_summary(runs)}


def _idle_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out = {}
    for setting, reps in runs.items():
        bare = float(np.mean([rep["bare"]["median_us"] for rep in reps]))
        proxy = float(np.mean([rep["proxy"]["median_us"] for rep in reps]))
        out[setting] = {
            "bare_us": round(bare, 1),
            "proxy_us": round(proxy, 1),
            "excess_us": round(proxy - bare, 1),
            "ratio": round(proxy / bare, 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=9000, help="calls per variant and section")
    parser.add_argument("--size", type=int, default=1024, help="payload bytes, a multiple of 4")
    parser.add_argument("--poll-us", type=float, default=400.0, help="how long a polling client polls")
    parser.add_argument("--work-us", type=float, default=150.0, help="client work between calls")
    parser.add_argument("--halt-poll-ns", type=int, default=0, help="run section 3 with this window (root)")
    parser.add_argument("--out-dir", type=Path, default=transport.DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.size < 4 or args.size % 4:
        parser.error(f"--size must be a positive multiple of 4 bytes, got {args.size}")
    if args.halt_poll_ns < 0:
        parser.error(f"--halt-poll-ns must be a window of 0 or more nanoseconds, got {args.halt_poll_ns}")
    if args.halt_poll_ns and not os.access(HALT_POLL_PARAMETER, os.W_OK):
        parser.error(
            f"--halt-poll-ns {args.halt_poll_ns} needs {HALT_POLL_PARAMETER} to exist and be writable "
            "(a guest with cpuidle haltpoll, run as root); it is not here"
        )
    record = transport.new_record("transport-designs")
    record["parameters"] = {k: v for k, v in vars(args).items() if k != "out_dir"}
    payload = np.random.default_rng(0).standard_normal(args.size // 4).astype(np.float32).tobytes()
    server = transport.ServerProcess(torch.get_num_threads())
    designs: transport.ServerProcess | None = None
    try:
        options = [tuple(option) for option in server.info["server_options"]]
        designs = transport.ServerProcess(options, target=server_main)
        channel_options = transport._proxy_channel_options(server.info["service"])
        record["servers"] = servers(designs.info, channel_options, payload, args.calls)
        record["clients"] = clients(designs.info["sync"], channel_options, payload, args.calls, args)
        if args.halt_poll_ns:
            record["idle_policy"] = idle_policy(server, payload, args.calls, args.halt_poll_ns)
    finally:
        if designs is not None:
            designs.stop()
        server.stop()
    _print(record)
    transport.write_record(record, args.out_dir)
    return 0


def _print(record: dict[str, Any]) -> None:
    for section in ("servers", "clients"):
        print(f"{section}:")
        for name, figures in record[section].items():
            print(f"  {name:<32} {figures['median_us']:8.1f} us")
    if "idle_policy" in record:
        print("idle policy (halt polling window ns: bare, proxy, proxy - bare, proxy / bare):")
        for setting, figures in record["idle_policy"]["summary"].items():
            print(
                f"  {setting:>8}: {figures['bare_us']:7.1f} {figures['proxy_us']:7.1f} "
                f"{figures['excess_us']:7.1f} {figures['ratio']:6.3f}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
