"""What a hostile peer can do to a provider (issue 13): bounded work, memory and text."""

from __future__ import annotations

import gc
import struct
import weakref

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import ROUTE, ServerConn
from twisted_rpc import (
    Dispatcher,
    ProviderService,
    ResourceExhaustedError,
    ServerLimits,
    Service,
    StatusCode,
)
from twisted_rpc.client import ClientConnection
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import _ext, describe
from twisted_rpc.core._codec import FrameKind, GoawayReason
from twisted_rpc.core._connection import CLOSE_TIMEOUT, RefusedConnection
from twisted_rpc.ops._protos import HEALTH, HealthCheckResponse
from twisted_rpc.server import ServerFactory

ASYNC_ROUTE = b"mprpc.test.EchoService/AsyncEcho"
WATCH_ROUTE = b"mprpc.health.v1.Health/Watch"
ASYNC = describe(ECHO).methods["AsyncEcho"]


class Watcher(Service, descriptor=HEALTH):
    """A Health whose Watch waits until told, declared long-lived."""

    long_lived_methods = frozenset({"Watch"})

    def __init__(self) -> None:
        self.waiting: list[Deferred] = []

    def Watch(self, request, context):
        d: Deferred = Deferred()
        self.waiting.append(d)
        return d


def _factory(services=None, **limits):
    clock = Clock()
    factory = ServerFactory(
        Dispatcher(services or [EchoService()]), clock, limits=ServerLimits(**limits)
    )
    return clock, factory


def _ext_frame(kind, call_id, ext: bytes, route=b"", payload=b"", status=0) -> bytes:
    """A frame with a hand-made extension block."""
    length = wire.HEADER_SIZE - 4 + len(route) + 4 + len(ext) + len(payload)
    header = struct.pack("!IBBHIIH", length, kind, wire.FLAG_EXT, status, call_id, 0, len(route))
    return header + route + struct.pack("!I", len(ext)) + ext + payload


@pytest.fixture
def entries_visited(monkeypatch):
    """Counts the extension entries the decoder walks."""
    count = [0]
    unpack = _ext._unpack_entry

    def counting(buffer, pos):
        count[0] += 1
        return unpack(buffer, pos)

    monkeypatch.setattr(_ext, "_unpack_entry", counting)
    return count


# --------------------------------------------------------------------------- item 8


def _still_serving(conn: ServerConn, call_id: int) -> None:
    conn.request(call_id, message=echo_pb2.EchoRequest(payload=b"ok"))
    (frame,) = conn.frames()
    assert (frame.call_id, frame.status) == (call_id, 0)
    assert not conn.transport.disconnecting


