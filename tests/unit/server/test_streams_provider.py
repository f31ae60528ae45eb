"""Streams at a provider connection, frame by frame (StringTransport, Clock)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from testbed.echo_service import STREAMS, EchoService, StreamService
from testbed.protos import echo_pb2
from tests.helpers import ServerConn
from tests.helpers import frames_of as _frames_of
from twisted_rpc import Dispatcher, ServerLimits, Service, StatusCode
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind
from twisted_rpc.core._flow import message_cost
from twisted_rpc.server import ServerFactory

COUNT = b"mprpc.test.StreamService/Count"
SUM = b"mprpc.test.StreamService/Sum"
CHAT = b"mprpc.test.StreamService/Chat"


def _conn(window: int | None = 1 << 20, **limits):
    clock = Clock()
    service = StreamService()
    factory = ServerFactory(
        Dispatcher([service, EchoService()]), clock, limits=ServerLimits(**limits)
    )
    conn = ServerConn(factory)
    if window is not None:
        settings = {"streams": "1", "stream_window": str(window)}
        conn.proto.dataReceived(wire.encode_ping(1, b"", settings))
        (pong,) = conn.frames()
        assert pong.kind == FrameKind.PONG
    return clock, service, factory, conn


def _turns(clock: Clock, n: int = 50) -> None:
    for _ in range(n):
        clock.advance(0)


def test_a_ping_with_settings_is_answered_with_the_providers():
    clock, service, factory, conn = _conn(window=None)
    conn.proto.dataReceived(wire.encode_ping(4, b"xy", {"streams": "1", "stream_window": "4096"}))
    (pong,) = conn.frames()
    assert (pong.kind, pong.call_id, bytes(pong.payload)) == (FrameKind.PONG, 4, b"xy")
    assert pong.metadata == {
        "streams": "1",
        "stream_window": str(256 * 1024),
        "max_streams": "256",
        "max_calls": "1000",
        "max_frame_size": str(wire.DEFAULT_MAX_FRAME_SIZE),
        "max_message_size": str(4 * 1024 * 1024),
    }
    assert conn.proto.peer_settings == {"streams": "1", "stream_window": "4096"}
    # A later PING (a keepalive) is answered plainly.
    conn.proto.dataReceived(wire.encode_ping(5, b"", {"streams": "1"}))
    (pong,) = conn.frames()
    assert pong.metadata is None


def test_a_plain_ping_gets_a_plain_pong():
    clock, service, factory, conn = _conn(window=None)
    conn.proto.dataReceived(wire.encode_ping(4, b"xy"))
    data = conn.transport.value()
    assert data == wire.encode_pong(4, b"xy")


def test_a_server_stream_sends_messages_then_the_status():
    clock, service, factory, conn = _conn()
    conn.request(3, COUNT, echo_pb2.CountRequest(count=3, tag="t"))
    _turns(clock)
    frames = conn.frames()
    assert [f.kind for f in frames] == [FrameKind.MESSAGE] * 3 + [FrameKind.RESPONSE]
    replies = [echo_pb2.EchoReply.FromString(bytes(f.payload)).call_id for f in frames[:3]]
    assert replies == [0, 1, 2]
    assert (frames[-1].call_id, frames[-1].status) == (3, 0)
    assert service.ends == {"t": "done"}
    assert factory.streams_in_flight == 0 and conn.proto.streams == {}


def test_the_provider_stops_at_the_consumers_window_and_goes_on_when_granted():
    size = 100
    window = 4 * message_cost(size + 3)  # exactly four replies (payload field overhead: 3)
    clock, service, factory, conn = _conn(window=window)
    conn.request(3, COUNT, echo_pb2.CountRequest(count=10, payload_size=size, tag="t"))
    _turns(clock)
    frames = conn.frames()
    assert [f.kind for f in frames] == [FrameKind.MESSAGE] * 4
    cost = message_cost(len(frames[0].payload))
    _turns(clock)
    assert conn.frames() == []  # nothing more without credit
    conn.proto.dataReceived(wire.encode_window(3, 2 * cost))
    _turns(clock)
    assert [f.kind for f in conn.frames()] == [FrameKind.MESSAGE] * 2
    conn.proto.dataReceived(wire.encode_window(3, 10 * cost))
    _turns(clock)
    assert [f.kind for f in conn.frames()] == [FrameKind.MESSAGE] * 4 + [FrameKind.RESPONSE]
    assert service.ends == {"t": "done"}


def test_cancel_closes_the_handlers_generator():
    clock, service, factory, conn = _conn(window=2048)
    conn.request(3, COUNT, echo_pb2.CountRequest(forever=True, payload_size=100, tag="t"))
    _turns(clock)
    assert conn.frames()  # some replies, then it waits for credit
    assert service.ends == {}
    conn.proto.dataReceived(wire.encode_cancel(3))
    assert service.ends == {"t": "closed"}
    _turns(clock)
    assert conn.frames() == []  # nothing is sent after a CANCEL
    assert factory.streams_in_flight == 0


def test_the_deadline_ends_a_stream_and_closes_its_generator():
    clock, service, factory, conn = _conn()
    conn.request(3, COUNT, echo_pb2.CountRequest(forever=True, delay=1.0, tag="t"), timeout_ms=2500)
    clock.advance(1.0)
    clock.advance(1.0)
    clock.advance(0.6)
    frames = conn.frames()
    assert frames[-1].kind == FrameKind.RESPONSE
    assert frames[-1].status == StatusCode.DEADLINE_EXCEEDED
    assert service.ends == {"t": "closed"}


def test_the_connections_loss_closes_every_generator():
    clock, service, factory, conn = _conn(window=2048)
    for i in (1, 3, 5):
        conn.request(i, COUNT, echo_pb2.CountRequest(forever=True, payload_size=10, tag=str(i)))
    _turns(clock)
    conn.proto.connectionLost(None)
    assert service.ends == {"1": "closed", "3": "closed", "5": "closed"}
    assert factory.streams_in_flight == 0


def test_an_error_after_messages_ends_the_stream_with_its_status():
    clock, service, factory, conn = _conn()
    conn.request(
        3, COUNT, echo_pb2.CountRequest(count=2, fail_code=StatusCode.ABORTED, fail_message="no")
    )
    _turns(clock)
    frames = conn.frames()
    assert [f.kind for f in frames] == [FrameKind.MESSAGE] * 2 + [FrameKind.RESPONSE]
    assert (frames[-1].status, frames[-1].message) == (StatusCode.ABORTED, "no")


def test_a_client_stream_takes_messages_and_answers_with_trailers():
    clock, service, factory, conn = _conn()
    conn.proto.dataReceived(wire.encode_request(7, SUM, 0))
    for payload in (b"ab", b"cde"):
        m = echo_pb2.EchoRequest(payload=payload).SerializeToString()
        conn.proto.dataReceived(wire.encode_message(7, len(m)) + m)
    conn.proto.dataReceived(wire.encode_end_stream(7))
    _turns(clock)
    (response,) = conn.frames()
    assert (response.kind, response.status) == (FrameKind.RESPONSE, 0)
    assert echo_pb2.EchoReply.FromString(bytes(response.payload)).payload == b"5"
    assert response.metadata == {"count": "2"}


def test_a_request_message_sent_without_credit_is_a_protocol_error():
    class Deaf(Service, descriptor=STREAMS):
        def Sum(self, requests, context):
            return Deferred()  # never reads its requests

    clock = Clock()
    factory = ServerFactory(Dispatcher([Deaf()]), clock, limits=ServerLimits(stream_window=1024))
    conn = ServerConn(factory)
    conn.proto.dataReceived(wire.encode_request(7, SUM, 0))
    m = echo_pb2.EchoRequest(payload=b"x" * 600).SerializeToString()
    frame = wire.encode_message(7, len(m)) + m
    conn.proto.dataReceived(frame + frame)  # the second is within one message of the window
    assert conn.transport.connected and not conn.transport.disconnecting
    conn.proto.dataReceived(frame)  # no credit left at all
    assert conn.transport.disconnecting or not conn.transport.connected


def test_a_client_stream_opened_with_a_payload_is_a_protocol_error():
    clock, service, factory, conn = _conn()
    conn.request(7, SUM, echo_pb2.EchoRequest(payload=b"x"))
    assert conn.transport.disconnecting


def test_a_request_message_on_a_server_stream_is_a_protocol_error():
    clock, service, factory, conn = _conn(window=1024)
    conn.request(3, COUNT, echo_pb2.CountRequest(forever=True, payload_size=500))
    conn.proto.dataReceived(wire.encode_message(3, 0))
    assert conn.transport.disconnecting


def test_stream_limits_answer_resource_exhausted_naming_the_setting():
    clock, service, factory, conn = _conn(window=1024, max_streams_per_connection=2)
    for i in (1, 3, 5):
        conn.request(i, COUNT, echo_pb2.CountRequest(forever=True, payload_size=500))
    _turns(clock)
    refused = [f for f in conn.frames() if f.kind == FrameKind.RESPONSE]
    assert [(f.call_id, f.status) for f in refused] == [(5, StatusCode.RESOURCE_EXHAUSTED)]
    assert "max_streams_per_connection" in refused[0].message
    # A unary call still fits: the two streams are two of its 1,000 calls in flight.
    conn.request(7)
    (answer,) = conn.frames()
    assert (answer.call_id, answer.status) == (7, 0)


def test_open_streams_count_as_calls_in_flight():
    clock, service, factory, conn = _conn(window=1024, max_calls_per_connection=2)
    for i in (1, 3):
        conn.request(i, COUNT, echo_pb2.CountRequest(forever=True, payload_size=500))
    _turns(clock)
    conn.frames()
    assert factory.calls_in_flight == 2
    conn.request(5, b"mprpc.test.EchoService/AsyncEcho", echo_pb2.EchoRequest(delay=1))
    conn.request(7, COUNT, echo_pb2.CountRequest(count=1))
    refused = conn.frames()
    assert [(f.call_id, f.status) for f in refused] == [
        (5, StatusCode.RESOURCE_EXHAUSTED),
        (7, StatusCode.RESOURCE_EXHAUSTED),
    ]
    assert "max_calls_per_connection" in refused[1].message
    conn.proto.dataReceived(wire.encode_cancel(1))
    assert factory.calls_in_flight == 1
    conn.request(9, b"mprpc.test.EchoService/AsyncEcho", echo_pb2.EchoRequest(delay=1))
    assert conn.frames() == []  # taken: it waits for its delay
    assert factory.calls_in_flight == 2


def test_window_frames_for_ended_streams_are_ignored_and_overflow_is_an_error():
    clock, service, factory, conn = _conn(window=1024)
    conn.proto.dataReceived(wire.encode_window(99, 10))  # no such stream: ignored
    assert not conn.transport.disconnecting
    conn.request(3, COUNT, echo_pb2.CountRequest(forever=True, payload_size=500))
    conn.proto.dataReceived(wire.encode_window(3, 2**30))
    assert not conn.transport.disconnecting
    conn.proto.dataReceived(wire.encode_window(3, 2**30 + 200_000))
    assert conn.transport.disconnecting


def test_a_server_streaming_handler_that_returns_a_message_is_an_internal_error():
    class Wrong(Service, descriptor=STREAMS):
        def Count(self, request, context):
            return echo_pb2.EchoReply()

    clock = Clock()
    factory = ServerFactory(Dispatcher([Wrong()]), clock)
    conn = ServerConn(factory)
    conn.request(3, COUNT, echo_pb2.CountRequest(count=1))
    (frame,) = conn.frames()
    assert (frame.kind, frame.status) == (FrameKind.RESPONSE, StatusCode.INTERNAL)


def test_a_plain_generator_serves_a_server_stream_and_bidi_echoes():
    class Plain(Service, descriptor=STREAMS):
        def Count(self, request, context):
            for i in range(request.count):
                yield echo_pb2.EchoReply(call_id=i)

    clock = Clock()
    factory = ServerFactory(Dispatcher([Plain()]), clock)
    conn = ServerConn(factory)
    conn.request(3, COUNT, echo_pb2.CountRequest(count=2))
    _turns(clock)
    frames = conn.frames()
    assert [f.kind for f in frames] == [FrameKind.MESSAGE] * 2 + [FrameKind.RESPONSE]
    assert frames[-1].status == 0


def test_bidi_echoes_with_initial_metadata_first():
    clock, service, factory, conn = _conn()
    conn.proto.dataReceived(wire.encode_request(9, CHAT, 0, 0, {"hello": "h"}))
    m = echo_pb2.EchoRequest(payload=b"p").SerializeToString()
    conn.proto.dataReceived(wire.encode_message(9, len(m)) + m)
    _turns(clock)
    frames = conn.frames()
    assert [f.kind for f in frames] == [FrameKind.HEADERS, FrameKind.MESSAGE]
    assert frames[0].metadata == {"hello": "h"}
    conn.proto.dataReceived(wire.encode_end_stream(9))
    _turns(clock)
    (end,) = conn.frames()
    assert (end.kind, end.status) == (FrameKind.RESPONSE, 0)


def test_a_draining_provider_refuses_new_streams_and_lets_running_ones_finish():
    clock, service, factory, conn = _conn(window=2048)
    conn.request(3, COUNT, echo_pb2.CountRequest(count=50, payload_size=100, tag="t"))
    _turns(clock)
    conn.frames()
    conn.proto.goaway()
    (goaway,) = conn.frames()
    assert (goaway.kind, goaway.call_id) == (FrameKind.GOAWAY, 3)
    conn.request(5, COUNT, echo_pb2.CountRequest(count=1))
    (refused,) = conn.frames()
    assert (refused.call_id, refused.status) == (5, StatusCode.UNAVAILABLE)
    drained = factory.whenDrained()
    assert not drained.called
    conn.proto.dataReceived(wire.encode_window(3, 1 << 20))
    _turns(clock)
    assert conn.frames()[-1].kind == FrameKind.RESPONSE
    assert service.ends == {"t": "done"}
    clock.advance(0)
    assert drained.called


def test_closing_connections_after_the_grace_period_ends_streams_unavailable():
    clock, service, factory, conn = _conn(window=2048)
    conn.request(3, COUNT, echo_pb2.CountRequest(forever=True, payload_size=100, tag="t"))
    _turns(clock)
    conn.frames()
    factory.goaway()
    factory.closeConnections()
    frames = conn.frames()
    assert [f.kind for f in frames] == [FrameKind.GOAWAY, FrameKind.RESPONSE]
    assert frames[-1].status == StatusCode.UNAVAILABLE
    assert "grace period over" in frames[-1].message
    assert service.ends == {"t": "closed"}


def _deaf_sum(**limits):
    class Deaf(Service, descriptor=STREAMS):
        def Sum(self, requests, context):
            return Deferred()  # never reads its requests

    clock = Clock()
    factory = ServerFactory(Dispatcher([Deaf()]), clock, limits=ServerLimits(**limits))
    return factory


def _request_message(call_id: int, size: int) -> bytes:
    m = echo_pb2.EchoRequest(payload=b"x" * size).SerializeToString()
    return wire.encode_message(call_id, len(m)) + m


def test_a_request_message_over_max_message_size_is_refused_by_its_header():
    factory = _deaf_sum(max_message_size=1000)
    conn = ServerConn(factory)
    conn.proto.dataReceived(wire.encode_request(1, SUM, 0))
    conn.proto.dataReceived(_request_message(1, 1000))  # at the limit: taken
    assert not conn.transport.disconnecting
    header = _request_message(1, 100_000)[: wire.HEADER_SIZE]
    conn.proto.dataReceived(header)  # the header alone: cut off, the body never buffered
    assert conn.transport.disconnecting or not conn.transport.connected
    assert conn.proto.decoder.buffered == 0


def test_unread_request_messages_count_in_max_buffered_bytes():
    factory = _deaf_sum(max_buffered_bytes=100_000, stream_window=2**20)
    greedy, modest = ServerConn(factory, port=1), ServerConn(factory, port=2)
    for conn in (greedy, modest):
        conn.proto.dataReceived(wire.encode_request(1, SUM, 0))
    modest.proto.dataReceived(_request_message(1, 10_000))
    assert modest.proto.stream_held == factory.partial_bytes > 10_000
    for _ in range(8):
        greedy.proto.dataReceived(_request_message(1, 10_000))
        assert not greedy.transport.disconnecting
    greedy.proto.dataReceived(_request_message(1, 10_000))  # past 100,000 held in all
    assert greedy.transport.disconnecting or not greedy.transport.connected
    assert not modest.transport.disconnecting
    assert factory.partial_bytes == modest.proto.stream_held
    greedy.proto.connectionLost(None)
    assert factory.partial_bytes == modest.proto.stream_held


def test_taken_and_dropped_request_messages_are_released():
    factory = ServerFactory(Dispatcher([StreamService()]), Clock())
    conn = ServerConn(factory)
    conn.proto.dataReceived(wire.encode_request(1, SUM, 0))
    conn.proto.dataReceived(_request_message(1, 1000) * 3)
    assert conn.proto.stream_held == 0 == factory.partial_bytes  # Sum took them at once
    deaf = _deaf_sum()
    conn = ServerConn(deaf)
    conn.proto.dataReceived(wire.encode_request(1, SUM, 0))
    conn.proto.dataReceived(_request_message(1, 1000) * 3)
    assert deaf.partial_bytes == conn.proto.stream_held > 3000
    conn.proto.dataReceived(wire.encode_cancel(1))
    assert deaf.partial_bytes == 0 == conn.proto.stream_held


def test_a_consumer_whose_settings_name_no_window_gets_64_kib():
    """docs/protocol.md: a missing stream_window means 64 KiB (the provider
    must not send more than the consumer said it can hold)."""
    clock, service, factory, conn = _conn(window=None)
    conn.proto.dataReceived(wire.encode_ping(1, b"", {"streams": "1"}))
    conn.frames()
    conn.request(3, COUNT, echo_pb2.CountRequest(forever=True, payload_size=1000, tag="t"))
    _turns(clock)
    sent = sum(message_cost(len(f.payload)) for f in conn.frames())
    assert 64 * 1024 <= sent < 64 * 1024 + message_cost(1100)


def test_a_turns_first_messages_are_written_ahead_of_its_end():
    """A stream turn opens a batch as a read does: its first messages go out
    early, then twice as many, and the rest (with the status) at its end."""
    clock, service, factory, conn = _conn()
    writes: list[bytes] = []
    write = conn.transport.write

    def keep(data: bytes) -> None:
        writes.append(data)
        write(data)

    echo = echo_pb2.EchoRequest(payload=b"e").SerializeToString()
    count = echo_pb2.CountRequest(count=40).SerializeToString()
    # One read of 20 calls and the stream's request: its answers raise the
    # early-write threshold, which the stream's first turn must start again.
    conn.proto.dataReceived(
        b"".join(
            wire.encode_request(i, b"mprpc.test.EchoService/Echo", len(echo)) + echo
            for i in range(5, 25)
        )
        + wire.encode_request(3, COUNT, len(count))
        + count
    )
    conn.transport.write = keep  # type: ignore[method-assign]
    _turns(clock)
    frames = [len(wire_frames) for wire_frames in map(_frames_of, writes)]
    assert sum(frames) == 41 and len(frames) >= 3, frames
    assert frames[0] < 10 and frames[1] > frames[0] and frames[2] > frames[1], frames
