"""CPU per call of large unary calls over a real loopback socket, beside the protobuf floor.

    PYTHONPATH=. .venv/bin/python -m benchmarks.large [--payloads 65536,1048576]
        [--calls 200] [--rounds 3] [--profile FILE]

One process: a ``ServerFactory`` listening on 127.0.0.1 (a free port) and a
``Client`` calling ``bench.UserService.Login`` on it, one call at a time (the
request's ``pwd`` carries N bytes, echoed back as ``errmsg``: 2N bytes of
payload per call). The CPU time of each side is the time spent in its
transport's ``doRead`` and ``doWrite`` (where its reads, decoding, handlers
and sends run; ``time.thread_time``), the rest of the process (the reactor's
polling, the calls' start) is shown apart. Rounds alternate the direct large
reads off and on (``RpcConnection.large_reads``, see
``twisted_rpc.core._large_read``): an A/B inside one run.

The floor: what serializing and parsing the same request and response cost
in-process, with no I/O, and a bare copy of the payload bytes.
"""

from __future__ import annotations

import argparse
import cProfile
import resource
import time
from collections.abc import Callable
from typing import Any

from testbed.protos import bench_pb2
from twisted_rpc import Client, Dispatcher, Service
from twisted_rpc.core._connection import RpcConnection
from twisted_rpc.server import ServerFactory

SERVICE = bench_pb2.DESCRIPTOR.services_by_name["UserService"]


class _Login(Service, descriptor=SERVICE):
    def Login(self, request: Any, context: Any) -> Any:
        return bench_pb2.LoginResponse(errcode=0, errmsg=request.pwd, success=True)


def _cpu_of(func: Callable[[], Any], runs: int) -> float:
    started = time.thread_time()
    for _ in range(runs):
        func()
    return (time.thread_time() - started) / runs


def floor(payload: int, runs: int) -> dict[str, float]:
    """Seconds of CPU per call for protobuf alone, and for a bare copy."""
    request = bench_pb2.LoginRequest(name="zhang san", pwd="x" * payload)
    answer = bench_pb2.LoginResponse(errcode=0, errmsg="x" * payload, success=True)
    wire_request, wire_answer = request.SerializeToString(), answer.SerializeToString()

    def protobuf() -> None:
        bench_pb2.LoginRequest.FromString(request.SerializeToString())
        bench_pb2.LoginResponse.FromString(answer.SerializeToString())

    source = bytearray(wire_request + wire_answer)

    def copy() -> None:
        bytes(source)

    return {"protobuf": _cpu_of(protobuf, runs), "copy": _cpu_of(copy, runs)}


class _Side:
    """Counts the CPU a transport spends in doRead and doWrite."""

    def __init__(self) -> None:
        self.cpu = 0.0

    def watch(self, transport: Any) -> None:
        for name in ("doRead", "doWrite"):
            method = getattr(transport, name)

            def timed(method: Callable[[], Any] = method) -> Any:
                started = time.thread_time()
                try:
                    return method()
                finally:
                    self.cpu += time.thread_time() - started

            setattr(transport, name, timed)


def run(
    payloads: list[int], calls: int, rounds: int, profile: str | None, new_first: bool = False
) -> None:
    from twisted.internet import defer, reactor

    factory = ServerFactory(Dispatcher([_Login()]), reactor, max_frame_size=64 * 1024 * 1024)
    server, client_side = _Side(), _Side()
    build = factory.buildProtocol

    def build_watched(addr: Any) -> Any:
        protocol = build(addr)
        original = protocol.makeConnection

        def made(transport: Any) -> None:
            server.watch(transport)
            original(transport)

        protocol.makeConnection = made
        return protocol

    factory.buildProtocol = build_watched  # type: ignore[method-assign]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = Client(
        reactor,
        providers={"bench.UserService": [f"127.0.0.1:{port.getHost().port}"]},
        max_frame_size=64 * 1024 * 1024,
    )
    login = client.proxy(SERVICE).Login
    profiler = cProfile.Profile() if profile else None
    results: list[tuple[int, str, float, float, float, float]] = []

    async def measure() -> None:
        await login(bench_pb2.LoginRequest(name="warm", pwd="x"), timeout=30)
        (channel,) = client.channels.values()
        client_side.watch(channel.protocol.transport)  # type: ignore[attr-defined]
        for payload in payloads:
            request = bench_pb2.LoginRequest(name="zhang san", pwd="x" * payload)
            n = max(10, calls * 1048576 // payload // 16) if payload < 1048576 else calls
            for _ in range(n // 10):  # warm up
                await login(request, timeout=30)
            for r in range(rounds * 2):
                mode = "old" if (r + new_first) % 2 == 0 else "new"
                RpcConnection.large_reads = mode == "new"
                server.cpu = client_side.cpu = 0.0
                if profiler is not None and mode == "new":
                    profiler.enable()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                started = time.thread_time()
                for _ in range(n):
                    response = await login(request, timeout=30)
                    assert len(response.errmsg) == payload
                total = time.thread_time() - started
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                if profiler is not None:
                    profiler.disable()
                results.append(
                    (payload, mode, server.cpu / n, client_side.cpu / n, total / n, faults / n)
                )

    def stop(result: Any) -> Any:
        reactor.stop()
        return result

    defer.Deferred.fromCoroutine(measure()).addBoth(stop)
    reactor.run()
    port.stopListening()
    RpcConnection.large_reads = True
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    print(
        "(per call: CPU µs and minor page faults of the process; MB/s: payload bytes "
        "moved, 2N per call, per CPU second)"
    )
    for payload in payloads:
        cost = floor(payload, max(20, calls // 4))
        moved = 2 * payload / 1e6
        print(
            f"\n{payload} B: protobuf floor {cost['protobuf'] * 1e6:.0f} µs "
            f"({moved / cost['protobuf']:.0f} MB/s), bare copy {cost['copy'] * 1e6:.1f} µs "
            f"({moved / cost['copy']:.0f} MB/s)"
        )
        for payload_, mode, srv, cli, total, faults in results:
            if payload_ == payload:
                print(
                    f"  {mode}: server {srv * 1e6:.0f} µs, client {cli * 1e6:.0f} µs, "
                    f"process {total * 1e6:.0f} µs: {moved / (srv + cli):.0f} MB/s "
                    f"(sides), {moved / total:.0f} MB/s (process), "
                    f"{(srv + cli) / cost['protobuf']:.2f}x the floor, "
                    f"{faults:.0f} page faults"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", default="65536,1048576")
    parser.add_argument("--calls", type=int, default=200, help="calls per round at 1 MiB")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each, alternated")
    parser.add_argument("--profile", help="write cProfile statistics of the 'new' rounds")
    parser.add_argument("--new-first", action="store_true", help="start with a 'new' round")
    args = parser.parse_args()
    payloads = [int(p) for p in args.payloads.split(",")]
    run(payloads, args.calls, args.rounds, args.profile, args.new_first)


if __name__ == "__main__":
    main()