def test_a_60_mib_extension_of_reserved_entries_is_refused_unread(entries_visited):
    _, factory = _factory()
    conn = ServerConn(factory)
    payload = echo_pb2.EchoRequest(payload=b"x").SerializeToString()
    ext = b"\x09\x00\x00\x00\x00" * (60 * 1024 * 1024 // 5)  # reserved tag, empty value
    conn.proto.dataReceived(_ext_frame(FrameKind.REQUEST, 7, ext, ROUTE, payload))
    assert entries_visited[0] == 0
    (frame,) = conn.frames()
    assert (frame.call_id, frame.status) == (7, StatusCode.RESOURCE_EXHAUSTED)
    assert "max_metadata_size" in frame.message and str(len(ext)) in frame.message
    _still_serving(conn, 8)


def test_a_mib_of_distinct_metadata_keys_is_refused_unread(entries_visited):
    _, factory = _factory()
    conn = ServerConn(factory)
    metadata = {f"k{i:07d}": "" for i in range(100_000)}  # ~1.2 MiB of distinct keys
    conn.request(3, metadata=metadata)
    assert entries_visited[0] == 0
    (frame,) = conn.frames()
    assert (frame.call_id, frame.status) == (3, StatusCode.RESOURCE_EXHAUSTED)
    assert "max_metadata_size" in frame.message
    _still_serving(conn, 4)


def test_too_many_small_entries_are_refused_after_the_limit(entries_visited):
    _, factory = _factory(max_metadata_entries=10)
    conn = ServerConn(factory)
    conn.request(1, metadata={f"k{i}": "v" for i in range(500)})  # 3.5 KiB: under the size
    assert entries_visited[0] == 10
    (frame,) = conn.frames()
    assert frame.status == StatusCode.RESOURCE_EXHAUSTED
    assert "max_metadata_entries" in frame.message
    conn.request(2, metadata={f"k{i}": "v" for i in range(10)})  # at the limit: served
    (frame,) = conn.frames()
    assert frame.status == 0
    assert len(echo_pb2.EchoReply.FromString(frame.payload).metadata) == 10


def test_the_metadata_size_limit_is_configurable():
    _, factory = _factory(max_metadata_size=64)
    conn = ServerConn(factory)
    conn.request(1, metadata={"user": "x" * 100})
    (frame,) = conn.frames()
    assert frame.status == StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 64" in frame.message


def test_an_oversized_request_extension_on_an_unknown_route_is_not_found():
    _, factory = _factory()
    conn = ServerConn(factory)
    conn.proto.dataReceived(_ext_frame(FrameKind.REQUEST, 1, b"\x00" * 20_000, b"no.Such/Thing"))
    (frame,) = conn.frames()
    assert frame.status == StatusCode.NOT_FOUND


def test_a_ping_extension_is_read_for_settings_within_the_limits(entries_visited):
    """A PING's extension holds settings: at most max_metadata_entries of its
    entries are walked, and one over the limits is ignored (answered)."""
    _, factory = _factory()
    conn = ServerConn(factory)
    conn.proto.dataReceived(_ext_frame(FrameKind.PING, 9, b"\x09\x00\x00\x00\x00" * 1000))
    (pong,) = conn.frames()
    assert (pong.kind, pong.call_id) == (FrameKind.PONG, 9)
    assert entries_visited[0] <= wire.DEFAULT_MAX_EXT_ENTRIES + 1
    assert conn.proto.peer_settings is None
    conn.proto.dataReceived(_ext_frame(FrameKind.PING, 10, b"\x09" * 20_000))
    (pong,) = conn.frames()
    assert pong.call_id == 10
    assert entries_visited[0] <= wire.DEFAULT_MAX_EXT_ENTRIES + 1


def test_the_consumer_refuses_an_oversized_answer_extension_and_keeps_the_connection(
    entries_visited,
):
    conn = ClientConnection(Clock())
    transport = StringTransport()
    conn.makeConnection(transport)
    d = conn.call(ASYNC, echo_pb2.EchoRequest())
    other = conn.call(ASYNC, echo_pb2.EchoRequest())
    bomb = b"\x09\x00\x00\x00\x00" * (1024 * 1024 // 5)
    conn.dataReceived(_ext_frame(FrameKind.RESPONSE, 1, bomb))
    assert entries_visited[0] == 0
    failures = []
    d.addErrback(failures.append)
    (failure,) = failures
    assert isinstance(failure.value, ResourceExhaustedError)
    assert "exceeds the limit" in failure.value.message
    assert entries_visited[0] == 0
    assert not transport.disconnecting
    reply = echo_pb2.EchoReply(payload=b"fine").SerializeToString()
    conn.dataReceived(wire.encode_response(2, len(reply)) + reply)
    results = []
    other.addCallback(results.append)
    assert results[0].payload == b"fine"


def test_an_oversized_goaway_extension_keeps_its_reason():
    conn = ClientConnection(Clock())
    conn.makeConnection(StringTransport())
    frame = _ext_frame(FrameKind.GOAWAY, 0, b"\x00" * 10_000, status=GoawayReason.IDLE)
    conn.dataReceived(frame)
    assert conn.goaway_reason == GoawayReason.IDLE
    # With no call left the consumer closes the connection itself; not aborted as a bad frame.
    assert conn.transport.disconnecting and not conn.transport.disconnected


# --------------------------------------------------------------------------- item 9


def test_long_lived_calls_have_their_own_budget():
    watcher = Watcher()
    _, factory = _factory(
        [EchoService(), watcher],
        max_calls=20,
        max_calls_per_connection=10,
        max_long_lived_calls_per_connection=5,
        max_long_lived_calls=30,
    )
    attackers = [ServerConn(factory, port=2000 + i) for i in range(10)]
    refusals = []
    for conn in attackers:
        for call_id in range(1, 101):  # 10 connections x 100 watches
            conn.request(call_id, WATCH_ROUTE, echo_pb2.EchoRequest())
        refusals += [f.message for f in conn.frames() if f.status]
    assert len(watcher.waiting) == 30
    assert factory.long_lived_in_flight == 30 and factory.in_flight == 0
    assert len(refusals) == 1000 - 30
    assert any("5 long-lived calls" in m and "on this connection" in m for m in refusals)
    assert any("30 long-lived calls" in m and "at this provider" in m for m in refusals)
    # Ordinary calls from a good client are not locked out.
    good = ServerConn(factory, host="10.0.0.2")
    for call_id in range(1, 11):
        good.request(call_id, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=1))
    assert good.frames() == []
    assert factory.in_flight == 10 and factory.calls_in_flight == 40
    factory.clock.advance(1)
    assert [f.status for f in good.frames()] == [0] * 10
    # A watch that ends gives its slot back.
    watcher.waiting[0].callback(HealthCheckResponse())
    assert factory.long_lived_in_flight == 29


def test_long_lived_slots_are_returned_when_the_connection_goes():
    watcher = Watcher()
    _, factory = _factory([watcher], max_long_lived_calls=3)
    conn = ServerConn(factory)
    for call_id in (1, 2, 3):
        conn.request(call_id, WATCH_ROUTE, echo_pb2.EchoRequest())
    assert factory.long_lived_in_flight == 3
    conn.proto.connectionLost(None)
    assert factory.long_lived_in_flight == 0 and factory.calls_in_flight == 0


def test_long_lived_methods_must_name_methods_of_the_service():
    class Wrong(Service, descriptor=HEALTH):
        long_lived_methods = frozenset({"Wtach"})

    with pytest.raises(ValueError, match="Wtach"):
        Dispatcher([Wrong()])


# --------------------------------------------------------------------------- item 10


def test_a_frame_dribbled_a_byte_at_a_time_is_closed_after_frame_timeout(logged):
    clock, factory = _factory(idle_timeout=10, frame_timeout=30)
    factory.doStart()
    conn = ServerConn(factory)
    frame = wire.encode_request(1, ROUTE, 100) + b"\x00" * 100
    closed_at = None
    for i in range(40):  # one byte every 2.5 s, for 100 s
        clock.advance(2.5)
        if conn.transport.disconnecting:
            closed_at = clock.seconds()
            break
        conn.proto.dataReceived(frame[i : i + 1])
    factory.doStop()
    assert closed_at is not None and 30 <= closed_at <= 42.5
    assert conn.transport.disconnected  # aborted
    assert any("frame_timeout" in str(e.get("why", "")) for e in logged)


def test_a_frame_that_completes_in_time_is_not_closed_and_counts_as_activity():
    clock, factory = _factory(idle_timeout=10, frame_timeout=30)
    factory.doStart()
    conn = ServerConn(factory)
    data = wire.encode_request(1, ROUTE, 0)
    conn.proto.dataReceived(data[:5])
    clock.advance(8)
    assert conn.proto.last_active == 0  # a partial frame is not activity
    conn.proto.dataReceived(data[5:])
    assert conn.proto.last_active == 8 and conn.proto.partial_since is None
    clock.advance(8)
    assert not conn.transport.disconnecting
    clock.advance(10)
    assert conn.transport.disconnecting  # now idle
    factory.doStop()


def test_connections_per_peer_address_are_capped():
    _, factory = _factory(max_connections_per_peer=2)
    a = ServerConn(factory, "10.0.0.1", 1)
    ServerConn(factory, "10.0.0.1", 2)
    assert ServerConn(factory, "10.0.0.1", 3).proto is None
    assert ServerConn(factory, "10.0.0.9", 1).proto is not None  # another peer
    a.proto.connectionLost(None)
    assert ServerConn(factory, "10.0.0.1", 4).proto is not None
    assert factory.per_peer == {"10.0.0.1": 2, "10.0.0.9": 1}


def test_partial_frames_past_max_buffered_bytes_close_the_largest_holder(logged):
    _, factory = _factory(max_buffered_bytes=1000)
    conns = [ServerConn(factory, port=p) for p in (1, 2, 3)]
    header = wire.encode_request(1, ROUTE, 10_000)
    for conn, size in zip(conns, (400, 500, 300), strict=True):
        conn.proto.dataReceived(header + b"\x00" * size)
    largest = conns[1]
    assert largest.transport.disconnected
    assert largest.proto.decoder.buffered == 0  # let go at once, not at connectionLost
    assert not conns[0].transport.disconnecting and not conns[2].transport.disconnecting
    held = 2 * len(header) + 700
    assert factory.partial_bytes == held
    assert any("max_buffered_bytes" in str(e.get("why", "")) for e in logged)
    largest.proto.connectionLost(None)
    assert factory.partial_bytes == held
    conns[0].proto.connectionLost(None)
    assert factory.partial_bytes == len(header) + 300
    conns[2].proto.dataReceived(b"\x00" * (10_000 - 300))  # completes: INVALID_ARGUMENT
    assert factory.partial_bytes == 0


# --------------------------------------------------------------------------- item 11


def _dead_connection_is_freed(proto) -> None:
    """``proto`` (connected, only referenced by the caller's argument) is
    freed once lost, with a partial frame in, without the cycle collector."""
    proto.dataReceived(wire.encode_request(1, ROUTE, 1 << 20) + b"\x00" * 100_000)
    assert proto.decoder.buffered > 100_000
    proto.connectionLost(None)
    assert proto.decoder.buffered == 0
    ref = weakref.ref(proto)
    del proto
    assert ref() is None


def _connected(proto):
    proto.makeConnection(StringTransport())
    return proto


def test_a_closed_provider_connection_is_freed_by_refcounting_alone():
    _, factory = _factory()
    gc.collect()
    gc.disable()
    try:
        _dead_connection_is_freed(_connected(factory.buildProtocol(None)))
    finally:
        gc.enable()


def _watching(factory):
    conn = ServerConn(factory)
    conn.request(1, WATCH_ROUTE, echo_pb2.EchoRequest(), timeout_ms=5000)
    conn.request(2, WATCH_ROUTE, echo_pb2.EchoRequest())
    assert len(conn.proto.pending) == 2
    return conn.proto


def test_a_closed_connection_with_calls_in_flight_is_freed_by_refcounting_alone():
    _, factory = _factory([EchoService(), Watcher()])
    gc.collect()
    gc.disable()
    try:
        _dead_connection_is_freed(_watching(factory))
    finally:
        gc.enable()


def _calling(clock):
    conn = _connected(ClientConnection(clock))
    for timeout in (5, None):
        conn.call(ASYNC, echo_pb2.EchoRequest(), timeout=timeout).addErrback(lambda f: None)
    return conn


def test_a_closed_consumer_connection_is_freed_by_refcounting_alone():
    clock = Clock()
    gc.collect()
    gc.disable()
    try:
        _dead_connection_is_freed(_calling(clock))
        assert clock.getDelayedCalls() == []
    finally:
        gc.enable()


# --------------------------------------------------------------------------- item 12


def test_an_unknown_route_is_quoted_truncated_in_the_error_and_the_log(logged):
    _, factory = _factory()
    conn = ServerConn(factory)
    route = b"a" * 30_000 + b"/" + b"b" * 35_534  # 65,535 bytes
    conn.request(1, route)
    (frame,) = conn.frames()
    assert frame.status == StatusCode.NOT_FOUND
    assert len(frame.message) < 300 and "(30000 characters)" in frame.message
    failed = [e for e in logged if "failed" in e.get("log_format", "")]
    assert failed and all(len(repr(e)) < 2000 for e in failed)


def test_a_long_handler_error_message_is_cut_on_the_wire():
    _, factory = _factory()
    conn = ServerConn(factory)
    conn.request(1, message=echo_pb2.EchoRequest(fail_code=9, fail_message="m" * 100_000))
    (frame,) = conn.frames()
    assert frame.status == 9
    assert len(frame.message) < 1100 and "(100000 characters)" in frame.message


# --------------------------------------------------------------------------- item 13


def test_a_finished_calls_deadline_does_not_expire_a_later_call_with_its_id():
    clock, factory = _factory()
    conn = ServerConn(factory)
    conn.request(7, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=1), timeout_ms=10_000)
    clock.advance(1)
    (first,) = conn.frames()
    assert (first.call_id, first.status) == (7, 0)
    clock.advance(1)
    conn.request(7, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=20), timeout_ms=100_000)
    clock.advance(9)  # the first call's deadline passes
    assert conn.frames() == []
    clock.advance(11)
    (second,) = conn.frames()
    assert (second.call_id, second.status) == (7, 0)


