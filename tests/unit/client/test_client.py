"""Consumer side: ClientConnection on StringTransport, then client and provider in memory."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from zope.interface.verify import verifyObject

from examples.protos import user_pb2
from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import ClientConn, failure_of, result, timers
from twisted_rpc import (
    CancelledError,
    Client,
    DeadlineExceededError,
    IClientInterceptor,
    IServiceDiscovery,
    IServiceRegistry,
    NotFoundError,
    RpcError,
    StaticRegistry,
    StatusCode,
    UnavailableError,
    UnknownRemoteError,
)
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._codec import FrameKind
from twisted_rpc.core._status import _BY_CODE
from twisted_rpc.testing import MemoryProvider

METHOD = describe(ECHO).methods["Echo"]


@pytest.mark.parametrize(("timeout", "timeout_ms"), [(2.5, 2500), (None, 0)])
def test_request_is_byte_exact(timeout, timeout_ms):
    """The request header ClientConnection.call packs inline is encode_request's."""
    c = ClientConn()
    request = echo_pb2.EchoRequest(payload=b"x")
    c.proto.call(METHOD, request, timeout=timeout)
    payload = request.SerializeToString()
    expected = wire.encode_request(1, METHOD.route, len(payload), timeout_ms) + payload
    assert c.transport.value() == expected


def test_responses_match_by_call_id_in_any_order():
    c = ClientConn()
    d1 = c.proto.call(METHOD, echo_pb2.EchoRequest(payload=b"1"))
    d2 = c.proto.call(METHOD, echo_pb2.EchoRequest(payload=b"2"))
    r2 = echo_pb2.EchoReply(payload=b"two").SerializeToString()
    r1 = echo_pb2.EchoReply(payload=b"one").SerializeToString()
    c.proto.dataReceived(
        wire.encode_response(2, len(r2)) + r2 + wire.encode_response(1, len(r1)) + r1
    )
    assert result(d1).payload == b"one" and result(d2).payload == b"two"
    assert c.proto.outstanding == {}


@pytest.mark.parametrize("code", sorted(_BY_CODE))
def test_every_status_code_fails_with_its_type(code):
    c = ClientConn()
    d = c.proto.call(METHOD, echo_pb2.EchoRequest())
    c.proto.dataReceived(wire.encode_status(1, code, f"code {code}"))
    error = failure_of(d)
    assert type(error) is _BY_CODE[code]
    assert isinstance(error, RpcError)
    assert (error.code, error.message) == (code, f"code {code}")


def test_unknown_code_is_unknown_remote_error():
    c = ClientConn()
    d = c.proto.call(METHOD, echo_pb2.EchoRequest())
    c.proto.dataReceived(wire.encode_status(1, 999, "from the future"))
    error = failure_of(d)
    assert isinstance(error, UnknownRemoteError) and error.code == 999


def test_unparseable_response_is_a_typed_failure():
    c = ClientConn()
    d = c.proto.call(METHOD, echo_pb2.EchoRequest())
    c.proto.dataReceived(wire.encode_response(1, 2) + b"\xff\xff")
    assert failure_of(d).code == StatusCode.DATA_LOSS


def test_cancel_fails_locally_and_tells_the_provider():
    c = ClientConn()
    d = c.proto.call(METHOD, echo_pb2.EchoRequest())
    c.transport.clear()
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    assert c.transport.value() == wire.encode_cancel(1)
    r = echo_pb2.EchoReply().SerializeToString()
    c.proto.dataReceived(wire.encode_response(1, len(r)) + r)  # late answer: ignored
    assert c.proto.outstanding == {}


def test_deadline_fires_on_the_injected_clock_and_is_cleared_on_answer():
    c = ClientConn()
    slow = c.proto.call(METHOD, echo_pb2.EchoRequest(), timeout=1.0)
    quick = c.proto.call(METHOD, echo_pb2.EchoRequest(), timeout=1.0)
    r = echo_pb2.EchoReply().SerializeToString()
    c.proto.dataReceived(wire.encode_response(2, len(r)) + r)
    assert result(quick) == echo_pb2.EchoReply()
    assert len(timers(c.clock)) == 1  # one timer per connection, not per call
    c.clock.advance(0.999)
    assert not slow.called
    c.clock.advance(0.001)
    assert isinstance(failure_of(slow), DeadlineExceededError)
    assert timers(c.clock) == []


