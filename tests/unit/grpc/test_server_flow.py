"""The provider's gRPC connection under pressure: HTTP/2 flow control both
ways, the graceful stop, the ping policy, limits and bad input (an h2
client, or raw frames, and the connection in memory)."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import HeadersFrame
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import STREAMS, EchoService
from testbed.protos import echo_pb2
from twisted_rpc import Dispatcher, ServerLimits, Service, StatusCode
from twisted_rpc.grpc import GrpcServerFactory

from .h2peer import ASYNC_ECHO, COUNT, ECHO, SUM, GrpcPeer, frame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def raw_connection(limits: ServerLimits | None = None):
    """A provider connection fed raw bytes (no h2 client in front)."""
    factory = GrpcServerFactory(Dispatcher([EchoService()]), Clock(), limits)
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
    server.makeConnection(transport)
    transport.clear()
    return factory, server, transport


def frame_types(data: bytes) -> list[int]:
    kinds = []
    while len(data) >= 9:
        kinds.append(data[3])
        data = data[9 + int.from_bytes(data[:3], "big") :]
    return kinds


def closed(transport: StringTransport) -> bool:
    return bool(transport.disconnecting or transport.disconnected)


# ----------------------------------------------------------------- sending


def test_a_slow_reader_pauses_the_streams_generator():
    window = 2000
    peer = GrpcPeer(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: window}, auto_ack=False)
    stream_id = peer.open(COUNT)
    request = echo_pb2.CountRequest(count=100, payload_size=500, tag="slow")
    peer.send(stream_id, request.SerializeToString(), end=True)
    peer.pump()
    answer = peer.answers[stream_id]
    assert len(answer.data) <= window  # (h2's client would fail on more)
    received = len(answer.messages())
    (stream,) = peer.server.streams.values()
    call = peer.server.calls[stream_id]
    assert stream.sent <= received + 1  # at most one message beyond the window
    assert call.out_bytes <= 505
    assert stream.credit.credit <= 0 and stream.credit.waiter is not None
    peer.auto_ack = True
    peer.client.acknowledge_received_data(len(answer.data), stream_id)
    peer.pump()
    assert len(answer.messages()) == 100 and answer.status == 0
    assert peer.streams.ends == {"slow": "done"}


def test_the_connection_window_pauses_every_stream_until_it_opens():
    settings = {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}  # streams' windows: wide
    peer = GrpcPeer(client_settings=settings, auto_ack=False)
    ids = []
    for tag in ("a", "b"):
        stream_id = peer.open(COUNT)
        request = echo_pb2.CountRequest(count=10, payload_size=10_000, tag=tag)
        peer.send(stream_id, request.SerializeToString(), end=True)
        ids.append(stream_id)
    peer.pump()
    sent = sum(len(peer.answers[i].data) for i in ids)
    assert sent == 65535  # the connection's window, full
    assert peer.server.blocked or all(s.credit.credit <= 0 for s in peer.server.streams.values())
    peer.auto_ack = True
    for i in ids:
        peer.client.acknowledge_received_data(len(peer.answers[i].data), i)
    peer.pump()
    assert [len(peer.answers[i].messages()) for i in ids] == [10, 10]
    assert peer.streams.ends == {"a": "done", "b": "done"}


def test_a_unary_answer_larger_than_the_window_waits_then_its_trailers():
    peer = GrpcPeer(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 16384}, auto_ack=False)
    answer = peer.unary(ECHO, echo_pb2.EchoRequest(payload=b"y" * 100_000))
    assert len(answer.data) == 16384 and answer.trailers is None
    peer.auto_ack = True
    peer.client.acknowledge_received_data(16384, 1)
    peer.pump()
    assert answer.trailers == {"grpc-status": "0"}
    assert len(answer.messages()[0]) > 100_000


def test_a_zero_window_holds_one_answer_and_nothing_more():
    peer = GrpcPeer(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 0}, auto_ack=False)
    answers = [peer.unary(ECHO, echo_pb2.EchoRequest(payload=b"z" * 1000)) for _ in range(3)]
    assert all(a.headers is not None and not a.data and a.trailers is None for a in answers)
    held = sum(call.out_bytes for call in peer.server.calls.values())
    assert 3 * 1000 < held < 3 * 1100
    good = GrpcPeer()
    assert good.unary(ECHO, echo_pb2.EchoRequest(payload=b"ok")).status == 0
    peer.auto_ack = True
    peer.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    peer.pump()
    assert all(a.status == 0 for a in answers)


# ----------------------------------------------------------------- receiving


class GatedSum(Service, descriptor=STREAMS):
    """Sum, reading nothing until ``gate`` fires."""

    def __init__(self) -> None:
        self.gate: Deferred[None] = Deferred()

    async def Sum(self, requests, context):  # type: ignore[no-untyped-def]
        await self.gate
        n = 0
        async for request in requests:
            n += len(request.payload)
        return echo_pb2.EchoReply(payload=str(n).encode())


def test_requests_are_acknowledged_as_the_handler_takes_them():
    service = GatedSum()
    peer = GrpcPeer(ServerLimits(stream_window=4096), services=[service])
    stream_id = peer.open(SUM)
    sent = 0
    for _ in range(20):
        if peer.client.local_flow_control_window(stream_id) < 1005:
            break
        peer.send(stream_id, echo_pb2.EchoRequest(payload=b"q" * 1000).SerializeToString())
        sent += 1
        peer.pump()
    assert sent == 4  # the window (4096) is spent, and nothing was acknowledged
    assert peer.client.local_flow_control_window(stream_id) < 1100
    assert peer.factory.partial_bytes >= 4000  # held, counted
    service.gate.callback(None)
    peer.pump()
    assert peer.client.local_flow_control_window(stream_id) >= 2048
    peer.send(stream_id, echo_pb2.EchoRequest(payload=b"q").SerializeToString(), end=True)
    peer.pump()
    assert peer.answers[stream_id].messages() and peer.factory.partial_bytes == 0


def test_a_client_stream_message_larger_than_the_window_gets_in():
    peer = GrpcPeer(ServerLimits(stream_window=4096))
    stream_id = peer.open(SUM)
    big = echo_pb2.EchoRequest(payload=b"w" * 20_000).SerializeToString()
    data = frame(big)
    while data:
        n = min(len(data), peer.client.local_flow_control_window(stream_id), 16384)
        assert n > 0, "stalled: the partial message was never acknowledged"
        peer.client.send_data(stream_id, data[:n])
        data = data[n:]
        peer.pump()
    peer.client.end_stream(stream_id)
    peer.pump()
    assert peer.answers[stream_id].messages()
    assert echo_pb2.EchoReply.FromString(peer.answers[stream_id].messages()[0]).payload == b"20000"


def test_a_message_over_max_message_size_is_refused_at_its_prefix():
    peer = GrpcPeer(ServerLimits(max_message_size=1000))
    stream_id = peer.open(ECHO)
    peer.client.send_data(stream_id, frame(b"x" * 5000)[:100])
    peer.pump()
    answer = peer.answers[stream_id]
    assert answer.status == StatusCode.RESOURCE_EXHAUSTED
    assert peer.factory.partial_bytes == 0


def test_requests_held_past_max_buffered_bytes_drop_the_connection():
    peer = GrpcPeer(ServerLimits(max_buffered_bytes=10_000))
    stream_id = peer.open(ECHO)
    peer.client.send_data(stream_id, frame(b"x" * 50_000)[:12_000])
    peer.pump()
    assert peer.transport.disconnected  # aborted
    peer.server.connectionLost()
    assert peer.factory.partial_bytes == 0


def test_a_request_never_ended_is_ended_after_frame_timeout():
    peer = GrpcPeer(ServerLimits(frame_timeout=3))
    stream_id = peer.open(ECHO)
    peer.client.send_data(stream_id, frame(b"x" * 100)[:50])
    peer.pump()
    peer.clock.advance(3)
    peer.pump()
    answer = peer.answers[stream_id]
    assert answer.status == StatusCode.DEADLINE_EXCEEDED and "frame_timeout" in answer.message
    assert answer.reset == ErrorCodes.NO_ERROR
    assert not peer.server.calls and peer.factory.partial_bytes == 0


# ----------------------------------------------------------------- stop, ping policy


def test_goaway_lets_calls_finish_and_refuses_later_streams():
    peer = GrpcPeer()
    slow = peer.open(ASYNC_ECHO)
    peer.send(slow, echo_pb2.EchoRequest(delay=1).SerializeToString(), end=True)
    peer.pump()
    peer.factory.goaway()
    peer.pump()
    (goaway,) = peer.goaways
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, slow)
    # A stream the client opened before it read the GOAWAY: refused (retried elsewhere).
    # (h2's client would not open it after a GOAWAY: the frame is built by hand.)
    late = peer.client.get_next_available_stream_id()
    headers = HeadersFrame(late, flags=["END_HEADERS", "END_STREAM"])
    block = [(b":method", b"POST"), (b":path", ECHO.encode()), (b":scheme", b"http")]
    headers.data = peer.client.encoder.encode(block)
    peer.server.dataReceived(headers.serialize())
    rst_refused = b"\x00\x00\x04\x03\x00" + late.to_bytes(4, "big") + b"\x00\x00\x00\x07"
    assert rst_refused in peer.transport.value()
    peer.transport.clear()
    drained = peer.factory.whenDrained()
    assert not drained.called
    peer.clock.advance(1)
    peer.pump()
    assert peer.answers[slow].status == 0
    assert drained.called
    peer.factory.closeConnections()
    assert peer.closed


def test_the_grace_period_over_ends_open_streams_unavailable():
    peer = GrpcPeer(auto_ack=False, client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1024})
    stream_id = peer.open(COUNT)
    peer.send(stream_id, echo_pb2.CountRequest(forever=True, tag="g").SerializeToString(), end=True)
    peer.pump()
    peer.factory.goaway()
    peer.factory.closeConnections()
    assert peer.streams.ends == {"g": "closed"}
    assert peer.closed


def test_a_ping_flood_ends_the_connection():
    peer = GrpcPeer()
    for n in range(4):
        peer.client.ping(b"%08d" % n)
        peer.pump()
    (goaway,) = peer.goaways
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.additional_data == b"too_many_pings"
    assert peer.closed


def test_pings_between_answers_are_fine():
    peer = GrpcPeer()
    for n in range(6):
        peer.client.ping(b"%08d" % n)
        assert peer.unary(ECHO, echo_pb2.EchoRequest()).status == 0
    assert not peer.goaways and not peer.closed


def test_an_idle_connection_is_closed_after_idle_timeout():
    peer = GrpcPeer(ServerLimits(idle_timeout=10))
    assert peer.unary(ECHO, echo_pb2.EchoRequest()).status == 0
    peer.clock.advance(5)
    assert not peer.closed
    peer.clock.advance(10)
    peer.pump()
    assert peer.goaways and peer.closed


# ----------------------------------------------------------------- bad input


def test_garbage_and_http1_get_a_goaway():
    for garbage in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        factory, server, transport = raw_connection()
        server.dataReceived(garbage)
        assert frame_types(transport.value()) == [4, 8, 7]  # SETTINGS, WINDOW_UPDATE, GOAWAY
        assert closed(transport)
        assert factory.partial_bytes == 0


def test_a_16_mib_frame_is_refused_at_its_header():
    factory, server, transport = raw_connection()
    header = (16 * 1024 * 1024 - 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    server.dataReceived(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + header)
    for _ in range(2):  # (h2 would hold all 16 MiB before it looked at the length)
        server.dataReceived(b"x" * 10_000)
    data = transport.value()
    assert data[3:4] == b"\x04"  # our SETTINGS ack, then the GOAWAY
    assert b"\x00\x00\x00\x06" in data[-8:]  # FRAME_SIZE_ERROR
    assert closed(transport)


def test_a_headers_flood_past_max_concurrent_streams_ends_the_connection():
    factory, server, transport = raw_connection(ServerLimits(max_streams_per_connection=8))
    encoder = Encoder()
    block = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", ASYNC_ECHO.encode())]
    block.append((b"content-type", b"application/grpc"))
    frames = [PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"]
    for n in range(20):
        headers = HeadersFrame(2 * n + 1, flags=["END_HEADERS"])
        headers.data = encoder.encode(block)
        frames.append(headers.serialize())
    server.dataReceived(b"".join(frames))
    assert b"\x00\x00\x00\x01" in transport.value()[-8:]  # GOAWAY PROTOCOL_ERROR
    assert closed(transport)
    server.connectionLost()
    assert factory.in_flight == 0 and not server.calls