def test_answers_before_a_malformed_frame_are_flushed_before_closing():
    _, factory = _factory()
    conn = ServerConn(factory)
    payload = echo_pb2.EchoRequest(payload=b"before").SerializeToString()
    good = wire.encode_request(1, ROUTE, len(payload)) + payload
    conn.proto.dataReceived(good + wire.encode_header(99, 2, 0))  # then an unknown kind
    (frame,) = conn.frames()
    assert echo_pb2.EchoReply.FromString(frame.payload).payload == b"before"
    assert conn.transport.disconnecting and not conn.transport.disconnected  # a graceful close
    conn.proto.dataReceived(good)  # nothing more is read
    assert conn.frames() == []
    factory.clock.advance(CLOSE_TIMEOUT)  # the peer never read it: aborted
    assert conn.transport.disconnected


def test_a_malformed_frame_with_nothing_to_flush_aborts_at_once():
    _, factory = _factory()
    conn = ServerConn(factory)
    conn.proto.dataReceived(wire.encode_header(99, 2, 0))
    assert conn.transport.disconnected
    assert factory.clock.getDelayedCalls() == []


# --------------------------------------------------------------------------- item 3


def test_goaway_reports_the_highest_call_accepted_and_its_reason():
    clock, factory = _factory()
    conn = ServerConn(factory)
    conn.request(5, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=1))
    conn.request(3, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=1))
    factory.goaway()
    (goaway,) = conn.frames()
    assert (goaway.kind, goaway.call_id, goaway.status) == (
        FrameKind.GOAWAY,
        5,
        GoawayReason.SHUTDOWN,
    )
    conn.request(6)
    (late,) = conn.frames()
    assert (late.call_id, late.status) == (6, StatusCode.UNAVAILABLE)
    clock.advance(1)
    assert sorted(f.call_id for f in conn.frames()) == [3, 5]