def test_connection_lost_fails_outstanding_calls_and_later_calls():
    c = ClientConn()
    ds = [c.proto.call(METHOD, echo_pb2.EchoRequest(), timeout=5) for _ in range(3)]
    c.proto.connectionLost(Failure(ConnectionDone()))
    for d in ds:
        assert isinstance(failure_of(d), UnavailableError)
    assert isinstance(failure_of(c.proto.call(METHOD, echo_pb2.EchoRequest())), UnavailableError)
    assert timers(c.clock) == []


def test_goaway_refuses_new_calls_but_keeps_calls_in_flight():
    c = ClientConn()
    d = c.proto.call(METHOD, echo_pb2.EchoRequest())
    c.proto.dataReceived(wire.encode_goaway(1, "bye"))
    refused = c.proto.call(METHOD, echo_pb2.EchoRequest())
    assert "shutting down" in failure_of(refused).message
    r = echo_pb2.EchoReply().SerializeToString()
    c.proto.dataReceived(wire.encode_response(1, len(r)) + r)
    assert result(d) == echo_pb2.EchoReply()


def test_ping_measures_round_trip_on_the_clock():
    c = ClientConn()
    d = c.proto.ping(b"p")
    (frame,) = c.sent()
    assert frame.kind == FrameKind.PING
    c.clock.advance(0.25)
    c.proto.dataReceived(wire.encode_pong(frame.call_id, b"p"))
    assert result(d) == 0.25


# ------------------------------------------------------------------ in memory


def test_proxy_calls_in_memory():
    memory = MemoryProvider([EchoService()])
    echo = memory.proxy(ECHO)
    ds = [echo.Echo(echo_pb2.EchoRequest(payload=bytes([i]))) for i in range(50)]
    memory.flush()
    assert [result(d).payload for d in ds] == [bytes([i]) for i in range(50)]
    assert len(memory.factory.connections) == 1  # one shared connection


def test_async_handler_and_await_in_memory():
    memory = MemoryProvider([EchoService()])
    echo = memory.proxy("mprpc.test.EchoService", metadata={"app": "test"})

    async def use() -> bytes:
        reply = await echo.AsyncEcho(echo_pb2.EchoRequest(payload=b"later", delay=3))
        return reply.payload + b"/" + reply.metadata["app"].encode()

    d = Deferred.fromCoroutine(use())
    memory.flush()
    assert not d.called
    memory.advance(3)
    assert result(d) == b"later/test"


def test_timeout_travels_as_deadline_and_expires_in_memory():
    memory = MemoryProvider([EchoService()])
    echo = memory.proxy(ECHO)
    d = echo.AsyncEcho(echo_pb2.EchoRequest(delay=5), timeout=1)
    memory.flush()
    (conn,) = memory.factory.connections
    assert conn.pending and conn.deadlines  # the provider tracks the caller's deadline
    memory.advance(1)
    assert isinstance(failure_of(d), DeadlineExceededError)
    assert conn.pending == {}


def test_cancel_reaches_the_provider_in_memory():
    memory = MemoryProvider([EchoService()])
    d = memory.proxy(ECHO).AsyncEcho(echo_pb2.EchoRequest(delay=5))
    memory.flush()
    (conn,) = memory.factory.connections
    assert len(conn.pending) == 1
    d.cancel()
    memory.flush()
    assert isinstance(failure_of(d), CancelledError)
    assert conn.pending == {}


def test_wrong_request_type_fails_the_deferred():
    memory = MemoryProvider([EchoService()])
    d = memory.proxy(ECHO).Echo(user_pb2.LoginRequest())
    assert isinstance(failure_of(d), TypeError)


