"""The write path on a real TCP socket: frames go out with one send when the
transport has nothing buffered, and anything the socket does not take is left
to the transport in order."""

from __future__ import annotations

import select
import socket
import time

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import ECHO as ECHO_SERVICE
from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from tests.helpers import failure_of, frames_of, over_tcp
from twisted_rpc import Dispatcher, StatusCode
from twisted_rpc.client import ClientConnection
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._codec import FrameDecoder
from twisted_rpc.core._direct_write import _unsent
from twisted_rpc.server import ServerFactory

ECHO = b"mprpc.test.EchoService/Echo"
ASYNC = describe(ECHO_SERVICE).methods["AsyncEcho"]


@pytest.fixture
def tcp_pair():
    """(provider connection on a real TCP transport, the peer's socket, reactor)."""
    yield from over_tcp(ServerFactory(Dispatcher([EchoService()]), Clock()).buildProtocol(None))


def request(call_id: int, payload: bytes = b"") -> bytes:
    body = echo_pb2.EchoRequest(payload=payload).SerializeToString()
    return wire.encode_request(call_id, ECHO, len(body)) + body


def receive_frames(peer: socket.socket, count: int, transport=None, reactor=None) -> list:
    """Read ``count`` frames from ``peer``; with a transport and reactor, play
    the reactor's part too: call doWrite whenever the transport wants to write
    and its socket can take more."""
    frames: list = []
    decoder = FrameDecoder(frames.append)
    deadline = time.monotonic() + 10
    while len(frames) < count:
        assert time.monotonic() < deadline, f"only {len(frames)} of {count} frames arrived"
        writing = transport is not None and transport in reactor.getWriters()
        readable, writable, _ = select.select(
            [peer], [transport.socket] if writing else [], [], 0.1
        )
        if writable:
            transport.doWrite()
        if readable:
            decoder.feed(peer.recv(1 << 20))
    return frames


def test_answers_go_out_at_once_with_nothing_left_to_the_reactor(tcp_pair):
    proto, peer, reactor = tcp_pair
    proto.dataReceived(request(1, b"a") + request(2, b"b"))
    transport = proto.transport
    assert not transport._tempDataLen and not transport.dataBuffer
    assert transport not in reactor.getWriters()  # no write interest added
    frames = receive_frames(peer, 2)
    assert [f.call_id for f in frames] == [1, 2]
    assert [echo_pb2.EchoReply.FromString(f.payload).payload for f in frames] == [b"a", b"b"]


def test_what_the_socket_does_not_take_stays_in_order_with_the_transport(tcp_pair):
    proto, peer, reactor = tcp_pair
    transport = proto.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 8192  # 2 MiB: far more than the socket takes at once
    proto.dataReceived(request(1, b"small") + request(2, big) + request(3, b"after"))
    assert transport._tempDataLen or transport.dataBuffer  # the rest waits in the transport
    assert transport in reactor.getWriters()

    frames = receive_frames(peer, 3, transport, reactor)
    assert [f.call_id for f in frames] == [1, 2, 3]
    replies = [echo_pb2.EchoReply.FromString(bytes(f.payload)).payload for f in frames]
    assert replies == [b"small", big, b"after"]


def test_many_small_answers_the_socket_takes_in_part_stay_whole_and_in_order(tcp_pair):
    # One read of 2,000 calls: its answers go out in a few joined writes
    # (FIRST_FLUSH), each larger than the socket takes at once.
    proto, peer, reactor = tcp_pair
    transport = proto.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = b"p" * 200
    proto.dataReceived(b"".join(request(i, payload) for i in range(1, 2001)))
    assert transport._tempDataLen or transport.dataBuffer  # the rest waits in the transport
    frames = receive_frames(peer, 2000, transport, reactor)
    assert [f.call_id for f in frames] == list(range(1, 2001))
    assert all(echo_pb2.EchoReply.FromString(bytes(f.payload)).payload == payload for f in frames)


def test_a_transport_with_data_buffered_gets_the_frames_after_it(tcp_pair):
    proto, peer, reactor = tcp_pair
    transport = proto.transport
    transport.write(wire.encode_ping(7))  # buffered, not sent yet
    proto.dataReceived(request(1, b"x"))
    assert transport._tempDataLen  # the answer queued behind the ping, not sent past it
    frames = receive_frames(peer, 2, transport, reactor)
    assert [(f.kind, f.call_id) for f in frames] == [(wire.FrameKind.PING, 7), (2, 1)]