def test_stopping_waits_for_calls_without_polling_then_for_the_answers_to_go():
    reactor = MemoryReactorClock()
    provider = ProviderService(
        reactor, "tcp:0:interface=127.0.0.1", [EchoService()], grace_period=10
    )
    provider.startService()
    conn = ServerConn(provider.factory)
    conn.request(1, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=3))
    stopped = provider.stopService()
    assert not stopped.called
    assert len(reactor.getDelayedCalls()) == 2  # the call's delay and the grace period
    reactor.advance(3)  # the call ends: its answer is written, then the connection closed
    assert [f.call_id for f in conn.frames() if f.kind == FrameKind.RESPONSE] == [1]
    assert conn.transport.disconnecting and not stopped.called
    conn.proto.connectionLost(None)  # the answer is sent: closed
    assert stopped.called
    assert reactor.getDelayedCalls() == []


def test_stopping_gives_up_after_the_grace_period():
    reactor = MemoryReactorClock()
    provider = ProviderService(
        reactor, "tcp:0:interface=127.0.0.1", [EchoService()], grace_period=2
    )
    provider.startService()
    conn = ServerConn(provider.factory)
    conn.request(1, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=30))
    stopped = provider.stopService()
    reactor.advance(2)
    assert conn.transport.disconnecting and not conn.transport.disconnected
    reactor.advance(CLOSE_TIMEOUT)  # the peer does not read: aborted
    assert conn.transport.disconnected
    assert stopped.called


