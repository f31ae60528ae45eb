"""CppClient and the mprpc layout of the registry: the directory and registration on
the in-memory ZooKeeper, and every failure mode of a call against loopback servers."""

from __future__ import annotations

import math

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from examples.mprpc_compat import user_pb2
from tests.fake_zookeeper import FakeZooKeeper
from tests.unit.cpp.test_mprpc_wire import LOGIN, LOGIN_REPLY
from twisted_rpc import (
    DataLossError,
    DeadlineExceededError,
    ProviderAddress,
    ResourceExhaustedError,
    UnavailableError,
    ZooKeeperRegistry,
)
from twisted_rpc.cpp import CppClient, StaticCppDirectory, ZooKeeperCppDirectory
from twisted_rpc.cpp._client import DEFAULT_TIMEOUT

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
    directory = ZooKeeperCppDirectory(zk)
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
    directory = ZooKeeperCppDirectory(zk)
    missing = result_of(directory.lookup("UserServiceRpc", "Login"))
    assert missing.check(UnavailableError)
    assert "/UserServiceRpc/Login" in str(missing.value)
    zk.server_create("/UserServiceRpc/Login", b"127.0.0.1:8000", owner=7)
    assert result_of(directory.lookup("UserServiceRpc", "Login")).port == 8000


def test_directory_waits_for_a_session_and_keeps_its_cache_through_an_outage():
    zk = FakeZooKeeper(Clock())
    zk.server_create("/S/M", b"127.0.0.1:8000", owner=7)
    directory = ZooKeeperCppDirectory(zk)
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
    failure = result_of(ZooKeeperCppDirectory(zk).lookup("S", "M"))
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
    registry.register_cpp("UserServiceRpc", "Login", ProviderAddress("10.0.0.1", 8000))
    assert zk.nodes["/UserServiceRpc"] == (b"", 0)
    assert zk.nodes["/UserServiceRpc/Login"] == (b"10.0.0.1:8000", zk.session_id)
    assert registry.registrations == []  # not a native registration
    result_of(registry.unregister_all())
    assert "/UserServiceRpc/Login" not in zk.nodes


def test_stale_node_of_this_address_is_replaced():
    zk, registry = make_registry()
    zk.server_create("/S/M", b"10.0.0.1:8000", owner=0x999)
    registry.register_cpp("S", "M", ProviderAddress("10.0.0.1", 8000))
    assert zk.nodes["/S/M"] == (b"10.0.0.1:8000", zk.session_id)


def test_node_of_another_provider_is_left_alone_until_it_goes():
    zk, registry = make_registry()
    zk.server_create("/S/M", b"10.0.0.2:8000", owner=0x999)
    registry.register_cpp("S", "M", ProviderAddress("10.0.0.1", 8000))
    assert zk.nodes["/S/M"] == (b"10.0.0.2:8000", 0x999)
    zk.server_delete("/S/M")
    assert zk.nodes["/S/M"] == (b"10.0.0.1:8000", zk.session_id)


def test_mprpc_nodes_come_back_in_a_new_session():
    zk, registry = make_registry()
    registry.register_cpp("S", "M", ProviderAddress("10.0.0.1", 8000))
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

    async def serve(self, reply: bytes | None) -> tuple[CppClient, list[bytes]]:
        received: list[bytes] = []
        factory = Factory.forProtocol(lambda: Replying(reply, received))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        client = CppClient(
            reactor, providers={"UserServiceRpc": address}, timeout=2, max_reply_size=100
        )
        return client, received

    async def login(self, reply: bytes | None, **kw):
        client, received = await self.serve(reply)
        for key, value in kw.items():
            setattr(client, key, value)
        return await client.proxy(USER).Login(LOGIN_REQUEST), received

    async def test_request_bytes_and_reply(self):
        response, received = await self.login(LOGIN_REPLY)
        self.assertEqual(b"".join(received), LOGIN)
        self.assertEqual(response.SerializeToString(), LOGIN_REPLY)

    async def test_empty_reply_is_unavailable_unless_allowed(self):
        with self.assertRaises(UnavailableError):
            await self.login(b"")
        response, _ = await self.login(b"", allow_empty_reply=True)
        self.assertFalse(response.HasField("result"))

    async def test_garbage_reply_is_data_loss(self):
        with self.assertRaises(DataLossError):
            await self.login(b"\xff\xff\xff\xff")

    async def test_oversized_reply_is_resource_exhausted(self):
        with self.assertRaises(ResourceExhaustedError):
            await self.login(b"\x0a\x00" * 200)

    async def test_no_reply_in_time_is_deadline_exceeded(self):
        with self.assertRaises(DeadlineExceededError):
            await self.login(None, timeout=0.3)

    async def test_connection_refused_is_unavailable(self):
        client, _ = await self.serve(LOGIN_REPLY)
        client.directory.providers["UserServiceRpc"] = ProviderAddress("127.0.0.1", 1)
        with self.assertRaises(UnavailableError) as raised:
            await client.proxy(USER).Login(LOGIN_REQUEST)
        self.assertIn("cannot connect", str(raised.exception))

    async def test_unconfigured_service_and_wrong_request_type(self):
        client = CppClient(reactor, providers={})
        with self.assertRaises(UnavailableError):
            await client.proxy(USER).Login(LOGIN_REQUEST)
        with self.assertRaises(TypeError):
            await client.proxy(USER).Login(user_pb2.RegisterRequest())


