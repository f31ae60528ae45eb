"""CPU per call of the provider's and the consumer's code alone: no sockets, no reactor.

    PYTHONPATH=. .venv/bin/python -m benchmarks.hotpath [--concurrency 16] [--calls 200000]

Provider: a ServerConnection fed chunks of C pre-encoded bench.UserService.Login
requests (30 s deadline each), answering into a list. Consumer: a ClientConnection
behind a real Client and proxy, with C calls outstanding; each round feeds it the C
answers in one chunk, and each answer's callback makes the next call, as the peer
benchmark's client does. What the kernel and the reactor cost is left out, so this
isolates changes to the framework's own per-call work (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet.task import Clock

from testbed.protos import bench_pb2
from twisted_rpc import Client, Dispatcher, Service
from twisted_rpc.client import ClientConnection
from twisted_rpc.core import _codec as wire
from twisted_rpc.server import ServerFactory

SERVICE = bench_pb2.DESCRIPTOR.services_by_name["UserService"]
ROUTE = b"bench.UserService/Login"


class _Transport:
    """Just enough of a transport: keeps what is written."""

    disconnecting = False

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def getPeer(self) -> None:
        return None


class _Login(Service, descriptor=SERVICE):
    def Login(self, request: Any, context: Any) -> Any:
        return bench_pb2.LoginResponse(errcode=0, errmsg=request.pwd, success=True)


def provider_us_per_call(concurrency: int, calls: int) -> float:
    factory = ServerFactory(Dispatcher([_Login()]), Clock())
    connection = factory.buildProtocol(None)
    connection.makeConnection(_Transport())
    body = bench_pb2.LoginRequest(name="zhang san", pwd="x" * 32).SerializeToString()
    chunk = b"".join(
        wire.encode_request(i + 1, ROUTE, len(body), 30_000) + body for i in range(concurrency)
    )
    rounds = calls // concurrency
    started = time.perf_counter()
    for _ in range(rounds):
        connection.transport.written.clear()
        connection.dataReceived(chunk)
    return (time.perf_counter() - started) / (rounds * concurrency) * 1e6


def consumer_us_per_call(concurrency: int, calls: int) -> float:
    clock = Clock()
    client = Client(clock, providers={"bench.UserService": ["127.0.0.1:1"]})
    login = client.proxy(SERVICE).Login
    (channel,) = client.channels.values()
    connection = ClientConnection(clock)
    connection.makeConnection(_Transport())
    channel._attempt, channel.protocol, channel.state = None, connection, "ready"
    channel.direct = connection  # (as a proven connection is: see Channel._ready)
    request = bench_pb2.LoginRequest(name="zhang san", pwd="x" * 32)
    answer = bench_pb2.LoginResponse(errcode=0, errmsg="x" * 32, success=True)
    body = answer.SerializeToString()
    answered = [0]

    def done(response: Any) -> None:
        answered[0] += 1
        issue()

    def failed(failure: Any) -> None:
        raise SystemExit(f"call failed: {failure.getErrorMessage()}")

    def issue() -> None:
        login(request, timeout=30).addCallbacks(done, failed)

    for _ in range(concurrency):
        issue()
    rounds = calls // concurrency
    spent = 0.0
    for _ in range(rounds):
        chunk = b"".join(
            wire.encode_response(i, len(body)) + body for i in sorted(connection.outstanding)
        )
        connection.transport.written.clear()
        started = time.perf_counter()
        connection.dataReceived(chunk)
        spent += time.perf_counter() - started
    assert answered[0] == rounds * concurrency
    return spent / (rounds * concurrency) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", "-c", type=int, default=16)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    provider = provider_us_per_call(args.concurrency, args.calls)
    consumer = consumer_us_per_call(args.concurrency, args.calls)
    print(f"C={args.concurrency}: provider {provider:.2f} µs/call, consumer {consumer:.2f} µs/call")


if __name__ == "__main__":
    main()