def test_a_violation_reported_by_a_handler_flushes_the_answers_once():
    _, factory = _factory()
    conn = ServerConn(factory)
    proto = conn.proto
    proto._handlers[FrameKind.PING] = lambda *fields: proto.protocol_violation("bad ping")
    payload = echo_pb2.EchoRequest(payload=b"once").SerializeToString()
    good = wire.encode_request(1, ROUTE, len(payload)) + payload
    proto.dataReceived(good + wire.encode_ping(1))
    (frame,) = conn.frames()
    assert echo_pb2.EchoReply.FromString(frame.payload).payload == b"once"
    assert conn.transport.disconnecting


# --------------------------------------------------------------------------- the mprpc listener


def _mprpc(services, **limits):
    from twisted_rpc.cpp import CppServerFactory

    return CppServerFactory(Dispatcher(services), Clock(), 1 << 20, ServerLimits(**limits))


def _mprpc_connect(factory, host="10.0.0.1", port=1):
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    proto.makeConnection(transport)
    if isinstance(proto, RefusedConnection):
        assert transport.disconnecting  # closed as soon as made
        return None
    return proto


def test_the_mprpc_listener_caps_connections_per_peer():
    factory = _mprpc([EchoService()], max_connections_per_peer=2)
    first = _mprpc_connect(factory, port=1)
    _mprpc_connect(factory, port=2)
    assert _mprpc_connect(factory, port=3) is None
    assert _mprpc_connect(factory, host="10.0.0.2") is not None
    first.connectionLost(None)
    assert _mprpc_connect(factory, port=4) is not None


