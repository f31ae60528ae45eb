"""Integration: a hostile ZooKeeper client against providers and consumers (real ZooKeeper).

The attacker is a kazoo client of the test's own, anonymous or with another
identity; a C++ mprpc provider is emulated by a kazoo client holding its
``/<Service>/<Method>`` nodes (``docs/mprpc-compat.md``). Each test works under
its own root (and chroot where the C++ layout is involved).
"""

from __future__ import annotations

import json
import re
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError
from kazoo.security import make_acl
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from twisted_rpc import Client, ZooKeeperRegistry

pytestmark = pytest.mark.integration

SERVICE = "mprpc.test.EchoService"
MPRPC_SERVICES = "testbed.echo_service:EchoService examples.mprpc_compat.callee:UserServiceRpc"
OPEN = make_acl("world", "anyone", all=True)


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


class HostileRegistryTests(TestCase):
    timeout = 120

    @pytest.fixture(autouse=True)
    def _zookeeper(self, zookeeper_server):
        self.zk = zookeeper_server

    def setUp(self) -> None:
        self.root = f"/hardening-{uuid.uuid4().hex[:8]}"

    async def kazoo(self, hosts: str | None = None, auth: str = "") -> KazooClient:
        client = KazooClient(
            hosts=hosts or self.zk.hosts, auth_data=[("digest", auth)] if auth else None
        )
        await deferToThread(client.start, 30)

        def close() -> None:
            try:
                client.stop()
                client.close()
            except KazooException:
                pass

        self.addCleanup(deferToThread, close)
        return client

    def provider(self, extra: str = "", services: str | None = None) -> Provider:
        kw = {"services": services} if services else {}
        provider = Provider(Path(tempfile.mkdtemp()), extra, **kw)
        self.addCleanup(provider.stop)
        return provider

    def zk_section(self, extra: str = "") -> str:
        return (
            f"[registry]\nkind = zookeeper\nhosts = {self.zk.hosts}\nroot = {self.root}\n"
            f"session_timeout = 2\n{extra}"
        )

    async def wait_for(self, predicate, timeout: float = 15, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await predicate()
            if value:
                return value
            await sleep(0.05)
        self.fail(f"{what} not met within {timeout}s")

    # ------------------------------------------------------------------ 16

    async def test_a_standby_leaves_the_cpp_providers_node_on_sigterm(self) -> None:
        chroot = f"/mprpc-compat-{uuid.uuid4().hex[:8]}"
        top = await self.kazoo()
        await deferToThread(top.ensure_path, chroot)
        hosts = f"{self.zk.hosts}{chroot}"
        cpp = await self.kazoo(hosts)  # the C++ provider: open nodes, as zkclient makes them
        await deferToThread(cpp.create, "/UserServiceRpc", b"", [OPEN])
        await deferToThread(
            cpp.create, "/UserServiceRpc/Login", b"10.0.0.9:8000", [OPEN], ephemeral=True
        )
        _, before = await deferToThread(cpp.get, "/UserServiceRpc/Login")
        python = self.provider(
            f"[registry]\nkind = static\nhosts = {hosts}\nsession_timeout = 2\n"
            "[mprpc]\nlisten = tcp:0:interface=127.0.0.1\nzookeeper = yes\n",
            services=MPRPC_SERVICES,
        )
        await deferToThread(python.wait_for_output, r"/UserServiceRpc/Login is held by")
        # Its own node of a method the C++ provider does not serve:
        await self.wait_for(
            lambda: deferToThread(cpp.exists, "/UserServiceRpc/Register"), what="own node"
        )
        python.signal(signal.SIGTERM)
        self.assertIsNotNone(await deferToThread(python.wait, 15), "provider did not exit")
        found = await deferToThread(cpp.exists, "/UserServiceRpc/Login")
        self.assertIsNotNone(found, "the standby deleted the C++ provider's node")
        data, after = await deferToThread(cpp.get, "/UserServiceRpc/Login")
        self.assertEqual((data, after.ephemeralOwner), (b"10.0.0.9:8000", before.ephemeralOwner))
        self.assertIn("leaving /UserServiceRpc/Login: held by session", python.output)
        self.assertIsNone(await deferToThread(cpp.exists, "/UserServiceRpc/Register"))

    # ------------------------------------------------------------------ 15

    async def test_with_auth_a_provider_refuses_parents_others_created(self) -> None:
        anonymous = await self.kazoo()
        providers = f"{self.root}/{SERVICE}/providers"
        await deferToThread(anonymous.ensure_path, providers)  # open ACL, created first
        fake = json.dumps({"host": "127.0.0.1", "port": 1}).encode()
        await deferToThread(anonymous.create, f"{providers}/127.0.0.1:1", fake, ephemeral=True)
        provider = self.provider(self.zk_section("auth = digest:provider:secret\n"))
        refused = f"not registering {providers}/127.0.0.1:{provider.port}: its parent"
        match = await deferToThread(
            provider.wait_for_output, re.escape(refused) + r" (\S+) has ACL (\S+),"
        )
        self.assertEqual((match[1], match[2]), (self.root, "world:anyone:cdrwa"))
        await sleep(0.5)
        self.assertEqual(await deferToThread(anonymous.get_children, providers), ["127.0.0.1:1"])
        self.assertEqual(provider.output.count(refused), 1)  # one clear error, not a stream
        # The provider keeps serving.
        direct = Client(reactor, providers={SERVICE: [provider.address]}, timeout=10)
        self.addCleanup(direct.close)
        reply = await direct.proxy(ECHO).Echo(echo_pb2.EchoRequest(payload=b"still here"))
        self.assertEqual(reply.pid, provider.pid)
        # A consumer with the same identity does not use the squatted list.
        consumer = ZooKeeperRegistry(
            reactor, self.zk.hosts, root=self.root, auth="digest:provider:secret"
        )
        self.addCleanup(consumer.close)
        seen: list = []
        consumer.subscribe(SERVICE, seen.append)
        await self.wait_for(lambda: _value(bool(seen)), what="a provider list")
        self.assertEqual(seen[-1], ())

    async def test_with_auth_every_node_is_closed_to_others(self) -> None:
        provider = self.provider(self.zk_section("auth = digest:provider:secret\n"))
        providers = f"{self.root}/{SERVICE}/providers"
        node = f"{providers}/127.0.0.1:{provider.port}"
        anonymous = await self.kazoo()
        await self.wait_for(lambda: deferToThread(anonymous.exists, node), what="registration")
        for path in (self.root, f"{self.root}/{SERVICE}", providers, node):
            acls, _ = await deferToThread(anonymous.get_acls, path)
            world = [a.perms for a in acls if a.id.scheme == "world"]
            self.assertEqual(world, [1], path)  # READ only
            with self.assertRaises(NoAuthError):
                await deferToThread(anonymous.set_acls, path, [OPEN])
        with self.assertRaises(NoAuthError):
            await deferToThread(anonymous.create, f"{providers}/127.0.0.1:1", b"{}")
        with self.assertRaises(NoAuthError):
            await deferToThread(anonymous.create, f"{self.root}/other.Service", b"")
        with self.assertRaises(NoAuthError):
            await deferToThread(anonymous.delete, node)
        # Someone else with an identity of their own cannot either.
        mallory = await self.kazoo(auth="mallory:x")
        with self.assertRaises(NoAuthError):
            await deferToThread(mallory.set_acls, self.root, [OPEN])

    async def test_without_auth_nobody_may_change_the_acl_of_nodes_made(self) -> None:
        provider = self.provider(self.zk_section())
        anonymous = await self.kazoo()
        node = f"{self.root}/{SERVICE}/providers/127.0.0.1:{provider.port}"
        await self.wait_for(lambda: deferToThread(anonymous.exists, node), what="registration")
        with self.assertRaises(NoAuthError):  # no ADMIN for anyone: nobody can lock it
            await deferToThread(
                anonymous.set_acls, self.root, [make_acl("world", "anyone", read=True)]
            )

    # ------------------------------------------------------------------ 6

    async def test_bad_provider_nodes_are_skipped_and_the_real_one_used(self) -> None:
        provider = self.provider(self.zk_section())
        attacker = await self.kazoo()
        providers = f"{self.root}/{SERVICE}/providers"
        node = f"{providers}/127.0.0.1:{provider.port}"
        await self.wait_for(lambda: deferToThread(attacker.exists, node), what="registration")
        bad = {
            "garbage": b"\xff\x00",
            "127.0.0.1:70000": json.dumps({"host": "127.0.0.1", "port": 70000}).encode(),
            "spaces:1": json.dumps({"host": "evil host", "port": 1}).encode(),
            "inf:1": b'{"host": "127.0.0.1", "port": 1, "weight": Infinity}',
            "deep": b"[" * 5000 + b"]" * 5000,
            "huge:1": json.dumps({"host": "127.0.0.1", "port": 1, "pad": "x" * 500_000}).encode(),
        }
        for name, data in bad.items():
            await deferToThread(attacker.create, f"{providers}/{name}", data, ephemeral=True)
        unreadable = make_acl("digest", "mallory:x", all=True)
        fine = json.dumps({"host": "127.0.0.1", "port": 2}).encode()
        await deferToThread(
            attacker.create, f"{providers}/127.0.0.1:2", fine, [unreadable], ephemeral=True
        )
        registry = ZooKeeperRegistry(reactor, self.zk.hosts, root=self.root, session_timeout=2)
        client = Client(reactor, discovery=registry, timeout=10)
        self.addCleanup(client.close)
        echo = client.proxy(ECHO)
        for _ in range(20):
            reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"x"))
            self.assertEqual(reply.pid, provider.pid)
        self.assertEqual([a.port for a in registry.providers(SERVICE)], [provider.port])
        # A bad node added later does not disturb the list either.
        await deferToThread(attacker.create, f"{providers}/later", b"\x00", ephemeral=True)
        await sleep(0.3)
        reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"x"))
        self.assertEqual(reply.pid, provider.pid)
        self.assertEqual([a.port for a in registry.providers(SERVICE)], [provider.port])


async def _value(value):
    return value
