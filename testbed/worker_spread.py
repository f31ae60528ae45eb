"""``worker_sockets = shared`` against ``reuseport``: how a provider with two
workers (a handler burning 1 ms of CPU) spreads connections and calls.

``PYTHONPATH=$PWD .venv/bin/python -m testbed.worker_spread [rounds]``: per
round and mode, 32 connections opened at once (connections per worker), 16
of them calling in a loop for 5 s (calls per worker, calls/s), then 20 pairs
of connections opened at once (how many pairs reach two distinct workers).
The modes alternate; every provider is stopped by PID.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from twisted_rpc import Client


def _client(provider: Provider) -> Client:
    return Client(reactor, providers={"mprpc.test.EchoService": [provider.address]})


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def measure(mode: str) -> str:
    extra = f"workers = 2\nworker_sockets = {mode}\ngrace_period = 2"
    provider = Provider(
        Path(tempfile.mkdtemp()),
        extra,
        services="testbed.burn_service:BurnEchoService",
        ready=" ready",
    )
    try:
        for _ in range(400):
            if len(re.findall(r"worker \d+ ready", provider.output)) >= 2:
                break
            await _sleep(0.05)
        clients = [_client(provider) for _ in range(32)]
        echoes = [c.proxy(ECHO) for c in clients]
        first = await gatherResults([e.Echo(echo_pb2.EchoRequest()) for e in echoes])
        connections = collections.Counter(r.pid for r in first)
        calls: collections.Counter[int] = collections.Counter()
        end = time.monotonic() + 5

        async def loop(echo) -> None:  # type: ignore[no-untyped-def]
            while time.monotonic() < end:
                calls[(await echo.Echo(echo_pb2.EchoRequest())).pid] += 1

        started = time.monotonic()
        await gatherResults([Deferred.fromCoroutine(loop(e)) for e in echoes[:16]])
        rate = sum(calls.values()) / (time.monotonic() - started)
        for client in clients:
            client.close()
        distinct = 0
        for _ in range(20):
            pair = [_client(provider) for _ in range(2)]
            replies = await gatherResults(
                [c.proxy(ECHO).Echo(echo_pb2.EchoRequest()) for c in pair]
            )
            distinct += len({r.pid for r in replies}) == 2
            for client in pair:
                client.close()
        return (
            f"{mode:9} connections per worker {sorted(connections.values())}, "
            f"calls per worker {sorted(calls.values())}, {rate:.0f} calls/s, "
            f"pairs on distinct workers {distinct}/20"
        )
    finally:
        provider.stop()


async def main(rounds: int) -> None:
    for _ in range(rounds):
        for mode in ("shared", "reuseport"):
            print(await measure(mode), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("BURN_MS", "1")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    task.react(lambda _: ensureDeferred(main(rounds)))