def test_the_mprpc_listener_keeps_long_lived_calls_apart(logged):
    from twisted_rpc.cpp import encode_request

    watcher = Watcher()
    factory = _mprpc([EchoService(), watcher], max_calls=1, max_long_lived_calls=2)
    for port in (1, 2, 3):
        _mprpc_connect(factory, port=port).dataReceived(encode_request("Health", "Watch", b""))
    assert len(watcher.waiting) == 2 and factory.long_lived_in_flight == 2
    assert any("2 long-lived calls" in str(e.get("message", "")) for e in logged)
    call = _mprpc_connect(factory, port=4)
    args = echo_pb2.EchoRequest(delay=1).SerializeToString()
    call.dataReceived(encode_request("EchoService", "AsyncEcho", args))
    assert factory.in_flight == 1 and factory.calls_in_flight == 3
    watcher.waiting[0].callback(HealthCheckResponse())
    assert factory.long_lived_in_flight == 1


def test_the_mprpc_listener_quotes_a_long_unknown_name_truncated(logged):
    from twisted_rpc.cpp import encode_request

    factory = _mprpc([EchoService()])
    _mprpc_connect(factory).dataReceived(encode_request("EchoService", "M" * 4000, b""))
    (event,) = [e for e in logged if "failed" in str(e.get("log_format", ""))]
    assert "(4000 characters)" in event["message"] and len(event["message"]) < 300


def test_a_partial_frame_held_as_a_view_counts_the_read_it_pins():
    """A partial frame's rest kept as a view of its read (not copied) keeps
    the whole read in memory: max_buffered_bytes counts all of it."""
    _, factory = _factory(max_buffered_bytes=100_000)
    first, second = ServerConn(factory, port=1), ServerConn(factory, port=2)
    done = wire.encode_request(1, ROUTE, 56 * 1024 - 40) + b"\x00" * (56 * 1024 - 40)
    partial = wire.encode_request(3, ROUTE, 1 << 20) + b"\x00" * 8200
    read = done + partial  # one 64 KiB read: a whole request, then 8 KiB of the next
    first.proto.dataReceived(bytes(read))
    [held] = first.proto.decoder._chunks
    assert isinstance(held, memoryview) and len(held.obj) == len(read)
    assert factory.partial_bytes == len(read)  # not only the 8 KiB it shows
    assert not first.transport.disconnecting
    second.proto.dataReceived(bytes(read))  # two reads pinned: past the limit
    assert factory.partial_bytes <= 100_000
    assert first.transport.disconnecting or second.transport.disconnecting
