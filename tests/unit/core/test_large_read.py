"""Large frames read straight from the socket (core/_large_read.py): on a real
TCP transport (a MemoryReactor's, read by calling its doRead), split anywhere,
followed by other frames, over the limits, closed midway; and the plain path
where the socket is not the connection's own (TLS, StringTransport)."""

from __future__ import annotations

import select
import socket
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from tests.helpers import frames_of, over_tcp
from twisted_rpc import Dispatcher
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind
from twisted_rpc.core._connection import RpcConnection
from twisted_rpc.core._direct_write import DirectWriter
from twisted_rpc.core._large_read import KEEP_BYTES, KEEP_REFRESH, KEPT, LARGE_READ, decode_frame
from twisted_rpc.server import ServerFactory

ROUTE = b"svc.Large/Call"
BIG = 200_000


class Recorder(RpcConnection):
    """A connection that records the REQUEST and RESPONSE frames it gets."""

    def __init__(self, keep: bool = False, **kw: Any) -> None:
        super().__init__(Clock(), **kw)
        self.got: list[tuple[int, int, bytes, Any, str, bytes]] = []
        self.kept: list[Any] = []
        self.keep = keep
        self._handlers[FrameKind.REQUEST] = self._record(FrameKind.REQUEST)
        self._handlers[FrameKind.RESPONSE] = self._record(FrameKind.RESPONSE)

    def _record(self, kind: int) -> Any:
        def handler(call_id, status, timeout_ms, route, metadata, message, payload):
            self.got.append((kind, call_id, route, metadata, message, bytes(payload)))
            if self.keep:
                self.kept.append(payload)

        return handler


def big_request(call_id: int, size: int = BIG, fill: int = 0x61) -> bytes:
    payload = bytes([fill]) * (size - 1) + b"!"
    return wire.encode_request(call_id, ROUTE, size, 1500, {"k": "v"}) + payload


def small_response(call_id: int) -> bytes:
    return wire.encode_response(call_id, 3) + b"abc"


def expected(data: bytes) -> list[tuple[int, int, bytes, Any, str, bytes]]:
    return [
        (f.kind, f.call_id, f.route, f.metadata, f.message, bytes(f.payload))
        for f in frames_of(data, max_frame_size=1 << 24)
    ]


def pump(conn: Recorder, peer: socket.socket, data: bytes, frames: int) -> None:
    """Send ``data`` from the peer and read it with the transport's doRead
    until ``frames`` frames are in (or nothing more comes)."""
    transport = conn.transport
    peer.setblocking(False)
    view, sent = memoryview(data), 0
    for _ in range(100_000):
        if sent < len(data):
            try:
                sent += peer.send(view[sent:])
            except BlockingIOError:
                pass
        wait = 0 if sent < len(data) else 0.5
        if select.select([transport.socket], [], [], wait)[0]:
            transport.doRead()
        elif sent == len(data):
            break
        if len(getattr(conn, "got", ())) >= frames > 0:
            return
    if frames == 0:  # (read until quiet)
        return
    raise AssertionError(f"{len(conn.got)} of {frames} frames arrived")


@pytest.fixture
def tcp_conn():
    yield from over_tcp(Recorder())


STREAM = small_response(1) + big_request(2) + small_response(3) + small_response(4)
BIG_START = len(small_response(1))
BIG_END = BIG_START + len(big_request(2))
SPLITS = sorted(
    {*range(1, BIG_START + 60), *range(BIG_START + 60, BIG_END, 4099)}
    | {*range(BIG_END - 30, len(STREAM))}
    | {65535, 65536, 65537}
)


@pytest.mark.parametrize("split", SPLITS)
def test_a_large_frame_split_anywhere_arrives_whole_among_small_ones(split):
    for conn, peer, _ in over_tcp(Recorder()):
        conn.dataReceived(STREAM[:split])  # a first read ending at the split
        pump(conn, peer, STREAM[split:], 4)
        assert conn.got == expected(STREAM)
        # Unless it came whole in the first read, the large frame was read directly.
        assert (conn.large_reader is not None) == (split < BIG_END)
        assert "dataReceived" not in conn.__dict__  # back on the plain path
        assert conn.decoder.buffered == 0 and conn.partial_since is None


