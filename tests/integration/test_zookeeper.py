"""Integration: providers (real twistd) and consumers discovering each other in a real ZooKeeper."""

from __future__ import annotations

import json
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from testbed.zkserver import ZooKeeperCluster, ZooKeeperServer, free_ports
from twisted_rpc import Client, UnavailableError, ZooKeeperRegistry

pytestmark = pytest.mark.integration

SERVICE = "mprpc.test.EchoService"
SESSION = 2  # seconds; ZooKeeper's tickTime is 500 ms in these tests


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


class Load:
    """A bounded closed loop of calls: counts successes per provider pid and failures."""

    def __init__(
        self, echo, concurrency: int = 8, max_calls: int = 2_000_000, max_seconds: float = 90
    ) -> None:
        self.echo = echo
        self.concurrency = concurrency
        self.max_calls = max_calls
        self.max_seconds = max_seconds
        self.by_pid: dict[int, int] = {}
        self.failures: list[BaseException] = []
        self.log: list[tuple[float, int]] = []  # (time, pid) of each success
        self.running = False
        self.issued = 0
        self._done: list[Deferred] = []

    def start(self) -> None:
        self.running = True
        self._done = [Deferred.fromCoroutine(self._worker()) for _ in range(self.concurrency)]

    async def _worker(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while self.running and self.issued < self.max_calls and time.monotonic() < deadline:
            self.issued += 1
            try:
                reply = await self.echo.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
            except Exception as e:  # anything but an RpcError fails the test later
                self.failures.append(e)
                await sleep(0.01)
                continue
            self.by_pid[reply.pid] = self.by_pid.get(reply.pid, 0) + 1
            self.log.append((time.monotonic(), reply.pid))

    async def stop(self) -> None:
        self.running = False
        await DeferredList(self._done)

    @property
    def successes(self) -> int:
        return sum(self.by_pid.values())


class ZooKeeperTestCase(TestCase):
    timeout = 120

    @pytest.fixture(autouse=True)
    def _zookeeper(self, zookeeper_server):
        self.zk = zookeeper_server

    def setUp(self) -> None:
        self.root = f"/mprpc-test-{uuid.uuid4().hex[:8]}"

    def provider(self, hosts: str | None = None, extra: str = "") -> Provider:
        registry = (
            "[registry]\nkind = zookeeper\n"
            f"hosts = {hosts or self.zk.hosts}\nroot = {self.root}\n"
            f"session_timeout = {SESSION}\n{extra}"
        )
        provider = Provider(Path(tempfile.mkdtemp()), registry)
        self.addCleanup(provider.stop)
        return provider

    async def registered(self, hosts: str | None = None, extra: str = "") -> Provider:
        """A provider whose node is in ZooKeeper already."""
        provider = self.provider(hosts, extra)
        kz = await self.kazoo(hosts)
        await self.wait_for(lambda: self.stat(kz, self.node(provider)), what="registration")
        return provider

    def consumer(self, hosts: str | None = None, **kw) -> tuple[Client, object]:
        registry = ZooKeeperRegistry(
            reactor, hosts or self.zk.hosts, root=self.root, session_timeout=SESSION
        )
        client = Client(reactor, discovery=registry, **kw)
        self.addCleanup(client.close)
        return client, client.proxy(ECHO)

    async def kazoo(self, hosts: str | None = None, auth: str = "") -> KazooClient:
        auth_data = [("digest", auth)] if auth else None
        client = KazooClient(hosts=hosts or self.zk.hosts, auth_data=auth_data)
        await deferToThread(client.start, 30)

        def close():
            try:
                client.stop()
                client.close()
            except KazooException:
                pass  # its server may be gone (the ensemble test kills one)

        self.addCleanup(deferToThread, close)
        return client

    def node(self, provider: Provider) -> str:
        return f"{self.root}/{SERVICE}/providers/127.0.0.1:{provider.port}"

    async def wait_for(self, predicate, timeout: float = 15, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await predicate()
            if value:
                return value
            await sleep(0.05)
        self.fail(f"{what} not met within {timeout}s")

    async def stat(self, kz: KazooClient, path: str):
        return await deferToThread(kz.exists, path)


class RegistryTests(ZooKeeperTestCase):
    async def test_registration_layout_and_data(self) -> None:
        provider = self.provider(extra="weight = 7\n")
        kz = await self.kazoo()
        path = self.node(provider)
        stat = await self.wait_for(lambda: self.stat(kz, path), what="registration")
        self.assertNotEqual(stat.ephemeralOwner, 0)
        data, _ = await deferToThread(kz.get, path)
        info = json.loads(data)
        self.assertEqual(
            (info["host"], info["port"], info["weight"]), ("127.0.0.1", provider.port, 7)
        )
        self.assertEqual(info["methods"], ["AsyncEcho", "Echo", "NotImplemented"])
        self.assertEqual(info["pid"], provider.pid)
        self.assertIn("version", info)
        self.assertLess(abs(info["started_at"] - time.time()), 60)
        parent = await self.stat(kz, f"{self.root}/{SERVICE}/providers")
        self.assertEqual(parent.ephemeralOwner, 0)  # parents are persistent
        _, echo = self.consumer()
        reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"found"))
        self.assertEqual((reply.payload, reply.pid), (b"found", provider.pid))

    async def test_two_providers_share_load_and_survive_a_sigkill(self) -> None:
        a, b = await self.registered(), await self.registered()
        client, echo = self.consumer()
        load = Load(echo)
        load.start()
        await self.wait_for(lambda: _done(len(load.by_pid) == 2 and load.successes > 400))
        kz = await self.kazoo()
        self.assertLess(abs(load.by_pid[a.pid] - load.by_pid[b.pid]), 0.3 * load.successes)
        a.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await sleep(1.5)
        await load.stop()
        for failure in load.failures:
            self.assertIsInstance(failure, UnavailableError)
        # Only calls in flight to the killed provider may fail (at most one per worker).
        self.assertLessEqual(len(load.failures), load.concurrency)
        late = [pid for t, pid in load.log if t > killed_at + 0.3]
        self.assertTrue(late)
        self.assertEqual(set(late), {b.pid})
        # Its node goes with its session (timeout 2 s).
        await self.wait_for(
            lambda: _negate(self.stat(kz, self.node(a))), timeout=SESSION * 5, what="node gone"
        )

    async def test_new_provider_gets_calls_within_a_second(self) -> None:
        await self.registered()
        client, echo = self.consumer()
        load = Load(echo)
        load.start()
        await self.wait_for(lambda: _done(load.successes > 100))
        kz = await self.kazoo()
        c = self.provider()
        await self.wait_for(lambda: self.stat(kz, self.node(c)), what="third registration")
        registered = time.monotonic()
        await self.wait_for(lambda: _done(c.pid in load.by_pid), timeout=5, what="calls to c")
        first = min(t for t, pid in load.log if pid == c.pid)
        await load.stop()
        self.assertLess(first - registered, 1.0)
        self.assertEqual(load.failures, [])

    async def test_deleted_node_is_recreated_and_acl_protects_it(self) -> None:
        provider = self.provider(extra="auth = digest:provider:secret\n")
        path = self.node(provider)
        anonymous = await self.kazoo()
        first = await self.wait_for(lambda: self.stat(anonymous, path), what="registration")
        with self.assertRaises(NoAuthError):
            await deferToThread(anonymous.delete, path)
        with self.assertRaises(NoAuthError):
            await deferToThread(anonymous.set, path, b"{}")
        owner = await self.kazoo(auth="provider:secret")
        await deferToThread(owner.delete, path)
        deleted = time.monotonic()
        again = await self.wait_for(lambda: self.stat(anonymous, path), what="recreated")
        self.assertLess(time.monotonic() - deleted, 5)
        self.assertEqual(again.ephemeralOwner, first.ephemeralOwner)
        self.assertIn("was deleted by someone else", provider.output)

    async def test_session_expiry_registers_again(self) -> None:
        provider = self.provider()
        path = self.node(provider)
        kz = await self.kazoo()
        before = await self.wait_for(lambda: self.stat(kz, path), what="registration")
        provider.signal(signal.SIGSTOP)  # a frozen process: its session expires
        try:
            await self.wait_for(
                lambda: _negate(self.stat(kz, path)), timeout=SESSION * 5, what="expiry"
            )
        finally:
            provider.signal(signal.SIGCONT)
        after = await self.wait_for(lambda: self.stat(kz, path), what="re-registration")
        self.assertNotEqual(after.ephemeralOwner, before.ephemeralOwner)
        _, echo = self.consumer()
        reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"back"))
        self.assertEqual(reply.pid, provider.pid)

    async def test_sigterm_deletes_nodes_first_and_finishes_calls(self) -> None:
        provider = self.provider()
        path = self.node(provider)
        kz = await self.kazoo()
        await self.wait_for(lambda: self.stat(kz, path), what="registration")
        _, echo = self.consumer()
        calls = [
            echo.AsyncEcho(echo_pb2.EchoRequest(payload=b"%d" % i, delay=1.5)) for i in range(10)
        ]
        await sleep(0.3)
        provider.signal(signal.SIGTERM)
        await self.wait_for(lambda: _negate(self.stat(kz, path)), timeout=1, what="node deleted")
        self.assertFalse(any(d.called for d in calls))  # still in flight: node went first
        replies = await DeferredList(calls, fireOnOneErrback=True)
        self.assertEqual([r.payload for _, r in replies], [b"%d" % i for i in range(10)])
        out = provider.output
        self.assertLess(out.index("unregistered"), out.index("Closed"))

    async def test_provider_serves_while_zookeeper_is_down_and_registers_later(self) -> None:
        (port,) = free_ports(1)
        hosts = f"127.0.0.1:{port}"
        provider = self.provider(hosts=hosts)
        await self.wait_for(
            lambda: _done("will be registered when it is" in provider.output), what="log line"
        )
        direct = Client(reactor, providers={SERVICE: [provider.address]})
        self.addCleanup(direct.close)
        reply = await direct.proxy(ECHO).Echo(echo_pb2.EchoRequest(payload=b"serving"))
        self.assertEqual(reply.payload, b"serving")
        server = ZooKeeperServer(1, port, Path(tempfile.mkdtemp(prefix="zk-late-")))
        self.addCleanup(server.stop)
        await deferToThread(server.start)
        kz = await self.kazoo(hosts)
        await self.wait_for(lambda: self.stat(kz, self.node(provider)), what="late registration")
        self.assertIsNone(provider.process.poll())