# ---------------------------------------------------------------- deadlines (in memory)


def silent_provider(memory: MemoryReactorClock, index: int = -1) -> StringTransport:
    """Accept the connection ``index`` the client dialled, as a C++ provider that
    does not know the method does: read the request, never answer, never close."""
    host, port, factory, _, _ = memory.tcpClients[index]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport


def test_a_call_has_a_deadline_by_default():
    memory = MemoryReactorClock()
    client = CppClient(memory, providers={"UserServiceRpc": "127.0.0.1:8000"})
    assert client.timeout == DEFAULT_TIMEOUT == 10.0
    d = client.proxy(USER).Login(LOGIN_REQUEST)
    transport = silent_provider(memory)
    assert transport.value() == LOGIN
    memory.advance(DEFAULT_TIMEOUT - 0.01)
    assert not d.called
    memory.advance(0.02)
    failure = result_of(d)
    assert failure.check(DeadlineExceededError), failure
    assert "10 s" in str(failure.value)
    assert transport.disconnected  # the socket is closed, not leaked


def test_proxy_and_call_timeouts_override_the_default():
    memory = MemoryReactorClock()
    client = CppClient(memory, providers={"UserServiceRpc": "127.0.0.1:8000"}, timeout=30)
    proxy = client.proxy(USER, timeout=2)
    by_proxy = proxy.Login(LOGIN_REQUEST)
    by_call = proxy.Login(LOGIN_REQUEST, timeout=0.5)
    by_client = client.proxy(USER).Login(LOGIN_REQUEST)
    for index in range(3):
        silent_provider(memory, index)
    memory.advance(0.6)
    assert result_of(by_call).check(DeadlineExceededError)
    assert not by_proxy.called
    memory.advance(1.5)
    assert result_of(by_proxy).check(DeadlineExceededError)
    assert not by_client.called
    memory.advance(28)
    assert result_of(by_client).check(DeadlineExceededError)


def test_timeout_none_on_the_client_means_no_deadline():
    memory = MemoryReactorClock()
    client = CppClient(memory, providers={"UserServiceRpc": "127.0.0.1:8000"}, timeout=None)
    d = client.proxy(USER).Login(LOGIN_REQUEST)
    transport = silent_provider(memory)
    memory.advance(10_000)
    assert not d.called and not transport.disconnected
    d.cancel()  # only the caller ends it
    assert transport.disconnected
    result_of(d)


@pytest.mark.parametrize("bad", [0, -1, math.inf, math.nan, "5", True])
def test_bad_timeouts_are_value_errors_naming_the_argument(bad):
    memory = MemoryReactorClock()
    client = CppClient(memory, providers={"UserServiceRpc": "127.0.0.1:8000"})
    failure = result_of(client.proxy(USER).Login(LOGIN_REQUEST, timeout=bad))
    assert failure.check(ValueError) and "timeout" in str(failure.value)
    assert memory.tcpClients == []  # nothing dialled
    with pytest.raises(ValueError, match="timeout"):
        client.proxy(USER, timeout=bad)
    for keyword in ("timeout", "connect_timeout", "refused_hold"):
        if keyword == "refused_hold" and bad == 0:
            continue  # 0 turns the hold off
        with pytest.raises(ValueError, match=keyword):
            CppClient(memory, providers={}, **{keyword: bad})


# ---------------------------------------------------------------- refused addresses (in memory)


def refuse(memory: MemoryReactorClock, index: int = -1) -> None:
    memory.tcpClients[index][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))


def test_literal_addresses_are_dialled_directly():
    memory = MemoryReactorClock()
    client = CppClient(
        memory, providers={"UserServiceRpc.Login": "127.0.0.1:8000", "UserServiceRpc": "[::1]:9"}
    )
    client.proxy(USER).Login(LOGIN_REQUEST)
    client.proxy(USER).Register(user_pb2.RegisterRequest())
    # No resolver, no attempt delay: straight to connectTCP (HostnameEndpoint resolves first).
    assert [(c[0], c[1], c[3]) for c in memory.tcpClients] == [
        ("127.0.0.1", 8000, 5.0),
        ("::1", 9, 5.0),
    ]