def test_a_large_answer_inside_a_batch_keeps_the_order_on_any_transport():
    factory = ServerFactory(Dispatcher([EchoService()]), Clock())
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    big = b"z" * (200 * 1024)
    proto.dataReceived(request(1, b"a") + request(2, big) + request(3, b"c"))
    frames = frames_of(transport.value())
    assert [f.call_id for f in frames] == [1, 2, 3]
    assert echo_pb2.EchoReply.FromString(bytes(frames[1].payload)).payload == big


def test_unsent_pieces():
    assert _unsent([b"abc", b"de", b"f"], 0) == [b"abc", b"de", b"f"]
    assert _unsent([b"abc", b"de", b"f"], 2) == [b"c", b"de", b"f"]
    assert _unsent([b"abc", b"de", b"f"], 3) == [b"de", b"f"]
    assert _unsent([b"abc", b"de", b"f"], 5) == [b"f"]
    assert _unsent([b"abc", b"de", b"f"], 6) == []


def test_unsent_bytes_counts_what_the_tcp_transport_holds(tcp_pair):
    proto, peer, reactor = tcp_pair
    assert proto.unsent_bytes() == 0
    proto.transport.write(b"x" * 10)  # buffered until the reactor's turn
    assert proto.unsent_bytes() == 10
    memory = factory_connection()
    assert memory.unsent_bytes() is None  # a transport that does not tell


def factory_connection():
    proto = ServerFactory(Dispatcher([EchoService()]), Clock()).buildProtocol(None)
    proto.makeConnection(StringTransport())
    return proto


@pytest.fixture
def client_over_tcp():
    """(consumer connection on a real TCP transport, the provider side's socket, reactor)."""
    yield from over_tcp(ClientConnection(Clock(), max_write_buffer=1 << 20), buffer_size=16384)


def test_calls_wait_in_the_buffer_up_to_max_write_buffer_and_no_more(client_over_tcp):
    conn, peer, reactor = client_over_tcp
    request = echo_pb2.EchoRequest(payload=b"q" * 100_000)
    size = request.ByteSize()
    calls = []
    while len(calls) < 100:  # the provider reads nothing
        calls.append(conn.call(ASYNC, request))
        if calls[-1].called:
            break
    refused = calls.pop()
    assert conn.write_blocked
    error = failure_of(refused)
    assert error.code == StatusCode.RESOURCE_EXHAUSTED
    assert conn.unsent_bytes() <= 1 << 20 < conn.unsent_bytes() + size + 60
    assert not any(d.called for d in calls)


def test_a_busy_provider_never_trips_the_bound_while_it_keeps_reading(client_over_tcp):
    # The transport stays paused for as long as anything is buffered, so what
    # counts is what it holds now, not what was written since the pause.
    conn, peer, reactor = client_over_tcp
    peer.setblocking(False)
    request = echo_pb2.EchoRequest(payload=b"q" * 100_000)
    sent = 0
    for _ in range(60):  # 6 MB through a 1 MiB bound, the provider reading as it goes
        d = conn.call(ASYNC, request)
        assert not d.called, failure_of(d).message
        sent += 1
        while conn.unsent_bytes() > 150_000:  # read about as fast as we write, never all
            if conn.transport in reactor.getWriters():
                conn.transport.doWrite()
            try:
                while peer.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
    assert sent == 60 and conn.write_blocked  # paused all along, and still calls go


def test_closing_a_consumer_connection_does_not_wait_for_unsent_calls():
    conn = ClientConnection(Clock())
    transport = StringTransport()
    conn.makeConnection(transport)
    conn.close()
    assert transport.disconnected  # aborted, not waiting to flush


def test_a_twisted_without_the_buffer_attributes_gets_the_plain_transport_path(monkeypatch):
    from twisted_rpc.core import _direct_write

    missing = (*_direct_write._TCP_BUFFER, "_gone_in_a_later_twisted")
    monkeypatch.setattr(_direct_write, "_TCP_BUFFER", missing)
    pair = over_tcp(ServerFactory(Dispatcher([EchoService()]), Clock()).buildProtocol(None))
    proto, peer, reactor = next(pair)
    try:
        proto.dataReceived(request(1, b"a"))
        assert proto.transport in reactor.getWriters()  # left to the reactor, not sent here
        assert proto.unsent_bytes() is None
        (frame,) = receive_frames(peer, 1, proto.transport, reactor)
        assert frame.call_id == 1
    finally:
        pair.close()
