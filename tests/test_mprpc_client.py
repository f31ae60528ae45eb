"""MprpcClient and the mprpc layout of the registry: the directory and registration on
the in-memory ZooKeeper, and every failure mode of a call against loopback servers."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from examples.mprpc_compat import user_pb2
from tests.fake_zookeeper import FakeZooKeeper
from tests.test_mprpc_wire import LOGIN, LOGIN_REPLY
from twisted_rpc import DeadlineExceededError, UnavailableError
from twisted_rpc.mprpc_client import MprpcClient, ZooKeeperMprpcDirectory
from twisted_rpc.registry import ProviderAddress
from twisted_rpc.status import DataLossError, ResourceExhaustedError
from twisted_rpc.zkregistry import ZooKeeperRegistry

USER = user_pb2.DESCRIPTOR.services_by_name["UserServiceRpc"]
LOGIN_REQUEST = user_pb2.LoginRequest(name=b"zhang san", pwd=b"123456")


def result_of(d: Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


# ---------------------------------------------------------------- directory


def test_directory_reads_once_then_follows_the_watch():
    zk = FakeZooKeeper(Clock())
    zk.server_create("/UserServiceRpc/Login", b"127.0.0.1:8000", owner=7)
    directory = ZooKeeperMprpcDirectory(zk)
    first = result_of(directory.lookup("UserServiceRpc", "Login"))
    assert first == ProviderAddress("127.0.0.1", 8000)
    requests = zk.requests
    for _ in range(10):
        assert result_of(directory.lookup("UserServiceRpc", "Login")) == first
    assert zk.requests == requests  # cached, not read per call
    zk.server_delete("/UserServiceRpc/Login")
    zk.server_create("/UserServiceRpc/Login", b"127.0.0.1:9000", owner=8)
    assert result_of(directory.lookup("UserServiceRpc", "Login")).port == 9000


def test_directory_absence_is_a_typed_failure_and_watched():
    zk = FakeZooKeeper(Clock())
    directory = ZooKeeperMprpcDirectory(zk)
    missing = result_of(directory.lookup("UserServiceRpc", "Login"))
    assert missing.check(UnavailableError)
    assert "/UserServiceRpc/Login" in str(missing.value)
    zk.server_create("/UserServiceRpc/Login", b"127.0.0.1:8000", owner=7)
    assert result_of(directory.lookup("UserServiceRpc", "Login")).port == 8000


def test_directory_waits_for_a_session_and_keeps_its_cache_through_an_outage():
    zk = FakeZooKeeper(Clock())
    zk.server_create("/S/M", b"127.0.0.1:8000", owner=7)
    directory = ZooKeeperMprpcDirectory(zk)
    result_of(directory.lookup("S", "M"))
    zk.suspend()
    assert result_of(directory.lookup("S", "M")).port == 8000  # outage: cached
    waiting = directory.lookup("S", "Other")
    assert not waiting.called
    zk.server_create("/S/Other", b"127.0.0.1:8001", owner=7)
    zk.connect()
    assert result_of(waiting).port == 8001


def test_directory_bad_node_data_is_a_typed_failure():
    zk = FakeZooKeeper(Clock())
    zk.server_create("/S/M", b"not an address", owner=7)
    failure = result_of(ZooKeeperMprpcDirectory(zk).lookup("S", "M"))
    assert failure.check(UnavailableError) and "not ip:port" in str(failure.value)


# ---------------------------------------------------------------- registration


def make_registry():
    clock = Clock()
    zk = FakeZooKeeper(clock)
    registry = ZooKeeperRegistry(clock, "unused", zk=zk, session_timeout=10)
    registry.start()
    return zk, registry


def test_mprpc_nodes_in_the_cpp_layout():
    zk, registry = make_registry()
    registry.register_mprpc("UserServiceRpc", "Login", ProviderAddress("10.0.0.1", 8000))
    assert zk.nodes["/UserServiceRpc"] == (b"", 0)
    assert zk.nodes["/UserServiceRpc/Login"] == (b"10.0.0.1:8000", zk.session_id)
    assert registry.registrations == []  # not a native registration
    result_of(registry.unregister_all())
    assert "/UserServiceRpc/Login" not in zk.nodes


def test_stale_node_of_this_address_is_replaced():
    zk, registry = make_registry()
    zk.server_create("/S/M", b"10.0.0.1:8000", owner=0x999)
    registry.register_mprpc("S", "M", ProviderAddress("10.0.0.1", 8000))
    assert zk.nodes["/S/M"] == (b"10.0.0.1:8000", zk.session_id)


def test_node_of_another_provider_is_left_alone_until_it_goes():
    zk, registry = make_registry()
    zk.server_create("/S/M", b"10.0.0.2:8000", owner=0x999)
    registry.register_mprpc("S", "M", ProviderAddress("10.0.0.1", 8000))
    assert zk.nodes["/S/M"] == (b"10.0.0.2:8000", 0x999)
    zk.server_delete("/S/M")
    assert zk.nodes["/S/M"] == (b"10.0.0.1:8000", zk.session_id)


def test_mprpc_nodes_come_back_in_a_new_session():
    zk, registry = make_registry()
    registry.register_mprpc("S", "M", ProviderAddress("10.0.0.1", 8000))
    zk.expire()
    assert "/S/M" not in zk.nodes
    zk.connect(new_session=True)
    assert zk.nodes["/S/M"] == (b"10.0.0.1:8000", zk.session_id)


# ---------------------------------------------------------------- calls


class Replying(Protocol):
    """A provider that answers any request with fixed bytes (or nothing), then closes."""

    def __init__(self, reply: bytes | None, received: list[bytes]) -> None:
        self.reply = reply
        self.received = received

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.reply is not None and b"".join(self.received) == LOGIN:
            self.transport.write(self.reply)
            self.transport.loseConnection()


class CallTests(TestCase):
    timeout = 20

    async def serve(self, reply: bytes | None) -> tuple[MprpcClient, list[bytes]]:
        received: list[bytes] = []
        factory = Factory.forProtocol(lambda: Replying(reply, received))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        client = MprpcClient(
            reactor, providers={"UserServiceRpc": address}, timeout=2, max_reply_size=100
        )
        return client, received

    async def login(self, reply: bytes | None, **kw):
        client, received = await self.serve(reply)
        for key, value in kw.items():
            setattr(client, key, value)
        return await client.proxy(USER).Login(LOGIN_REQUEST), received

    def test_request_bytes_and_reply(self):
        async def run():
            response, received = await self.login(LOGIN_REPLY)
            self.assertEqual(b"".join(received), LOGIN)
            self.assertEqual(response.SerializeToString(), LOGIN_REPLY)

        return Deferred.fromCoroutine(run())

    def test_empty_reply_is_unavailable_unless_allowed(self):
        async def run():
            with self.assertRaises(UnavailableError):
                await self.login(b"")
            response, _ = await self.login(b"", allow_empty_reply=True)
            self.assertFalse(response.HasField("result"))

        return Deferred.fromCoroutine(run())

    def test_garbage_reply_is_data_loss(self):
        async def run():
            with self.assertRaises(DataLossError):
                await self.login(b"\xff\xff\xff\xff")

        return Deferred.fromCoroutine(run())

    def test_oversized_reply_is_resource_exhausted(self):
        async def run():
            with self.assertRaises(ResourceExhaustedError):
                await self.login(b"\x0a\x00" * 200)

        return Deferred.fromCoroutine(run())

    def test_no_reply_in_time_is_deadline_exceeded(self):
        async def run():
            with self.assertRaises(DeadlineExceededError):
                await self.login(None, timeout=0.3)

        return Deferred.fromCoroutine(run())

    def test_connection_refused_is_unavailable(self):
        async def run():
            client, _ = await self.serve(LOGIN_REPLY)
            client.directory.providers["UserServiceRpc"] = ProviderAddress("127.0.0.1", 1)
            with self.assertRaises(UnavailableError) as raised:
                await client.proxy(USER).Login(LOGIN_REQUEST)
            self.assertIn("cannot connect", str(raised.exception))

        return Deferred.fromCoroutine(run())

    def test_unconfigured_service_and_wrong_request_type(self):
        async def run():
            client = MprpcClient(reactor, providers={})
            with self.assertRaises(UnavailableError):
                await client.proxy(USER).Login(LOGIN_REQUEST)
            with self.assertRaises(TypeError):
                await client.proxy(USER).Login(user_pb2.RegisterRequest())

        return Deferred.fromCoroutine(run())
