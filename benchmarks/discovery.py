"""Discovery figures against a real ZooKeeper (docs/benchmarks.md).

    PYTHONPATH=. .venv/bin/python -m benchmarks.discovery [--nodes 1000]

1. SIGKILL of one of two providers under load: time until the consumer routes
   no new call to it (its channel leaves rotation).
2. A third provider: time from its node's creation (ZooKeeper ctime) to its
   first answered call.
3. ``--nodes`` provider nodes registered for one service by a separate kazoo
   client: list-update latency (node ctime to the consumer seeing it) p50/p99,
   and the consumer's CPU per list update (one watch, debounced).

Everything on 127.0.0.1; every process started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
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
from twisted_rpc import Client, ZooKeeperRegistry

SERVICE = "mprpc.test.EchoService"
ROOT = "/mprpc-bench"


def sleep(seconds: float) -> Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


async def run(args: argparse.Namespace, zk: ZooKeeperCluster, started: list[Provider]) -> dict:
    registry = (
        f"[registry]\nkind = zookeeper\nhosts = {zk.hosts}\nroot = {ROOT}\nsession_timeout = 4\n"
    )

    def provider() -> Provider:
        p = Provider(Path(tempfile.mkdtemp()), registry)
        started.append(p)
        return p

    kz = KazooClient(hosts=zk.hosts)
    await deferToThread(kz.start, 30)
    node = lambda p: f"{ROOT}/{SERVICE}/providers/127.0.0.1:{p.port}"  # noqa: E731

    async def wait_node(p: Provider):
        for _ in range(400):
            stat = await deferToThread(kz.exists, node(p))
            if stat:
                return stat
            await sleep(0.025)
        raise RuntimeError("provider did not register")

    a, b = provider(), provider()
    await wait_node(a)
    await wait_node(b)
    client = Client(reactor, discovery=ZooKeeperRegistry(reactor, zk.hosts, root=ROOT))
    echo = client.proxy(ECHO)
    first_reply: dict[int, float] = {}
    running = True

    async def worker() -> None:
        deadline = time.monotonic() + 120
        while running and time.monotonic() < deadline:
            try:
                reply = await echo.Echo(echo_pb2.EchoRequest(), timeout=5)
            except Exception:
                await sleep(0.005)
                continue
            first_reply.setdefault(reply.pid, time.time())

    workers = [Deferred.fromCoroutine(worker()) for _ in range(8)]
    while len(first_reply) < 2:
        await sleep(0.05)

    # 1. SIGKILL: until a's channel is out of rotation.
    channel = client.channels[f"127.0.0.1:{a.port}"]
    killed = time.monotonic()
    os.kill(a.pid, signal.SIGKILL)
    while channel.usable and client.channels.get(channel.address.key) is channel:
        await sleep(0.001)
    out_of_rotation = time.monotonic() - killed

    # 2. A third provider: node ctime to its first answered call.
    c = provider()
    stat = await wait_node(c)
    while c.pid not in first_reply:
        await sleep(0.005)
    new_provider_s = first_reply[c.pid] - stat.ctime / 1000.0
    running = False
    for w in workers:
        await w
    await client.close()

    # 3. Many nodes on one service, one watch.
    seen: dict[str, float] = {}
    updates = 0

    def listener(addresses) -> None:
        nonlocal updates
        updates += 1
        now = time.time()
        for address in addresses:
            seen.setdefault(address.key, now)

    big = "bench.Many"
    consumer = ZooKeeperRegistry(reactor, zk.hosts, root=ROOT)
    consumer.subscribe(big, listener)
    await sleep(0.5)
    cpu0 = sum(os.times()[:2])
    base = f"{ROOT}/{big}/providers"
    await deferToThread(kz.ensure_path, base)

    def create_all() -> list[tuple[str, float]]:
        ctimes = []
        for i in range(args.nodes):
            key = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:9000"
            data = json.dumps({"host": key.rsplit(":", 1)[0], "port": 9000}).encode()
            path = kz.create(f"{base}/{key}", data, ephemeral=True)
            ctimes.append((key, kz.exists(path).ctime / 1000.0))
            time.sleep(args.interval)
        return ctimes

    ctimes = await deferToThread(create_all)
    for _ in range(400):
        if len(seen) >= args.nodes:
            break
        await sleep(0.025)
    cpu = sum(os.times()[:2]) - cpu0
    latencies = [seen[key] - ctime for key, ctime in ctimes if key in seen]
    await consumer.close()
    await deferToThread(kz.stop)
    return {
        "sigkill_to_out_of_rotation_ms": round(out_of_rotation * 1000, 1),
        "node_created_to_first_call_ms": round(new_provider_s * 1000, 1),
        "nodes": args.nodes,
        "nodes_seen": len(seen),
        "list_updates": updates,
        "update_latency_p50_ms": round(pct(latencies, 0.5) * 1000, 1),
        "update_latency_p99_ms": round(pct(latencies, 0.99) * 1000, 1),
        "update_latency_mean_ms": round(statistics.mean(latencies) * 1000, 1),
        "consumer_cpu_ms_per_update": round(cpu * 1000 / max(updates, 1), 2),
        "consumer_cpu_s_total": round(cpu, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.001, help="seconds between creations")
    args = parser.parse_args()
    result = run_with_zookeeper(lambda zk, started: run(args, zk, started))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