def test_a_refused_address_fails_fast_until_the_hold_ends_or_the_node_changes():
    memory = MemoryReactorClock()
    zk = FakeZooKeeper(memory)
    zk.server_create("/UserServiceRpc/Login", b"127.0.0.1:8000", owner=7)
    client = CppClient(memory, directory=ZooKeeperCppDirectory(zk))
    login = client.proxy(USER).Login
    first = login(LOGIN_REQUEST)
    refuse(memory)
    # At once: HostnameEndpoint reported it only after its 0.3 s attempt delay.
    assert "cannot connect" in str(result_of(first).value)
    for _ in range(50):  # a crashed provider's node lingers: no dial per call
        failure = result_of(login(LOGIN_REQUEST))
        assert failure.check(UnavailableError) and "refused" in str(failure.value)
    assert len(memory.tcpClients) == 1
    memory.advance(1.0)  # the hold is over: dialled again
    again = login(LOGIN_REQUEST)
    assert len(memory.tcpClients) == 2
    refuse(memory)
    assert "cannot connect" in str(result_of(again).value)
    assert result_of(login(LOGIN_REQUEST)).check(UnavailableError)
    assert len(memory.tcpClients) == 2
    # A provider restarted at the same address re-creates the node: dialled at once.
    zk.server_delete("/UserServiceRpc/Login")
    zk.server_create("/UserServiceRpc/Login", b"127.0.0.1:8000", owner=8)
    d = login(LOGIN_REQUEST)
    assert len(memory.tcpClients) == 3
    assert silent_provider(memory).value() == LOGIN
    assert not d.called


def test_refused_hold_zero_dials_every_call():
    memory = MemoryReactorClock()
    directory = StaticCppDirectory({"UserServiceRpc": "127.0.0.1:8000"})
    client = CppClient(memory, directory=directory, refused_hold=0)
    for count in range(1, 4):
        d = client.proxy(USER).Login(LOGIN_REQUEST)
        refuse(memory)
        assert result_of(d).check(UnavailableError)
        assert len(memory.tcpClients) == count


# ---------------------------------------------------------------- streaming methods are refused


class _CountingDirectory(StaticCppDirectory):
    """A static directory that records each lookup."""

    def __init__(self, providers):
        super().__init__(providers)
        self.lookups = []

    def lookup(self, service, method):
        self.lookups.append((service, method))
        return super().lookup(service, method)


@pytest.mark.parametrize(
    "method, kind",
    [("Count", "server streaming"), ("Sum", "client streaming"), ("Chat", "bidirectional")],
)
def test_a_streaming_method_is_refused_at_call_time_with_nothing_sent(method, kind):
    from testbed.echo_service import STREAMS
    from testbed.protos import echo_pb2
    from twisted_rpc import UnimplementedError

    memory = MemoryReactorClock()
    directory = _CountingDirectory({"StreamService": "127.0.0.1:8000"})
    client = CppClient(memory, directory=directory)
    request = echo_pb2.CountRequest(count=3) if method == "Count" else echo_pb2.EchoRequest()
    for d in (
        getattr(client.proxy(STREAMS), method)(request),
        client.call(_info(STREAMS, method), request),
        getattr(client.proxy(STREAMS), method)([request, request]),  # an iterable
    ):
        failure = result_of(d)
        assert failure.check(UnimplementedError), failure
        text = str(failure.value)
        assert f"mprpc.test.StreamService/{method} is a {kind}" in text
        assert "the C++ mprpc protocol has no streams" in text
    assert directory.lookups == [] and memory.tcpClients == []  # nothing looked up or dialled
    memory.advance(DEFAULT_TIMEOUT * 2)  # and no timer left behind
    assert memory.getDelayedCalls() == []


def _info(descriptor, name):
    from twisted_rpc.core import describe

    return describe(descriptor).methods[name]


def test_unary_methods_of_a_service_with_streams_still_go_over_mprpc():
    from testbed.echo_service import ECHO
    from testbed.protos import echo_pb2

    memory = MemoryReactorClock()
    client = CppClient(memory, providers={"EchoService": "127.0.0.1:8000"})
    d = client.proxy(ECHO).Echo(echo_pb2.EchoRequest(payload=b"x"))
    assert not d.called
    transport = silent_provider(memory)
    assert transport.value().endswith(echo_pb2.EchoRequest(payload=b"x").SerializeToString())
    d.cancel()
    result_of(d)
