"""Limits and keepalive: calls in flight, connections, idle connections, dead peers."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import ServerConn, failure_of, frames_of, result
from twisted_rpc import Dispatcher, ServerLimits, StatusCode, UnavailableError
from twisted_rpc.client import ClientConnection
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._codec import FrameKind
from twisted_rpc.server import ServerFactory
from twisted_rpc.testing import MemoryProvider

ASYNC = describe(ECHO).methods["AsyncEcho"]


def test_calls_per_connection_over_the_limit_are_resource_exhausted():
    clock, factory = _server(ServerLimits(max_calls_per_connection=3))
    conn = ServerConn(factory)
    for call_id in range(1, 6):
        _request(conn, call_id)
    refused = conn.frames()
    assert [(f.call_id, f.status) for f in refused] == [
        (4, StatusCode.RESOURCE_EXHAUSTED),
        (5, StatusCode.RESOURCE_EXHAUSTED),
    ]
    assert refused[1].message == (
        "3 calls in flight on this connection (the provider's max_calls_per_connection)"
    )
    clock.advance(1)
    assert sorted(f.call_id for f in conn.frames()) == [1, 2, 3]
    assert factory.calls_in_flight == 0
    _request(conn, 6)  # room again
    clock.advance(1)
    assert [(f.call_id, f.status) for f in conn.frames()] == [(6, StatusCode.OK)]


def test_a_consumer_holds_calls_past_the_announced_limit_instead():
    memory = MemoryProvider([EchoService()], limits=ServerLimits(max_calls_per_connection=3))
    echo = memory.proxy(ECHO)
    slow = [echo.AsyncEcho(echo_pb2.EchoRequest(delay=1)) for _ in range(5)]
    quick = echo.Echo(echo_pb2.EchoRequest(payload=b"sync"))  # waits its turn too
    memory.flush()
    assert memory.factory.calls_in_flight == 3
    assert not any(d.called for d in slow) and not quick.called
    memory.advance(1)
    assert result(quick).payload == b"sync"
    memory.advance(1)
    assert all(result(d) for d in slow)
    assert memory.factory.calls_in_flight == 0


def _server(limits: ServerLimits):
    clock = Clock()
    factory = ServerFactory(Dispatcher([EchoService()]), clock, limits=limits)
    return clock, factory


def _request(conn: ServerConn, call_id, delay=1.0):
    conn.request(call_id, ASYNC.route, echo_pb2.EchoRequest(delay=delay))


def _frames(transport):
    frames = frames_of(transport.value())
    transport.clear()
    return frames


def test_calls_per_provider_are_limited_across_connections():
    clock, factory = _server(ServerLimits(max_calls=2))
    a, b = ServerConn(factory), ServerConn(factory)
    _request(a, 1)
    _request(b, 1)
    _request(b, 2)
    (refused,) = b.frames()
    assert (refused.call_id, refused.status) == (2, StatusCode.RESOURCE_EXHAUSTED)
    assert factory.calls_in_flight == 2
    a.proto.connectionLost(None)  # its call is cancelled: room again
    assert factory.calls_in_flight == 1
    _request(b, 3)
    assert b.frames() == []
    clock.advance(1)
    assert {f.call_id for f in b.frames()} == {1, 3}
    assert factory.calls_in_flight == 0


def test_connections_over_the_limit_are_refused():
    _, factory = _server(ServerLimits(max_connections=2))
    first = ServerConn(factory)
    ServerConn(factory)
    assert ServerConn(factory).proto is None  # refused, its transport closed
    first.proto.connectionLost(None)
    assert ServerConn(factory).proto is not None


def test_idle_connections_are_closed():
    clock, factory = _server(ServerLimits(idle_timeout=10))
    factory.doStart()
    idle, busy = ServerConn(factory), ServerConn(factory)
    t_idle, t_busy = idle.transport, busy.transport
    _request(busy, 1, delay=30)
    clock.advance(6)
    assert not t_idle.disconnecting
    clock.advance(6)  # idle for 12 s, swept every 5 s
    assert t_idle.disconnecting
    (goaway,) = idle.frames()
    assert (goaway.kind, goaway.status) == (FrameKind.GOAWAY, wire.GoawayReason.IDLE)
    assert not t_busy.disconnecting  # a call in flight keeps it open
    factory.doStop()
    assert clock.getDelayedCalls() != []  # the busy call's own timer only
    assert all(call.func != factory._sweep for call in clock.getDelayedCalls())


def test_keepalive_detects_a_silent_peer():
    clock = Clock()
    conn = ClientConnection(clock, keepalive_interval=2, keepalive_timeout=1)
    transport = StringTransport()
    conn.makeConnection(transport)
    d = conn.call(ASYNC, echo_pb2.EchoRequest())
    transport.clear()
    clock.advance(2)
    (ping,) = _frames(transport)
    assert ping.kind == FrameKind.PING
    conn.dataReceived(wire.encode_pong(ping.call_id))  # answered: stays open
    clock.advance(2)
    (ping,) = _frames(transport)
    clock.advance(1)  # no answer this time
    assert transport.disconnecting or transport.disconnected
    conn.connectionLost(None)
    assert isinstance(failure_of(d), UnavailableError)
    assert clock.getDelayedCalls() == []


def test_full_write_buffer_pauses_reading_at_the_provider():
    _, factory = _server(ServerLimits())
    transport = ServerConn(factory).transport
    transport.producer.pauseProducing()  # what Twisted does when the buffer is full
    assert transport.producerState == "paused"
    transport.producer.resumeProducing()
    assert transport.producerState == "producing"


def test_a_slow_provider_holds_calls_up_to_max_write_buffer_at_the_consumer():
    # A paused transport means the provider reads slower than we write: busy
    # with large calls, or not reading at all. Calls still go to the
    # transport's buffer until max_write_buffer bytes of them wait there.
    conn = ClientConnection(Clock(), max_write_buffer=2500)
    transport = StringTransport()
    conn.makeConnection(transport)
    request = echo_pb2.EchoRequest(payload=b"p" * 1000)
    size = request.ByteSize()
    transport.producer.pauseProducing()
    transport.clear()
    held = [conn.call(ASYNC, request) for _ in range(2)]  # 2 x 1003 bytes: under the bound
    refused = conn.call(ASYNC, request)  # a third would pass it
    assert not any(d.called for d in held)
    assert [f.call_id for f in _frames(transport)] == [1, 2]
    error = failure_of(refused)
    assert error.code == StatusCode.RESOURCE_EXHAUSTED
    assert "more than 2500 bytes of calls wait to be sent" in error.message
    assert 2 * size <= 2500 < 3 * size
    transport.producer.resumeProducing()  # drained: the count starts again
    again = [conn.call(ASYNC, request) for _ in range(2)]
    assert not any(d.called for d in again)
    assert len(_frames(transport)) == 2
