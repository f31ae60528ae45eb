"""Streams at a consumer connection, frame by frame (StringTransport, Clock)."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from testbed.echo_service import STREAMS
from testbed.protos import echo_pb2
from tests.helpers import ClientConn, failure_of, result
from twisted_rpc import (
    BidiStream,
    ClientStream,
    DataLossError,
    DeadlineExceededError,
    RpcError,
    ServerStream,
    StatusCode,
    UnavailableError,
    UnimplementedError,
)
from twisted_rpc.client import NotSentError
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._codec import FrameKind, GoawayReason
from twisted_rpc.core._flow import Inbox

METHODS = describe(STREAMS).methods
COUNT, SUM, CHAT = METHODS["Count"], METHODS["Sum"], METHODS["Chat"]


def _proven(settings=None) -> ClientConn:
    """A consumer connection whose first PING was answered with ``settings``."""
    conn = ClientConn()
    conn.proto.ping()
    (ping,) = conn.sent()
    assert ping.metadata == {"streams": "1", "stream_window": str(1 << 20)}
    if settings is None:
        settings = {"streams": "1", "stream_window": "100000"}
    conn.proto.dataReceived(wire.encode_pong(ping.call_id, b"", settings))
    return conn


def _reply(call_id: int, n: int, size: int = 0) -> bytes:
    payload = echo_pb2.EchoReply(call_id=n, payload=b"x" * size).SerializeToString()
    return wire.encode_message(call_id, len(payload)) + payload


def _drain(stream) -> list:
    """Everything a stream has received so far, through read()."""
    got = []
    while True:
        d = stream.read()
        if not d.called:
            return got
        value = result(d)
        if value is None:
            return got
        got.append(value.call_id)


def test_an_older_provider_that_sent_no_settings_gets_no_stream():
    conn = _proven(settings={})
    conn.proto.peer_settings = None  # a plain PONG: no settings at all
    stream = ServerStream(COUNT, conn.clock)
    error = conn.proto.open_stream(stream, echo_pb2.CountRequest(count=1))
    assert isinstance(error, UnimplementedError)
    assert "does not speak streams" in error.message
    assert conn.sent() == []


def test_a_server_stream_reads_replies_then_the_trailers():
    conn = _proven()
    stream = ServerStream(COUNT, conn.clock, metadata={"k": "v"})
    assert conn.proto.open_stream(stream, echo_pb2.CountRequest(count=2)) is None
    (request,) = conn.sent()
    assert (request.kind, request.route, request.metadata) == (
        FrameKind.REQUEST,
        COUNT.route,
        {"k": "v"},
    )
    call_id = request.call_id
    conn.proto.dataReceived(wire.encode_headers(call_id, {"h": "1"}))
    assert result(stream.initial_metadata) == {"h": "1"}
    conn.proto.dataReceived(_reply(call_id, 0) + _reply(call_id, 1))
    conn.proto.dataReceived(
        wire.encode_header(wire.RESPONSE, call_id, 0, metadata={"trailer": "t"})
    )
    assert _drain(stream) == [0, 1]
    assert stream.code == StatusCode.OK
    assert stream.trailing_metadata == {"trailer": "t"}
    assert conn.proto.streams == {}


def test_an_error_status_comes_after_the_replies_received():
    conn = _proven()
    stream = ServerStream(COUNT, conn.clock)
    conn.proto.open_stream(stream, echo_pb2.CountRequest())
    (request,) = conn.sent()
    conn.proto.dataReceived(_reply(request.call_id, 0))
    conn.proto.dataReceived(wire.encode_status(request.call_id, StatusCode.ABORTED, "no"))
    assert result(stream.read()).call_id == 0
    error = failure_of(stream.read())
    assert isinstance(error, RpcError) and error.code == StatusCode.ABORTED
    assert (stream.code, stream.details) == (StatusCode.ABORTED, "no")


def test_credit_goes_back_in_batches_as_replies_are_taken():
    conn = _proven()
    window = 4000
    stream = ServerStream(COUNT, conn.clock, window=window)
    conn.proto.open_stream(stream, echo_pb2.CountRequest())
    (request,) = conn.sent()
    frames = b"".join(_reply(request.call_id, i, 80) for i in range(40))
    conn.proto.dataReceived(frames[: len(frames) // 2])  # 20 replies of 100 bytes each on the wire
    assert conn.sent() == []  # nothing taken, nothing granted
    taken = _drain(stream)
    assert taken == list(range(20))
    windows = [f for f in conn.sent() if f.kind == FrameKind.WINDOW]
    assert windows and all(f.timeout_ms >= window // 4 for f in windows)
    assert sum(f.timeout_ms for f in windows) <= 20 * 100 + 100


def test_a_provider_sending_past_the_window_is_cut_off():
    conn = _proven()
    stream = ServerStream(COUNT, conn.clock, window=1024)
    conn.proto.open_stream(stream, echo_pb2.CountRequest())
    (request,) = conn.sent()
    reply = _reply(request.call_id, 0, 600)
    conn.proto.dataReceived(reply + reply)  # within one message past the window: fine
    assert conn.proto.connected and not conn.transport.disconnecting
    conn.proto.dataReceived(reply)
    assert conn.transport.disconnecting or not conn.proto.connected


def test_writes_wait_for_the_providers_window():
    conn = _proven(settings={"streams": "1", "stream_window": "1024"})
    stream = ClientStream(SUM, conn.clock)
    conn.proto.open_stream(stream, None)
    (request,) = conn.sent()
    assert (request.kind, bytes(request.payload)) == (FrameKind.REQUEST, b"")
    big = echo_pb2.EchoRequest(payload=b"y" * 600)
    first, second, third = stream.write(big), stream.write(big), stream.write(big)
    assert first.called and second.called and not third.called
    assert [f.kind for f in conn.sent()] == [FrameKind.MESSAGE] * 2
    done = stream.done_writing()
    assert not done.called  # the END_STREAM follows the last message
    conn.proto.dataReceived(wire.encode_window(request.call_id, 2000))
    assert third.called and done.called
    assert [f.kind for f in conn.sent()] == [FrameKind.MESSAGE, FrameKind.END_STREAM]
    answer = echo_pb2.EchoReply(payload=b"1800").SerializeToString()
    conn.proto.dataReceived(wire.encode_response(request.call_id, len(answer)) + answer)
    assert result(stream.response()).payload == b"1800"
    assert stream.code == StatusCode.OK


def test_writing_the_wrong_type_or_after_done_writing_fails_at_once():
    conn = _proven()
    stream = BidiStream(CHAT, conn.clock)
    conn.proto.open_stream(stream, None)
    assert isinstance(failure_of(stream.write(echo_pb2.CountRequest())), TypeError)
    stream.done_writing()
    assert isinstance(failure_of(stream.write(echo_pb2.EchoRequest())), RuntimeError)
    server_stream = ServerStream(COUNT, conn.clock)
    assert isinstance(failure_of(server_stream.write(echo_pb2.CountRequest())), TypeError)


def test_the_deadline_ends_the_stream_and_tells_the_provider():
    conn = _proven()
    stream = ServerStream(COUNT, conn.clock, timeout=2.0)
    conn.proto.open_stream(stream, echo_pb2.CountRequest())
    (request,) = conn.sent()
    assert request.timeout_ms == 2000
    pending = stream.read()
    conn.clock.advance(2.0)
    assert isinstance(failure_of(pending), DeadlineExceededError)
    (cancel,) = conn.sent()
    assert (cancel.kind, cancel.call_id) == (FrameKind.CANCEL, request.call_id)
    conn.proto.dataReceived(_reply(request.call_id, 5))  # late: dropped
    assert stream.code == StatusCode.DEADLINE_EXCEEDED


def test_cancel_drops_what_is_held_and_sends_cancel_once():
    conn = _proven()
    stream = ServerStream(COUNT, conn.clock)
    conn.proto.open_stream(stream, echo_pb2.CountRequest())
    (request,) = conn.sent()
    conn.proto.dataReceived(_reply(request.call_id, 0))
    stream.cancel()
    stream.cancel()
    assert [f.kind for f in conn.sent()] == [FrameKind.CANCEL]
    assert failure_of(stream.read()).code == StatusCode.CANCELLED


def test_the_connections_loss_ends_every_stream_unavailable():
    conn = _proven()
    streams = [ServerStream(COUNT, conn.clock) for _ in range(3)]
    for s in streams:
        conn.proto.open_stream(s, echo_pb2.CountRequest())
    conn.proto.connectionLost(None)
    for s in streams:
        assert isinstance(failure_of(s.read()), UnavailableError)


def test_goaway_ends_streams_above_its_last_id_not_sent_and_keeps_the_others():
    conn = _proven()
    older, newer = ServerStream(COUNT, conn.clock), ServerStream(COUNT, conn.clock)
    conn.proto.open_stream(older, echo_pb2.CountRequest())
    conn.proto.open_stream(newer, echo_pb2.CountRequest())
    first, second = conn.sent()
    conn.proto.dataReceived(wire.encode_goaway(first.call_id, "", GoawayReason.SHUTDOWN))
    assert isinstance(failure_of(newer.read()), NotSentError)
    assert older.code is None
    conn.proto.dataReceived(_reply(first.call_id, 0))
    conn.proto.dataReceived(wire.encode_header(wire.RESPONSE, first.call_id, 0))
    assert _drain(older) == [0]
    assert conn.transport.disconnecting  # its last stream is done: closed


def test_an_unparsable_reply_ends_the_stream_data_loss():
    conn = _proven()
    stream = ServerStream(COUNT, conn.clock)
    conn.proto.open_stream(stream, echo_pb2.CountRequest())
    (request,) = conn.sent()
    conn.proto.dataReceived(wire.encode_message(request.call_id, 3) + b"\xff\xff\xff")
    assert isinstance(failure_of(stream.read()), DataLossError)
    (cancel,) = conn.sent()
    assert cancel.kind == FrameKind.CANCEL


def test_on_message_delivers_in_order_and_pausing_stops_delivery_and_credit():
    conn = _proven()
    stream = ServerStream(COUNT, conn.clock, window=4000)
    conn.proto.open_stream(stream, echo_pb2.CountRequest())
    (request,) = conn.sent()
    got: list[int] = []

    def on(reply):
        got.append(reply.call_id)
        if len(got) == 3:
            stream.pauseProducing()

    ended = stream.on_message(on)
    conn.proto.dataReceived(b"".join(_reply(request.call_id, i, 80) for i in range(30)))
    assert got == [0, 1, 2]
    assert [f for f in conn.sent() if f.kind == FrameKind.WINDOW] == []
    stream.resumeProducing()
    assert got == list(range(30))
    assert not ended.called
    conn.proto.dataReceived(wire.encode_header(wire.RESPONSE, request.call_id, 0))
    assert ended.called and result(ended) is None


def test_async_iteration_takes_a_whole_chunk_without_a_deferred_per_reply(monkeypatch):
    conn = _proven()
    stream = ServerStream(COUNT, conn.clock)
    conn.proto.open_stream(stream, echo_pb2.CountRequest())
    (request,) = conn.sent()
    waits = []
    real_wait = Inbox.wait

    def counting_wait(inbox):
        waits.append(1)
        return real_wait(inbox)

    monkeypatch.setattr(Inbox, "wait", counting_wait)
    got: list[int] = []

    async def consume():
        async for reply in stream:
            got.append(reply.call_id)

    done = Deferred.fromCoroutine(consume())
    conn.proto.dataReceived(b"".join(_reply(request.call_id, i) for i in range(100)))
    assert got == list(range(100))
    assert len(waits) == 2  # one before the chunk, one after it: none per reply
    conn.proto.dataReceived(wire.encode_header(wire.RESPONSE, request.call_id, 0))
    assert done.called


def test_a_stream_with_no_provider_ends_not_sent():
    from twisted.internet.testing import MemoryReactorClock

    from twisted_rpc import Client

    client = Client(MemoryReactorClock(), providers={})
    stream = client.proxy(STREAMS).Count(echo_pb2.CountRequest())
    error = failure_of(stream.read())
    assert isinstance(error, NotSentError)
    assert "no provider of mprpc.test.StreamService" in error.message


def test_bad_stream_arguments_raise_at_the_call():
    import pytest
    from twisted.internet.testing import MemoryReactorClock

    from twisted_rpc import Client

    proxy = Client(MemoryReactorClock(), providers={}).proxy(STREAMS)
    with pytest.raises(TypeError):
        proxy.Count(echo_pb2.EchoRequest())  # the wrong request type
    with pytest.raises(TypeError):
        proxy.Sum(echo_pb2.EchoRequest())  # one message where an iterable belongs
    with pytest.raises(ValueError):
        proxy.Count(echo_pb2.CountRequest(), timeout=-1)


def test_a_request_over_the_providers_max_message_size_fails_locally():
    conn = _proven(settings={"streams": "1", "stream_window": "100000", "max_message_size": "100"})
    stream = BidiStream(CHAT, conn.clock)
    conn.proto.open_stream(stream, None)
    conn.sent()
    error = failure_of(stream.write(echo_pb2.EchoRequest(payload=b"x" * 200)))
    assert error.code == StatusCode.RESOURCE_EXHAUSTED and "max_message_size" in error.message
    assert conn.sent() == []  # nothing sent
    assert result(stream.write(echo_pb2.EchoRequest(payload=b"x" * 50))) is None
    assert [f.kind for f in conn.sent()] == [FrameKind.MESSAGE]
