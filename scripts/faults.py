"""Fault run: three providers, a real ZooKeeper, a load client, and faults (bounded).

    PYTHONPATH=. .venv/bin/python -m scripts.faults [--seconds-per-phase 3]

Phases, with the load running throughout (8 closed-loop callers, 2 s deadline,
keepalive 0.5 s / 0.5 s):
  1. steady; 2. SIGKILL provider A; 3. SIGSTOP provider B long enough for its
  ZooKeeper session to expire, then SIGCONT (a forced expiry: B must register
  again); 4. ZooKeeper stopped, then restarted; 5. steady again.
Every call issued is accounted for: succeeded, or failed with a typed error.
A failure is attributed to a fault when its message names a faulty provider's
address (connection lost, or a deadline while it was frozen); the rest must be
0. At the end every live provider must be registered again. Prints a JSON line
and a markdown table; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from kazoo.client import KazooClient
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from testbed.echo_service import ECHO
from testbed.harness import run_with_zookeeper
from testbed.processes import Provider
from testbed.protos import echo_pb2
from testbed.zkserver import ZooKeeperCluster
from twisted_rpc import Client, RpcError, ZooKeeperRegistry

SERVICE = "mprpc.test.EchoService"
ROOT = "/mprpc-faults"
SESSION = 2.0


def sleep(seconds: float) -> Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def run(args: argparse.Namespace, zk: ZooKeeperCluster, started: list[Provider]) -> dict:
    registry = (
        f"[registry]\nkind = zookeeper\nhosts = {zk.hosts}\nroot = {ROOT}\n"
        f"session_timeout = {SESSION:g}\n"
    )
    providers = []
    for _ in range(3):
        p = Provider(Path(tempfile.mkdtemp()), registry)
        started.append(p)
        providers.append(p)
    a, b, c = providers
    kz = KazooClient(hosts=zk.hosts)
    await deferToThread(kz.start, 30)
    path = f"{ROOT}/{SERVICE}/providers"

    async def registered() -> set[int]:
        try:
            children = await deferToThread(kz.get_children, path)
        except Exception:
            return set()
        return {int(name.rsplit(":", 1)[1]) for name in children}

    deadline = time.monotonic() + 30
    while await registered() != {p.port for p in providers} and time.monotonic() < deadline:
        await sleep(0.05)

    client = Client(
        reactor,
        discovery=ZooKeeperRegistry(reactor, zk.hosts, root=ROOT, session_timeout=SESSION),
        keepalive_interval=0.5,
        keepalive_timeout=0.5,
    )
    echo = client.proxy(ECHO)
    faulty: set[str] = set()
    counts = {"issued": 0, "ok": 0, "failed_attributed": 0, "failed_unattributed": 0}
    by_code: dict[str, int] = {}
    unattributed: list[str] = []
    phase = {"name": "start"}
    per_phase: dict[str, dict[str, int]] = {}
    running = True

    async def worker() -> None:
        end = time.monotonic() + 300
        while running and time.monotonic() < end:
            counts["issued"] += 1
            stats = per_phase.setdefault(phase["name"], {"ok": 0, "failed": 0})
            try:
                await echo.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=2)
            except RpcError as e:
                stats["failed"] += 1
                name = type(e).__name__
                by_code[name] = by_code.get(name, 0) + 1
                if any(address in e.message for address in faulty):
                    counts["failed_attributed"] += 1
                else:
                    counts["failed_unattributed"] += 1
                    unattributed.append(f"{phase['name']}: {e}")
                await sleep(0.01)
                continue
            counts["ok"] += 1
            stats["ok"] += 1

    workers = [Deferred.fromCoroutine(worker()) for _ in range(8)]
    step = args.seconds_per_phase

    phase["name"] = "1 steady"
    await sleep(step)
    phase["name"] = "2 SIGKILL A"
    faulty.add(a.address)
    os.kill(a.pid, signal.SIGKILL)
    await sleep(step)
    phase["name"] = "3 SIGSTOP B past its session"
    faulty.add(b.address)
    os.kill(b.pid, signal.SIGSTOP)
    await sleep(max(step, SESSION * 3))
    os.kill(b.pid, signal.SIGCONT)
    await sleep(step)
    phase["name"] = "4 ZooKeeper down"
    (server,) = zk.servers
    await deferToThread(server.stop)
    await sleep(max(step, SESSION * 2))
    await deferToThread(server.start)
    phase["name"] = "5 steady after"
    await sleep(step)
    live = {b.port, c.port}
    deadline = time.monotonic() + 60
    while await registered() != live and time.monotonic() < deadline:
        await sleep(0.1)
    back = await registered()
    await sleep(step)
    running = False
    for w in workers:
        await w
    await client.close()
    await deferToThread(kz.stop)
    accounted = counts["ok"] + counts["failed_attributed"] + counts["failed_unattributed"]
    return {
        **counts,
        "accounted": accounted,
        "errors_by_type": by_code,
        "per_phase": per_phase,
        "registered_at_end": sorted(back),
        "live_providers": sorted(live),
        "unattributed_examples": unattributed[:5],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds-per-phase", type=float, default=3.0)
    args = parser.parse_args()
    result = run_with_zookeeper(lambda zk, started: run(args, zk, started))
    print(json.dumps(result))
    print("\n| phase | calls ok | calls failed |\n|---|---:|---:|")
    for name, stats in sorted(result.get("per_phase", {}).items()):
        print(f"| {name} | {stats['ok']:,} | {stats['failed']:,} |")
    checks = {
        "ran": bool(result),
        "every call accounted for": result.get("accounted") == result.get("issued"),
        "no unattributed failure": result.get("failed_unattributed") == 0,
        "live providers registered": result.get("registered_at_end")
        == result.get("live_providers"),
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