def test_several_large_frames_reuse_one_buffer(tcp_conn):
    conn, peer, _ = tcp_conn
    data = big_request(1, 200_000) + big_request(2, 90_000, 0x62) + small_response(3)
    pump(conn, peer, data, 3)
    assert conn.got == expected(data)
    reader = conn.large_reader
    assert reader is not None and reader.buffer is not None
    buffer = reader.buffer
    pump(conn, peer, big_request(4, 150_000), 4)
    assert reader.buffer is buffer and len(buffer) >= 150_000


def test_a_payload_kept_by_its_handler_is_not_overwritten():
    for conn, peer, _ in over_tcp(Recorder(keep=True)):
        pump(conn, peer, big_request(1, BIG, 0x61), 1)
        first = conn.large_reader.buffer if conn.large_reader else None
        assert first is None  # still viewed by the kept payload: let go
        pump(conn, peer, big_request(2, BIG, 0x62), 2)
        assert bytes(conn.kept[0]) == big_request(1)[-BIG:]
        assert bytes(conn.kept[1]) == big_request(2, BIG, 0x62)[-BIG:]


def test_a_frame_over_max_frame_size_is_refused_before_any_buffer():
    for conn, peer, _ in over_tcp(Recorder(max_frame_size=150_000)):
        pump(conn, peer, big_request(1, 140_000), 1)  # under the limit: read directly
        conn.large_reader = None
        conn.transport.reactor = MemoryReactorClock()  # (aborting calls later)
        peer.sendall(big_request(2, 200_000)[:1000])
        conn.transport.doRead()
        assert conn.large_reader is None  # no buffer was made for it
        assert conn.transport._aborting
        assert len(conn.got) == 1


def test_a_connection_lost_midway_lets_go_of_the_frame():
    factory = ServerFactory(Dispatcher([EchoService()]), Clock())
    for conn, peer, _ in over_tcp(factory.buildProtocol(None)):
        body = echo_pb2.EchoRequest(payload=b"x" * 300_000).SerializeToString()
        frame = wire.encode_request(1, b"mprpc.test.EchoService/Echo", len(body)) + body
        peer.sendall(frame[:100_000])
        for _ in range(3):
            conn.transport.doRead()
        reader = conn.large_reader
        assert reader is not None and reader.filled < reader.size
        assert factory.partial_bytes == len(reader.buffer) >= len(frame)
        conn.transport.connectionLost(Failure(ConnectionError("gone")))
        assert factory.partial_bytes == 0
        assert conn.large_reader is None and "dataReceived" not in conn.__dict__


def test_the_provider_answers_a_large_request_read_directly():
    factory = ServerFactory(Dispatcher([EchoService()]), Clock())
    for conn, peer, _ in over_tcp(factory.buildProtocol(None)):
        body = echo_pb2.EchoRequest(payload=b"y" * 500_000).SerializeToString()
        route = b"mprpc.test.EchoService/Echo"
        data = wire.encode_request(1, route, len(body)) + body
        data += wire.encode_request(2, route, 0)
        pump(conn, peer, data, 0)
        assert conn.large_reader is not None and factory.partial_bytes == 0
        answers = b""
        for _ in range(10_000):  # the peer reads; the transport writes what it buffered
            frames = frames_of(answers, max_frame_size=1 << 24)
            if len(frames) == 2:
                break
            readable, writable, _ = select.select([peer], [conn.transport.socket], [], 1)
            if readable:
                answers += peer.recv(1 << 20)
            elif writable and (conn.transport.dataBuffer or conn.transport._tempDataBuffer):
                conn.transport.doWrite()
        reply = echo_pb2.EchoReply.FromString(bytes(frames[0].payload))
        assert reply.payload == b"y" * 500_000 and frames[1].call_id == 2


