"""A consumer for the netns cluster: calls EchoService.Echo in a bounded loop, one JSON line
per call's outcome (and a few events) on stdout; run it in a consumer host's namespace.

    python -m testbed.cluster_consumer --hosts ZK --seconds 20 [--concurrency 8]
        [--timeout 2] [--keepalive 0] [--stop-file F] [--zk-children]

Lines: ``{"t": 1.234, "ok": true, "pid": 4242, "ms": 1.1}`` (``pid``: the provider
process that answered), ``{"t": ..., "ok": false, "code": "UNAVAILABLE", "ms": ...}``;
``{"event": "providers", "t": ..., "nodes": [...]}`` when ``--zk-children`` (the
registered nodes as this host's own kazoo client sees them, every 0.25 s); last
``{"event": "done", "started": N, "ended": N}``. Every call started gets exactly
one outcome line (the loop waits for them all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from twisted.internet import defer, task, threads

from testbed.protos import echo_pb2
from twisted_rpc import Client, RpcError, StatusCode, ZooKeeperRegistry

SERVICE = "mprpc.test.EchoService"


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def main(reactor: Any, args: argparse.Namespace) -> None:
    registry = ZooKeeperRegistry(reactor, args.hosts, session_timeout=args.session_timeout)
    client = Client(
        reactor, discovery=registry, timeout=args.timeout, keepalive_interval=args.keepalive,
        keepalive_timeout=args.keepalive_timeout or 10.0,
    )  # fmt: skip
    echo = client.proxy(echo_pb2.DESCRIPTOR.services_by_name["EchoService"])
    start = time.monotonic()
    emit({"event": "start", "wall": time.time()})
    counts = {"started": 0, "ended": 0}
    stopping = [False]

    def done() -> bool:
        if stopping[0]:
            return True
        over = time.monotonic() - start > args.seconds
        stopping[0] = over or bool(args.stop_file and os.path.exists(args.stop_file))
        return stopping[0]

    async def worker() -> None:
        while not done():
            counts["started"] += 1
            t0 = time.monotonic()
            record: dict[str, Any] = {"t": round(t0 - start, 3)}
            try:
                reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"x"))
                record.update(ok=True, pid=reply.pid)
            except RpcError as e:
                record.update(ok=False, code=StatusCode(e.code).name, msg=e.message[:120])
            except Exception as e:  # an untyped failure: the tests count these as lost
                record.update(ok=False, code="UNTYPED", msg=repr(e)[:120])
            record["ms"] = round((time.monotonic() - t0) * 1000, 2)
            counts["ended"] += 1
            emit(record)
            if not record["ok"]:
                await task.deferLater(reactor, 0.05, lambda: None)  # no hot loop while down

    watcher = None
    if args.zk_children:
        watcher = task.LoopingCall(_children, reactor, args.hosts, start)
        watcher.start(0.25)
    workers = [defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)]
    await defer.gatherResults(workers, consumeErrors=True)
    if watcher is not None:
        watcher.stop()
    emit({"event": "done", **counts, "seconds": round(time.monotonic() - start, 3)})
    await client.close()
    registry.stopService()


_kazoo: list[Any] = []


def _children(reactor: Any, hosts: str, start: float) -> defer.Deferred[None]:
    """The registered EchoService nodes, read in a thread by a kazoo client of its own."""

    def read() -> list[str] | None:
        from kazoo.client import KazooClient

        if not _kazoo:
            zk = KazooClient(hosts=hosts, timeout=4.0)
            zk.start(timeout=10)
            _kazoo.append(zk)
        try:
            return sorted(_kazoo[0].get_children(f"/mprpc/{SERVICE}/providers"))
        except Exception:
            return None

    d = threads.deferToThread(read)

    def seen(nodes: list[str] | None) -> None:
        emit({"event": "providers", "t": round(time.monotonic() - start, 3), "nodes": nodes})

    d.addCallback(seen)
    d.addErrback(lambda f: emit({"event": "providers-error", "error": f.getErrorMessage()}))
    return d


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", required=True, help="ZooKeeper connect string")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=2.0, help="each call's deadline, s")
    parser.add_argument("--keepalive", type=float, default=0.0, help="keepalive_interval, s")
    parser.add_argument("--keepalive-timeout", type=float, default=0.0)
    parser.add_argument("--session-timeout", type=float, default=4.0)
    parser.add_argument("--stop-file", default="", help="stop early once this file exists")
    parser.add_argument("--zk-children", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, options)))