class OutageTests(ZooKeeperTestCase):
    """Tests that stop ZooKeeper servers get their own."""

    async def own_cluster(self, size: int) -> ZooKeeperCluster:
        cluster = ZooKeeperCluster(size)
        self.addCleanup(cluster.cleanup)
        await deferToThread(cluster.start)
        return cluster

    async def test_calls_go_on_through_a_zookeeper_outage(self) -> None:
        cluster = await self.own_cluster(1)
        a = await self.registered(cluster.hosts)
        client, echo = self.consumer(cluster.hosts)
        load = Load(echo)
        load.start()
        await self.wait_for(lambda: _done(load.successes > 100))
        (server,) = cluster.servers
        await deferToThread(server.stop)
        during = load.successes
        await sleep(SESSION * 2)  # longer than the session timeout
        self.assertGreater(load.successes - during, 100)
        await deferToThread(server.start)
        kz = await self.kazoo(cluster.hosts)
        await self.wait_for(lambda: self.stat(kz, self.node(a)), what="registration back")
        b = self.provider(cluster.hosts)  # a later change: the consumer must see it
        await self.wait_for(
            lambda: _done(b.pid in load.by_pid or bool(load.failures)),
            timeout=15,
            what="calls to b",
        )
        await load.stop()
        self.assertEqual(load.failures, [])

    async def test_session_moves_to_another_ensemble_server(self) -> None:
        cluster = await self.own_cluster(3)
        provider = self.provider(cluster.hosts)
        kz = await self.kazoo(cluster.hosts)
        path = self.node(provider)
        before = await self.wait_for(lambda: self.stat(kz, path), what="registration")
        client, echo = self.consumer(cluster.hosts)
        load = Load(echo)
        load.start()
        await self.wait_for(lambda: _done(load.successes > 100))
        session = f"sid=0x{before.ephemeralOwner:x}"
        attached = [
            s for s in cluster.servers if session in await deferToThread(_four, s.port, "cons")
        ]
        self.assertEqual(len(attached), 1, "the provider's session is on one server")
        attached[0].stop(signal.SIGKILL)
        await sleep(SESSION * 2)
        after = await self.wait_for(lambda: self.stat(kz, path), what="registration survives")
        self.assertEqual(after.ephemeralOwner, before.ephemeralOwner)  # same session moved
        self.assertIn("zookeeper", provider.output)
        await load.stop()
        self.assertEqual(load.failures, [])
        self.assertEqual(set(load.by_pid), {provider.pid})


def _four(port: int, command: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(command.encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


async def _done(value: bool) -> bool:
    return value


async def _negate(d: Deferred) -> bool:
    return not await d