def test_client_interceptors_see_and_change_calls():
    from zope.interface import implementer

    @implementer(IClientInterceptor)
    class AddToken:
        def __init__(self):
            self.calls = []

        def intercept(self, call, request, proceed):
            self.calls.append(call.method.name)
            call.metadata["token"] = "t1"
            return proceed(call, request)

    token = AddToken()
    verifyObject(IClientInterceptor, token)
    memory = MemoryProvider([EchoService()], client_interceptors=[token])
    d = memory.proxy(ECHO).Echo(echo_pb2.EchoRequest())
    memory.flush()
    assert dict(result(d).metadata) == {"token": "t1"}
    assert token.calls == ["Echo"]


def test_remote_errors_in_memory():
    memory = MemoryProvider([EchoService()])
    echo = memory.proxy(ECHO)
    d1 = echo.Echo(echo_pb2.EchoRequest(fail_code=StatusCode.NOT_FOUND, fail_message="gone"))
    d2 = echo.NotImplemented(echo_pb2.EchoRequest())
    memory.flush()
    assert isinstance(failure_of(d1), NotFoundError)
    assert failure_of(d2).code == StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------ channels


def test_unreachable_provider_fails_fast_and_is_redialled_with_backoff():
    reactor = MemoryReactorClock()
    client = Client(reactor, providers={"mprpc.test.EchoService": ["127.0.0.1:9"]})
    echo = client.proxy(ECHO)
    waiting = echo.Echo(echo_pb2.EchoRequest())  # dialling: the call waits
    assert not waiting.called
    completer = ConnectionCompleter(reactor)
    completer.failOnce(Failure(ConnectionRefusedError()))
    assert isinstance(failure_of(waiting), UnavailableError)
    fast = echo.Echo(echo_pb2.EchoRequest())  # failed state: no waiting at all
    assert "cannot connect" in failure_of(fast).message
    (channel,) = client.channels.values()
    assert channel.state == "failed"
    reactor.advance(0.2)  # first backoff (0.1 s +- 20 %)
    assert channel.state == "connecting" and len(reactor.tcpClients) == 1


def test_closing_the_client_from_a_failed_call_leaves_no_redial_pending():
    # A caller that closes the client as soon as its call fails (as trial's
    # cleanups do right after a test's last await) must not leave a redial
    # scheduled on the closed channel: the reactor would be unclean.
    reactor = MemoryReactorClock()
    client = Client(reactor, providers={"mprpc.test.EchoService": ["127.0.0.1:9"]})
    waiting = client.proxy(ECHO).Echo(echo_pb2.EchoRequest())
    closed = []
    waiting.addErrback(lambda f: closed.append(client.close()))
    ConnectionCompleter(reactor).failOnce(Failure(ConnectionRefusedError()))
    assert closed and result(closed[0]) is None
    assert timers(reactor) == []


def test_closing_the_client_cancels_the_timers_of_channels_still_retiring():
    # A channel discovery dropped waits for its calls (checked every 0.5 s);
    # the client's close closes it at once and leaves no check pending.
    from twisted.internet.defer import succeed

    reactor = MemoryReactorClock()
    client = Client(reactor, providers={})
    closed = []

    class Busy:
        load = 1

        def close(self):
            closed.append(self)
            return succeed(None)

    busy = Busy()
    client._retire(busy, reactor.seconds() + 60)
    assert len(timers(reactor)) == 1 and not closed
    result(client.close())
    assert closed == [busy] and timers(reactor) == []


def test_calls_waiting_for_a_connection_honour_timeout_and_cancel():
    reactor = MemoryReactorClock()
    client = Client(reactor, providers={"mprpc.test.EchoService": ["127.0.0.1:9"]})
    echo = client.proxy(ECHO)
    timed = echo.Echo(echo_pb2.EchoRequest(), timeout=1)
    cancelled = echo.Echo(echo_pb2.EchoRequest())
    cancelled.cancel()
    assert isinstance(failure_of(cancelled), CancelledError)
    reactor.advance(1)
    assert isinstance(failure_of(timed), DeadlineExceededError)
    (channel,) = client.channels.values()
    assert channel._waiters == []


