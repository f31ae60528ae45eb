"""The framework under the peer benchmark's contract (../shared/bench/peers/README.md).

    python -m benchmarks.peer server [--port P] [--stdin-watch] [--max-seconds S]
                                       [--workload unary|stream] [--grpc]
    python -m benchmarks.peer client --port P -c C -n N [--warmup W] [--duration D]
                                       [--server-pid PID] [--timeout T] [--metadata]
                                       [--workload unary|stream] [--reader async|callback]
                                       [--profile FILE]

The server is a ``ProviderService`` exactly as ``twistd mprpc`` builds it
(dispatcher, interceptor chain, deadlines, graceful stop) serving
``bench.UserService.Login`` (echo ``pwd`` as ``errmsg``) and the server stream
``bench.UserService.Watch`` (an async generator yielding ``LoginResponse``
messages with ``errmsg`` of ``payload_bytes`` bytes until the stream ends) on
127.0.0.1 (with ``--grpc``, on a gRPC listener instead of the native one, for
the harness's own grpcio client). The client is a ``Client`` with one proxy and so one shared
connection. Unary workload: C calls outstanding (closed loop), each with a
deadline (``--timeout``, default 30 s) and, with ``--metadata``, one metadata
pair. Stream workload: C streams of ``Watch`` read with ``async for`` (or, with
``--reader callback``, ``on_message``), counting every message; latencies are
the gaps between consecutive messages of one stream. It prints one JSON line
whose first eight keys are the harness's. ``--profile FILE`` writes cProfile
statistics (the client's of the measured window; the server's from start to
SIGTERM).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import sys
import threading
import time
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"


def _bench_pb2() -> Any:
    try:
        from testbed.protos import bench_pb2
    except ImportError:
        sys.exit("testbed/protos/bench_pb2.py is missing: run `make protos` in the checkout first")
    return bench_pb2


# --------------------------------------------------------------------------- measuring


def cpu_seconds(pid: int | None = None) -> float | None:
    """User+system CPU seconds of a process (this one when pid is None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def host_cpu_seconds() -> tuple[float | None, float | None]:
    """(busy, steal) CPU seconds of the whole host, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9]
            )
        return (user + nice + system + irq + softirq) / _TICK, steal / _TICK
    except (OSError, ValueError):
        return None, None


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 3)


class Window:
    """Counts calls completed (and their latencies) between ``begin`` and ``end``."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.active = False
        self.lat_ns: list[int] = []
        self.errors = 0

    def _snapshot(self) -> tuple:
        server = cpu_seconds(self.server_pid) if self.server_pid else None
        return (time.perf_counter(), cpu_seconds(), server, *host_cpu_seconds())

    def begin(self) -> None:
        self.start = self._snapshot()
        self.active = True

    def end(self) -> None:
        self.active = False
        self.stop = self._snapshot()

    def report(
        self, system: str, concurrency: int, payload: int, workload: str = "unary"
    ) -> dict[str, Any]:
        lat = sorted(self.lat_ns)
        n = len(lat)

        def pct_us(q: float) -> float | None:
            return round(lat[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1e3, 1) if n else None

        (t0, c0, s0, h0, st0), (t1, c1, s1, h1, st1) = self.start, self.stop
        client, server, host = _delta(c0, c1), _delta(s0, s1), _delta(h0, h1)
        result = {
            "system": system,
            "concurrency": concurrency,
            "payload": payload,
            "calls_per_s": round(n / (t1 - t0), 1),
            "p50_us": pct_us(0.50),
            "p99_us": pct_us(0.99),
            "server_cpu_s": server,
            "client_cpu_s": client,
            "calls": n,
            "duration_s": round(t1 - t0, 3),
            "errors": self.errors,
            "other_cpu_s": None
            if None in (host, server, client)
            else round(host - client - server, 3),  # type: ignore[operator]
            "steal_s": _delta(st0, st1),
            "workload": workload,
        }
        print(json.dumps(result), flush=True)
        return result


def watchdog(seconds: float, stdin_eof: bool = False) -> None:
    """Exit after ``seconds`` whatever happens; with ``stdin_eof`` also when stdin closes."""

    def expire() -> None:
        time.sleep(seconds)
        print(f"watchdog: {seconds}s bound reached, exiting", file=sys.stderr, flush=True)
        os._exit(124)

    def on_eof() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=expire, daemon=True).start()
    if stdin_eof:
        threading.Thread(target=on_eof, daemon=True).start()


# --------------------------------------------------------------------------- server


def serve(args: argparse.Namespace) -> None:
    from twisted.internet import reactor

    from twisted_rpc import ProviderService, Service

    pb2 = _bench_pb2()

    class BenchUserService(Service, descriptor=pb2.DESCRIPTOR.services_by_name["UserService"]):
        def Login(self, request: Any, context: Any) -> Any:
            return pb2.LoginResponse(errcode=0, errmsg=request.pwd, success=True)

        async def Watch(self, request: Any, context: Any) -> Any:
            # A fresh message per yield, built as the harness's peers build theirs.
            size = request.payload_bytes
            while True:
                yield pb2.LoginResponse(errcode=0, errmsg="x" * size, success=True)

    endpoint = f"tcp:{args.port}:interface={HOST}:backlog=1024"
    listeners: dict[str, Any] = {"grpc_listen": (endpoint,)} if args.grpc else {"listen": endpoint}
    provider = ProviderService(reactor, [BenchUserService()], grace_period=1, **listeners)
    provider.listening.addCallback(lambda address: print(f"READY {address.port}", flush=True))
    provider.privilegedStartService()
    provider.startService()
    reactor.addSystemEventTrigger("before", "shutdown", provider.stopService)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        reactor.addSystemEventTrigger("before", "shutdown", profiler.dump_stats, args.profile)
    reactor.run()


# --------------------------------------------------------------------------- client


def run_client(args: argparse.Namespace) -> None:
    from twisted.internet import reactor, task

    from twisted_rpc import Client

    pb2 = _bench_pb2()
    window = Window(args.server_pid)
    client = Client(
        reactor,
        providers={"bench.UserService": [f"{HOST}:{args.port}"]},
        connections_per_provider=args.connections or "auto",
    )
    proxy = client.proxy(pb2.DESCRIPTOR.services_by_name["UserService"])
    login = proxy.Login
    request = pb2.LoginRequest(name="zhang san", pwd="x" * args.payload_bytes)
    timeout = args.timeout or None
    metadata = {"trace-id": "0af7651916cd43dd8448eb211c80319c"} if args.metadata else None
    clock = time.perf_counter_ns
    failed: list[Any] = []
    state = {"running": True}

    def issue() -> None:
        started = clock()
        d = login(request, timeout=timeout, metadata=metadata)
        d.addCallbacks(done, error, (started,))

    def done(response: Any, started: int) -> None:
        if window.active:
            window.lat_ns.append(clock() - started)
        if state["running"]:
            issue()

    def error(failure: Any) -> None:
        if not state["running"]:
            return None  # calls cut short by the end of the run
        window.errors += 1
        if len(failed) < 5:
            print(f"call failed: {failure.getErrorMessage()}", file=sys.stderr)
        failed.append(failure)
        if state["running"]:
            reactor.callLater(0.01, issue)

    streams: list[Any] = []

    def stream_ended(failure: Any = None) -> None:
        """A stream ended before the run did: an error in the report."""
        if not state["running"]:
            return
        window.errors += 1
        why = "ended early" if failure is None else failure.getErrorMessage()
        print(f"stream {why}", file=sys.stderr)

    async def read_async(stream: Any) -> None:
        lat, last = window.lat_ns, clock()
        async for _ in stream:
            now = clock()
            if window.active:
                lat.append(now - last)
            last = now

    def read_callback(stream: Any) -> Any:
        lat, last = window.lat_ns, [clock()]

        def received(_: Any) -> None:
            now = clock()
            if window.active:
                lat.append(now - last[0])
            last[0] = now

        return stream.on_message(received)

    def open_streams() -> None:
        from twisted.internet.defer import Deferred

        watch = pb2.WatchRequest(payload_bytes=args.payload_bytes)
        for _ in range(args.concurrency):
            stream = proxy.Watch(watch, metadata=metadata)
            streams.append(stream)
            if args.reader == "callback":
                d = read_callback(stream)
            else:
                d = Deferred.fromCoroutine(read_async(stream))
            d.addCallbacks(lambda _: stream_ended(), stream_ended)

    async def main() -> None:
        await login(request, timeout=10)  # connect first
        if args.workload == "stream":
            open_streams()
        else:
            for _ in range(args.concurrency):
                issue()
        await task.deferLater(reactor, args.warmup, lambda: None)
        profiler = cProfile.Profile() if args.profile else None
        window.begin()
        if profiler is not None:
            profiler.enable()
        await task.deferLater(reactor, args.duration, lambda: None)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        window.end()
        state["running"] = False
        for stream in streams:
            stream.cancel()
        await client.close()

    def go() -> None:
        from twisted.internet.defer import Deferred

        d = Deferred.fromCoroutine(main())
        d.addErrback(lambda f: failed.append(f) or f.printTraceback(file=sys.stderr))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if not hasattr(window, "stop"):
        sys.exit(1)
    window.report(args.system, args.concurrency, args.payload_bytes, args.workload)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    role = argv[0] if argv else ""
    if role == "server":
        p = argparse.ArgumentParser(prog="python -m benchmarks.peer server")
        p.add_argument("--port", type=int, default=0)
        p.add_argument("--max-seconds", type=float, default=900)
        p.add_argument("--stdin-watch", action="store_true")
        p.add_argument("--workload", choices=["unary", "stream"], default="unary")
        p.add_argument("--profile", help="cProfile the server into this file (stop it by SIGTERM)")
        p.add_argument("--grpc", action="store_true", help="serve on a gRPC (HTTP/2) listener")
        args = p.parse_args(argv[1:])
        watchdog(args.max_seconds, args.stdin_watch)
        serve(args)
    elif role == "client":
        p = argparse.ArgumentParser(prog="python -m benchmarks.peer client")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--concurrency", "-c", type=int, default=1)
        p.add_argument("--payload-bytes", "-n", type=int, default=32)
        p.add_argument("--warmup", type=float, default=1.0)
        p.add_argument("--duration", type=float, default=5.0)
        p.add_argument("--server-pid", type=int)
        p.add_argument("--timeout", type=float, default=30.0, help="per-call deadline (0: none)")
        p.add_argument("--metadata", action="store_true", help="send one metadata pair per call")
        p.add_argument("--system", default="twisted_rpc", help="name in the JSON line")
        p.add_argument(
            "--workload",
            choices=["unary", "stream"],
            default="unary",
            help="unary: closed-loop Login calls; stream: C server streams of Watch "
            "(every message received counts as a call)",
        )
        p.add_argument(
            "--reader",
            choices=["async", "callback"],
            default="async",
            help="stream workload: read with `async for` or with on_message(callback)",
        )
        p.add_argument("--profile", help="cProfile the measured window into this file")
        p.add_argument(
            "--connections",
            type=int,
            default=0,
            help="connections to the server ([consumer] connections_per_provider; 0: auto, "
            "which is one for this server)",
        )
        args = p.parse_args(argv[1:])
        watchdog(args.warmup + args.duration + 60)
        run_client(args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
