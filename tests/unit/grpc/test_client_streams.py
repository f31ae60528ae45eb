"""The consumer's gRPC connection, streams, pings and keepalive: an h2 server
on the other end of a StringTransport, the clock a task.Clock."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)

from testbed.protos import echo_pb2
from tests.helpers import failure_of, result
from tests.unit.grpc.grpc_peer import OK_HEADERS, STREAMS, GrpcPair, of, small_window
from twisted_rpc import CancelledError, DeadlineExceededError, NotFoundError
from twisted_rpc.client import BidiStream, ClientStream, NotSentError, ServerStream
from twisted_rpc.grpc._wire import frame_message, prefix


def _reply(n: int, size: int = 0) -> bytes:
    return echo_pb2.EchoReply(payload=b"r" * size, call_id=n).SerializeToString()


def _open(pair, kind, name, request=None, **kw):
    stream = kind(STREAMS[name], pair.clock, **kw)
    assert pair.client.open_stream(stream, request) is None
    events = pair.pump()
    (req,) = of(events, RequestReceived)
    return stream, req


def _drain(stream) -> list:
    got = []
    while stream.inbox.ready():
        try:
            message = stream.inbox.take()
        except Exception as e:
            got.append(e)
            break
        if message is None:
            break
        got.append(message.call_id)
    return got


def _data(events, sid) -> bytes:
    return b"".join(e.data for e in of(events, DataReceived) if e.stream_id == sid)


def test_a_server_stream_sends_its_request_and_reads_replies_metadata_and_trailers():
    pair = GrpcPair()
    request = echo_pb2.CountRequest(count=3)
    stream, req = _open(pair, ServerStream, "Count", request, metadata={"k-bin": "\x01"})
    assert dict(req.headers)[b":path"] == b"/mprpc.test.StreamService/Count"
    assert dict(req.headers)[b"k-bin"] == b"AQ"
    assert _data(pair.events, 1) == frame_message(request.SerializeToString())
    assert of(pair.events, StreamEnded)  # the request side is over
    pair.server.send_headers(1, OK_HEADERS + [("who", "server")])
    for n in range(3):
        pair.server.send_data(1, frame_message(_reply(n)))
    pair.server.send_headers(1, [("grpc-status", "0"), ("t-bin", "Ag")], end_stream=True)
    pair.pump()
    assert result(stream.initial_metadata) == {"who": "server"}
    assert _drain(stream) == [0, 1, 2]
    assert stream.code == 0 and stream.trailing_metadata == {"t-bin": "\x02"}
    assert pair.client.streams == {}


def test_an_error_comes_after_the_replies_and_is_typed():
    pair = GrpcPair()
    stream, _ = _open(pair, ServerStream, "Count", echo_pb2.CountRequest())
    pair.reply(1, _reply(7), status=5, message="gone")
    got = _drain(stream)
    assert got[0] == 7 and isinstance(got[1], NotFoundError) and got[1].message == "gone"


def test_a_slow_reader_pauses_the_server_and_taking_replies_opens_the_window():
    pair = GrpcPair(stream_window=1024)
    stream, _ = _open(pair, ServerStream, "Count", echo_pb2.CountRequest(), window=1024)
    pair.server.send_headers(1, OK_HEADERS)
    reply = frame_message(_reply(0, 95))  # 102 bytes on the wire
    sent = 0
    while pair.window(1) >= len(reply):
        pair.server.send_data(1, reply)
        sent += 1
    pair.pump()
    left = 1024 - 10 * len(reply)
    assert sent == 10 and pair.window(1) == left  # the server must wait
    assert len(stream.inbox.messages) == 10
    stream.inbox.take()
    stream.inbox.take()
    pair.pump()
    assert pair.window(1) == left  # less than a quarter of the window taken: nothing sent
    for _ in range(8):
        stream.inbox.take()
    pair.pump()
    assert pair.window(1) > left + 500  # taken: acknowledged


def test_client_stream_writes_honour_the_servers_window_then_end_the_stream():
    pair = GrpcPair(server_settings=small_window(150))
    stream, _ = _open(pair, ClientStream, "Sum")
    writes = [stream.write(echo_pb2.EchoRequest(payload=b"p" * 60)) for _ in range(4)]
    done = stream.done_writing()
    pair.pump()
    message = frame_message(echo_pb2.EchoRequest(payload=b"p" * 60).SerializeToString())
    assert len(_data(pair.events, 1)) == 150  # the window: the rest waits here
    assert [w.called for w in writes] == [True, True, True, False]
    assert not done.called
    pair.server.acknowledge_received_data(150, 1)
    pair.server.increment_flow_control_window(1000, 1)
    pair.pump()
    assert _data(pair.events, 1) == message * 4
    assert all(w.called for w in writes) and done.called
    assert of(pair.events, StreamEnded)
    pair.reply(1, echo_pb2.EchoReply(call_id=4).SerializeToString())
    assert result(stream.response()).call_id == 4


def test_a_client_stream_without_a_response_ends_internal():
    pair = GrpcPair()
    stream, _ = _open(pair, ClientStream, "Sum")
    pair.reply(1)
    assert failure_of(stream.response()).code == 13


def test_bidi_messages_go_both_ways():
    pair = GrpcPair()
    stream, _ = _open(pair, BidiStream, "Chat")
    stream.write(echo_pb2.EchoRequest(payload=b"a"))
    pair.pump()
    assert _data(pair.events, 1) == frame_message(
        echo_pb2.EchoRequest(payload=b"a").SerializeToString()
    )
    pair.server.send_headers(1, OK_HEADERS)
    pair.server.send_data(1, frame_message(_reply(1)))
    pair.pump()
    assert _drain(stream) == [1]
    stream.done_writing()
    pair.pump()
    pair.server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    pair.pump()
    assert stream.code == 0


def test_cancel_and_deadline_reset_the_stream():
    pair = GrpcPair()
    stream, _ = _open(pair, BidiStream, "Chat")
    stream.cancel()
    (reset,) = of(pair.pump(), StreamReset)
    assert reset.error_code == ErrorCodes.CANCEL and stream.code == CancelledError.code
    stream, req = _open(pair, ServerStream, "Count", echo_pb2.CountRequest(), timeout=1)
    assert b"grpc-timeout" in dict(req.headers)
    pair.clock.advance(1)
    (reset,) = of(pair.pump(), StreamReset)
    assert reset.stream_id == 3 and stream.code == DeadlineExceededError.code
    assert pair.client.streams == {}


def test_a_stream_message_over_the_limit_ends_it_resource_exhausted():
    pair = GrpcPair(max_frame_size=512)
    stream, _ = _open(pair, ServerStream, "Count", echo_pb2.CountRequest())
    pair.server.send_headers(1, OK_HEADERS)
    pair.server.send_data(1, prefix(1 << 20))
    assert of(pair.pump(), StreamReset)
    assert stream.code == 8 and pair.client.connected


def test_goaway_ends_streams_above_its_last_id_not_sent():
    pair = GrpcPair()
    kept, _ = _open(pair, ServerStream, "Count", echo_pb2.CountRequest())
    above, _ = _open(pair, ServerStream, "Count", echo_pb2.CountRequest())
    pair.server.close_connection(last_stream_id=1)
    pair.pump()
    assert above.code == NotSentError.code and kept.code is None
    assert list(pair.client.streams) == [1]


def test_ping_measures_the_round_trip_and_the_connection_loss_fails_what_waits():
    pair = GrpcPair()
    d = pair.client.ping()
    pair.clock.advance(0.25)
    assert of(pair.pump(), PingReceived)
    assert result(d) == 0.25
    stream, _ = _open(pair, ServerStream, "Count", echo_pb2.CountRequest())
    waiting = pair.client.ping()
    pair.client.connectionLost()
    assert stream.code == 14 and failure_of(waiting).code == 14


def _pings(pair) -> int:
    return len(of(pair.pump(), PingReceived))


def test_keepalive_pings_idle_connections_at_most_every_five_minutes():
    pair = GrpcPair(keepalive_interval=1.0)
    pair.clock.advance(299)
    assert _pings(pair) == 0
    pair.clock.advance(10)
    assert _pings(pair) == 1


def test_keepalive_with_calls_in_flight_pings_no_faster_than_ten_seconds():
    pair = GrpcPair(keepalive_interval=1.0)
    _open(pair, ServerStream, "Count", echo_pb2.CountRequest())
    counts = []
    for _ in range(6):
        pair.clock.advance(5)
        counts.append(_pings(pair))
    assert counts == [0, 1, 0, 1, 0, 1]


def test_a_too_many_pings_goaway_doubles_the_keepalive_interval():
    pair = GrpcPair(keepalive_interval=20.0)
    told = []
    pair.client.on_too_many_pings = told.append
    pair.server.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, b"too_many_pings", 0)
    pair.pump()
    assert told == [40.0] and pair.client.keepalive_interval == 40.0
    assert of(pair.events, ConnectionTerminated)  # nothing in flight: closed with its own
    assert pair.transport.disconnecting


def test_an_unanswered_keepalive_aborts_the_connection():
    pair = GrpcPair(keepalive_interval=10.0, keepalive_timeout=2.0)
    _open(pair, ServerStream, "Count", echo_pb2.CountRequest())
    pair.clock.advance(10)
    pair.transport.clear()  # the PING is lost
    pair.clock.advance(2)
    assert pair.client.keepalive_failed and pair.transport.disconnecting


def test_a_server_ending_a_stream_first_stops_the_requests_with_no_error():
    pair = GrpcPair()
    stream, _ = _open(pair, BidiStream, "Chat")
    pair.server.send_headers(1, OK_HEADERS + [("grpc-status", "9")], end_stream=True)
    (reset,) = of(pair.pump(), StreamReset)
    assert reset.error_code == ErrorCodes.NO_ERROR and stream.code == 9
    assert pair.client.h2.open_outbound_streams == 0
    assert isinstance(failure_of(stream.write(echo_pb2.EchoRequest())), Exception)
