"""Where a small blocking proxy call spends its time beyond a bare gRPC echo.

``benchmarks/transport.py`` finds ``proxy.echo(x=...)`` of 1 KiB well above the bare echo
(its target is 1.2x) while the codec, timed in a tight loop, costs a few microseconds. This
script times each stage of the call where it runs, in its own thread, during a stream of
real calls over loopback, and the same code in a tight loop in one process, so that the two
can be compared::

    .venv/bin/python benchmarks/rtt_breakdown.py [--calls 6000] [--size 1024]

1. Round trip: the bare gRPC echo and the proxy echo, in alternating blocks (no stopwatches).
2. In place: the server process wraps its stages in stopwatches (wall and thread CPU time per
   call): the whole handler; decoding the request; the ordering of the client's requests;
   the scheduler (checking the call, handing it to the compute thread and waiting); the
   job on the compute thread (memory tally and the method); encoding the reply. The client
   wraps its ``_blocking`` (the whole call), ``_prepare`` (encode and bookkeeping), the gRPC
   call itself and
   ``_finish_reply`` (decode and bookkeeping). The stopwatches add their own cost, measured
   in the hot loop below (a wrapped empty method against the bare one).
3. Hot loop: the same decode, encode and proxy code run back to back in this process, the
   compute-thread hand-off of an empty job, the swap of a server model's own RNG stream in
   and out around a call, and one stopwatch's own cost.
4. Idle gap: the bare echo's round trip alone, timed after the client has kept busy for a
   while since the last call (as a proxy call does, encoding before and decoding after):
   the bare figure of 1. has no gap between calls, so neither party's threads ever sleep.

It writes ``<out-dir>/rtt-breakdown-<short commit>[-dirty].json`` and prints a table. A
report, not a test: it exits 0 whatever it finds.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import sys
import time
import timeit
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport  # the sibling benchmark: its echo model, bare echo server and records

from splitflower import service as service_module
from splitflower.codec import decode_request, encode_reply, encode_request
from splitflower.compute import shared_compute_thread
from splitflower.proxy import ServerModelProxy
from splitflower.scheduling import ImmediateScheduler
from splitflower.server_model import CallContext, ServerModel
from splitflower.service import SplitService

HOT_REPEATS = 5000
WARMUP_CALLS = 500
BLOCKS = 6
IDLE_GAPS_US = (0, 25, 50, 100, 200, 400)


class Stopwatches:
    """Wall and thread-CPU nanoseconds per named stage, summed over calls."""

    def __init__(self) -> None:
        self.totals: dict[str, list[int]] = {}

    def wrap(self, owner: Any, attribute: str, stage: str) -> None:
        """Replace ``owner.attribute`` with a timed call of it (stages may share a name)."""
        real = getattr(owner, attribute)
        totals = self.totals.setdefault(stage, [0, 0])
        wall_clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = wall_clock(), cpu_clock()
            try:
                return real(*args, **kwargs)
            finally:
                totals[0] += wall_clock() - wall
                totals[1] += cpu_clock() - cpu

        setattr(owner, attribute, timed)

    def reset(self) -> None:
        for totals in self.totals.values():
            totals[:] = [0, 0]

    def per_call(self, calls: int) -> dict[str, dict[str, float]]:
        """Microseconds per proxy call (a stage entered twice per call counts both)."""
        return {
            stage: {"wall_us": round(wall / calls / 1000, 1), "cpu_us": round(cpu / calls / 1000, 1)}
            for stage, (wall, cpu) in self.totals.items()
        }


def server_main(conn: Connection) -> None:
    """The server process: a SplitService with an echo session, a bare echo, stopwatches on request."""
    service = SplitService("127.0.0.1", 0)
    service.start()
    bare, bare_port = transport._start_bare_echo([("grpc.so_reuseport", 0)], 64)
    scheduler = ImmediateScheduler(transport.EchoModel(nn.Identity()))
    token, session = service.open_session("echo", scheduler)
    watches = Stopwatches()
    conn.send({"service": service.address, "bare": f"127.0.0.1:{bare_port}", "token": token})
    try:
        while True:
            command, *args = conn.recv()
            if command == "instrument":
                watches.wrap(service, "_serve", "server: whole handler")
                watches.wrap(service_module, "decode_request", "server: decode request")
                watches.wrap(session, "enter", "server: request ordering (enter + leave)")
                watches.wrap(session, "leave", "server: request ordering (enter + leave)")
                watches.wrap(scheduler, "run", "server: scheduler (check, hand-off, wait)")
                watches.wrap(scheduler.compute, "run", "server: compute-thread round trip")
                watches.wrap(scheduler, "_call", "server: job on the compute thread")
                watches.wrap(service_module, "encode_reply", "server: encode reply")
                conn.send("ok")
            elif command == "reset":
                watches.reset()
                conn.send("ok")
            elif command == "report":
                conn.send(watches.per_call(int(args[0])))
            else:
                conn.send("stopped")
                return
    finally:
        bare.stop(0.5).wait()
        service.stop(0.5)


def _round_trips(bare_call: Callable[[], object], proxy_call: Callable[[], object], calls: int) -> dict[str, float]:
    samples = transport._interleaved({"bare": bare_call, "proxy": proxy_call}, calls, BLOCKS)
    bare, _ = transport._summary(samples["bare"])
    proxy, _ = transport._summary(samples["proxy"])
    return {"bare_median_us": round(bare, 1), "proxy_median_us": round(proxy, 1), "ratio": round(proxy / bare, 3)}


def _after_idle_gaps(bare_call: Callable[[], object], calls: int) -> dict[str, float]:
    """Median bare round trip (us) after the client kept busy for each gap since the last one."""
    samples: dict[str, list[float]] = {f"{gap} us": [] for gap in IDLE_GAPS_US}
    for _ in range(BLOCKS):
        for gap in IDLE_GAPS_US:
            for _ in range(max(1, calls // BLOCKS)):
                busy_until = time.perf_counter() + gap * 1e-6
                while time.perf_counter() < busy_until:  # busy, as encoding is: not asleep
                    pass
                started = time.perf_counter()
                bare_call()
                samples[f"{gap} us"].append((time.perf_counter() - started) * 1e6)
    return {gap: round(transport._summary(values)[0], 1) for gap, values in samples.items()}


def _client_in_place(proxy: ServerModelProxy, tensor: torch.Tensor, calls: int) -> dict[str, dict[str, float]]:
    watches = Stopwatches()
    watches.wrap(proxy, "_blocking", "client: whole call")
    watches.wrap(proxy, "_prepare", "client: encode request + bookkeeping")
    watches.wrap(proxy, "_call", "client: inside the gRPC call")
    watches.wrap(proxy, "_finish_reply", "client: decode reply + bookkeeping")
    for _ in range(calls):
        proxy.echo(x=tensor)
    return watches.per_call(calls)


class _Noop:
    def noop(self) -> None:
        return None


def _hot(fn: Callable[[], object]) -> float:
    for _ in range(HOT_REPEATS // 10):
        fn()
    return round(timeit.timeit(fn, number=HOT_REPEATS) / HOT_REPEATS * 1e6, 2)


def _swap(model: ServerModel, context: CallContext) -> None:
    model._begin_call(context)
    model._end_call(None)


def hot_loop(tensor: torch.Tensor) -> dict[str, float]:
    """The same code back to back in this process (caches warm, no other thread running)."""
    frame = encode_request(0, "echo", {"x": tensor})
    stub = ServerModelProxy("127.0.0.1:1", bytes(16))  # never dials: its gRPC call is replaced
    reply = encode_reply(tensor)
    stub._call = lambda *args, **kwargs: reply  # type: ignore[method-assign]
    compute = shared_compute_thread()
    timed_noop = _Noop()
    Stopwatches().wrap(timed_noop, "noop", "noop")
    seeded = ServerModel(nn.Identity())
    seeded.configure_fit(None, {})  # from here on, each call draws from the model's own stream
    context = CallContext(("client",), (slice(0, 1),))
    try:
        return {
            "one stopwatch (a wrapped empty method minus the bare one)": round(
                _hot(timed_noop.noop) - _hot(_Noop().noop), 2
            ),
            "server: decode request": _hot(lambda: decode_request(frame)),
            "server: encode reply": _hot(lambda: encode_reply(tensor)),
            "server: compute-thread round trip of an empty job": _hot(lambda: compute.run(int)),
            "server: a call's own RNG stream swapped in and out": _hot(functools.partial(_swap, seeded, context)),
            "client: whole call with the gRPC call replaced by a stored reply": _hot(lambda: stub.echo(x=tensor)),
        }
    finally:
        stub.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=6000, help="calls per variant and phase (default %(default)s)")
    parser.add_argument("--size", type=int, default=1024, help="tensor bytes, a multiple of 4 (default %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=transport.DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.calls < BLOCKS or args.size < 4 or args.size % 4:
        parser.error(
            f"--calls must be at least {BLOCKS} and --size a positive multiple of 4, got {args.calls}, {args.size}"
        )
    results: dict[str, Any] = {"benchmark": "rtt-breakdown", **transport.provenance()}
    results["machine"] = transport.machine_info(torch.get_num_threads())
    tensor, raw = transport._payload(args.size)
    context = mp.get_context("spawn")
    conn, child = context.Pipe()
    server = context.Process(target=server_main, args=(child,), name="breakdown-server", daemon=True)
    server.start()
    child.close()
    try:
        info = conn.recv()
        proxy = ServerModelProxy(info["service"], info["token"])
        channel = transport._bare_channel(info["bare"], [])
        bare_echo = channel.unary_unary(transport.BARE_PATH)
        bare_call, proxy_call = (lambda: bare_echo(raw)), (lambda: proxy.echo(x=tensor))
        transport._timed(bare_call, WARMUP_CALLS)
        transport._timed(proxy_call, WARMUP_CALLS)
        results["round_trip"] = _round_trips(bare_call, proxy_call, args.calls)
        results["bare_after_client_busy_us"] = _after_idle_gaps(bare_call, args.calls)
        for command in (("instrument",), ("reset",)):
            conn.send(command)
            conn.recv()
        client = _client_in_place(proxy, tensor, args.calls)
        conn.send(("report", args.calls))
        results["in_place_us_per_call"] = {**client, **conn.recv()}
        proxy.close()
        channel.close()
        conn.send(("stop",))
        conn.recv()
    finally:
        server.join(10)
        if server.is_alive():
            server.terminate()
    results["hot_loop_us"] = hot_loop(tensor)
    results["size_bytes"] = args.size
    results["calls"] = args.calls
    _print(results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"rtt-breakdown-{results['commit_short']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _print(results: dict[str, Any]) -> None:
    trip = results["round_trip"]
    size = transport.size_label(results["size_bytes"])
    print(
        f"{size} echo at {results['commit_short']}: bare {trip['bare_median_us']} us, "
        f"proxy {trip['proxy_median_us']} us (ratio {trip['ratio']}), medians without stopwatches"
    )
    print(f"{'stage (mean per call, in place)':58} {'wall us':>8} {'cpu us':>8}")
    for stage, row in results["in_place_us_per_call"].items():
        print(f"{stage:58} {row['wall_us']:8.1f} {row['cpu_us']:8.1f}")
    print(f"{'the same code in a tight loop':58} {'us':>8}")
    for stage, value in results["hot_loop_us"].items():
        print(f"{stage:58} {value:8.2f}")
    print(f"{'bare round trip after the client kept busy for':58} {'us':>8}")
    for gap, value in results["bare_after_client_busy_us"].items():
        print(f"{gap:>58} {value:8.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
