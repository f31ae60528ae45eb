"""Integration: a consumer started while ZooKeeper is down calls the providers its
discovery snapshot lists, once each answers a Health check; never a dead one."""

from __future__ import annotations

import json
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from testbed.zkserver import ZooKeeperCluster
from twisted_rpc import Client, RpcError

pytestmark = pytest.mark.integration

SERVICE = "mprpc.test.EchoService"
SESSION = 2


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


class SnapshotTests(TestCase):
    timeout = 120

    async def wait_for(self, predicate, timeout: float = 20, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            await sleep(0.05)
        self.fail(f"{what} not met within {timeout}s")

    def provider(self, hosts: str, root: str) -> Provider:
        registry = (
            f"[registry]\nkind = zookeeper\nhosts = {hosts}\nroot = {root}\n"
            f"session_timeout = {SESSION}\n"
        )
        provider = Provider(Path(tempfile.mkdtemp()), registry)
        self.addCleanup(provider.stop)
        return provider

    def consumer(self, ini: Path) -> Client:
        client = Client.from_config(str(ini), reactor)
        self.addCleanup(client.close)
        return client

    async def test_a_cold_start_without_zookeeper_calls_only_checked_providers(self) -> None:
        cluster = ZooKeeperCluster(1)
        self.addCleanup(cluster.cleanup)
        await deferToThread(cluster.start)
        root = f"/mprpc-test-{uuid.uuid4().hex[:8]}"
        alive = self.provider(cluster.hosts, root)
        dead = self.provider(cluster.hosts, root)
        folder = Path(tempfile.mkdtemp())
        ini = folder / "consumer.ini"
        ini.write_text(
            "[consumer]\nsnapshot = snap.json\n"
            f"[registry]\nkind = zookeeper\nhosts = {cluster.hosts}\nroot = {root}\n"
            f"session_timeout = {SESSION}\n"
        )
        snapshot = folder / "snap.json"

        def listed() -> set[int]:
            try:
                doc = json.loads(snapshot.read_bytes())
            except (OSError, ValueError):
                return set()
            return {entry["port"] for entry in doc["services"].get(SERVICE, [])}

        first = self.consumer(ini)
        echo = first.proxy(ECHO)
        await self.wait_for(lambda: listed() == {alive.port, dead.port}, what="snapshot written")
        reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
        self.assertIn(reply.pid, {alive.pid, dead.pid})
        await first.close()

        await deferToThread(cluster.stop)
        dead.signal(signal.SIGKILL)
        self.assertIsNotNone(dead.wait(10))

        second = self.consumer(ini)
        echo = second.proxy(ECHO)
        pids: list[int] = []
        failures: list[RpcError] = []
        deadline = time.monotonic() + 20
        while len(pids) < 50 and time.monotonic() < deadline:
            try:
                reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
            except RpcError as e:  # until the health check passes: no provider yet
                failures.append(e)
                await sleep(0.05)
                continue
            pids.append(reply.pid)
        self.assertEqual(len(pids), 50, f"calls failed: {failures[-3:]}")
        self.assertEqual(set(pids), {alive.pid})
        # Only "no provider" failures (before the check passed): none reached the dead one.
        self.assertEqual(second.discovery.providers(SERVICE)[0].port, alive.port)
        self.assertEqual(len(second.discovery.providers(SERVICE)), 1)
        self.assertTrue(all("no provider" in str(e) for e in failures), failures[-3:])