def test_reconnects_after_connection_loss():
    memory = MemoryProvider([EchoService()])
    echo = memory.proxy(ECHO)
    d = echo.AsyncEcho(echo_pb2.EchoRequest(delay=5))
    memory.flush()
    memory.pumps[0].serverIO.loseConnection()
    memory.flush()
    assert isinstance(failure_of(d), UnavailableError)
    again = echo.Echo(echo_pb2.EchoRequest(payload=b"back"))
    memory.flush()
    assert result(again).payload == b"back"


def test_no_provider_is_unavailable():
    client = Client(MemoryReactorClock(), providers={})
    d = client.proxy(ECHO).Echo(echo_pb2.EchoRequest())
    assert "no provider of mprpc.test.EchoService" in failure_of(d).message


def test_static_registry_provides_both_interfaces():
    registry = StaticRegistry({"a.B": ["127.0.0.1:1", "[::1]:2"]})
    verifyObject(IServiceDiscovery, registry)
    verifyObject(IServiceRegistry, registry)
    seen = []
    registry.subscribe("a.B", seen.append)
    assert [str(a) for a in seen[0]] == ["127.0.0.1:1", "[::1]:2"]


def test_close_waits_for_connections_to_close():
    memory = MemoryProvider([EchoService()])
    d = memory.proxy(ECHO).AsyncEcho(echo_pb2.EchoRequest(delay=5))
    memory.flush()
    closed = memory.client.close()
    assert not closed.called
    memory.flush()
    assert result(closed) is None
    assert isinstance(failure_of(d), UnavailableError)
    assert memory.factory.connections == set()


def test_deadline_queue_in_and_out_of_order():
    from twisted_rpc.core._deadlines import DeadlineQueue

    clock = Clock()
    live = {i: None for i in range(1, 6)}
    expired = []
    queue = DeadlineQueue(clock, live, lambda i: (expired.append(i), live.pop(i)))
    queue.add(5.0, 1)
    queue.add(6.0, 2)
    queue.add(2.0, 3)  # earlier than the last: heap, and the timer moves up
    queue.add(6.0, 4)
    queue.add(9.0, 5)
    del live[2]  # answered
    clock.advance(2.0)
    assert expired == [3]
    clock.advance(4.0)
    assert expired == [3, 1, 4]
    clock.advance(3.0)
    assert expired == [3, 1, 4, 5]
    assert timers(clock) == []


def test_deadline_queue_stays_small_when_calls_are_answered():
    from twisted_rpc.core._deadlines import DeadlineQueue

    clock = Clock()
    live: dict[int, None] = {}
    queue = DeadlineQueue(clock, live, lambda i: None)
    for i in range(10_000):
        live[i] = None
        queue.add(30.0 + i * 1e-6, i)
        del live[i]  # answered at once
    assert len(queue) <= 65


def test_call_ids_wrap_around_skipping_calls_in_flight():
    c = ClientConn()
    c.proto._next_id = 0xFFFFFFFF
    first = c.proto.call(METHOD, echo_pb2.EchoRequest())  # id 0xFFFFFFFF, then 1 again
    assert c.proto._next_id == 1
    c.proto.outstanding[1] = c.proto.outstanding[2] = (Deferred(), echo_pb2.EchoReply)
    c.proto.call(METHOD, echo_pb2.EchoRequest())
    assert sorted(c.proto.outstanding) == [1, 2, 3, 0xFFFFFFFF]
    assert not first.called


def test_tls_follows_what_the_registration_says():
    from twisted_rpc import ClientTLS, ProviderAddress

    mine = ClientTLS(ca="ca.pem")
    client = Client(MemoryReactorClock(), providers={}, tls=mine)
    assert client._tls_for(ProviderAddress("h", 1)) is mine  # static list: the client's
    assert client._tls_for(ProviderAddress("h", 1, data={"tls": True})) is mine
    plain = Client(MemoryReactorClock(), providers={})
    assert plain._tls_for(ProviderAddress("h", 1, data={"tls": True})) == ClientTLS()  # upgrade
    assert plain._tls_for(ProviderAddress("h", 1)) is None
    assert plain._tls_for(ProviderAddress("h", 1, data={"tls": False})) is None