def test_no_direct_reads_while_reads_are_paused(tcp_conn):
    conn, peer, _ = tcp_conn
    conn.write_blocked = True
    data = big_request(1) + small_response(2)
    pump(conn, peer, data, 2)
    assert conn.got == expected(data) and conn.large_reader is None


def test_without_a_socket_of_its_own_the_plain_path_decodes_the_frame():
    conn = Recorder()
    conn.makeConnection(StringTransport())
    assert conn.raw_socket() is None
    data = big_request(1, 300_000) + small_response(2)
    for i in range(0, len(data), 65536):
        conn.dataReceived(data[i : i + 65536])
    assert conn.got == expected(data) and conn.large_reader is None


def test_tls_keeps_the_plain_path():
    a, b = socket.socketpair()
    try:
        transport = tcp.Connection(a, None)
        assert DirectWriter(transport).raw_socket() is a
        transport.TLS = True  # after startTLS, the socket carries ciphertext
        assert DirectWriter(transport).raw_socket() is None

        class Wrapper:  # a TLS transport over the TCP one
            def __init__(self) -> None:
                self.transport = tcp.Connection(a, None)

        assert DirectWriter(Wrapper()).raw_socket() is None
    finally:
        a.close()
        b.close()


def test_decode_frame_matches_the_decoder():
    for data in (
        big_request(7, 70_000),
        wire.encode_header(FrameKind.RESPONSE, 3, 70_000, status=2, message="bad") + b"z" * 70_000,
        wire.encode_ping(5, b"p", {"a": "b"}),
    ):
        got: list[Any] = []
        decoder = wire.FrameDecoder(got.append)
        decode_frame(decoder, memoryview(bytearray(data)))
        (frame,) = frames_of(data)
        assert [
            (f.kind, f.call_id, f.route, f.metadata, f.message, bytes(f.payload)) for f in got
        ] == [
            (frame.kind, frame.call_id, frame.route, frame.metadata, frame.message, frame.payload)
        ]
        assert isinstance(got[0].route, bytes)
    assert BIG > LARGE_READ > 2 * 65536


def test_a_64_kib_message_keeps_the_plain_path(tcp_conn):
    conn, peer, _ = tcp_conn
    data = big_request(1, 65536) + small_response(2) + big_request(3, LARGE_READ - 100)
    pump(conn, peer, data, 3)
    assert conn.got == expected(data) and conn.large_reader is None


def test_the_process_keeps_the_highest_large_payload_sent_and_refreshes_it():
    KEPT.payload, KEPT.sends = b"", 0
    conn, other = RpcConnection(Clock()), RpcConnection(Clock())
    transport = StringTransport()
    conn.makeConnection(transport)
    other.makeConnection(StringTransport())
    header = wire.encode_response(1, 0)
    a, b = b"a" * 100_000, b"b" * 100_000
    low, high = sorted((a, b), key=id)  # (id is the address in CPython)
    conn.send(header, low)
    assert KEPT.payload is low
    conn.send(header, b"small")  # a small frame leaves it
    other.send(header, high)  # a higher one takes its place, whatever connection sends it
    assert KEPT.payload is high
    assert transport.value() == header + low + header + b"small"
    for _ in range(KEEP_REFRESH):  # a lower one does not take its place...
        conn.send(header, low)
        assert KEPT.payload is high
    conn.send(header, low)  # ...until the kept one is KEEP_REFRESH sends old
    assert KEPT.payload is low


def test_a_view_or_a_payload_over_keep_bytes_is_not_kept():
    KEPT.payload, KEPT.sends = b"", 0
    conn = RpcConnection(Clock())
    conn.makeConnection(StringTransport())
    header = wire.encode_response(1, 0)
    kept = b"a" * 100_000
    conn.send(header, kept)
    view = memoryview(bytearray(100_000))  # (a view could pin a reader's buffer)
    conn.send(header, view)  # type: ignore[arg-type]
    conn.send(header, bytes(KEEP_BYTES + 1))
    assert KEPT.payload is kept
