"""The consumer's gRPC connection, unary calls: an h2 server on the other end
of a StringTransport, the clock a task.Clock."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RequestReceived, StreamReset

from testbed.protos import echo_pb2
from tests.helpers import failure_of, result
from tests.unit.grpc.grpc_peer import ECHO, GrpcPair, of
from twisted_rpc import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from twisted_rpc.client import NotSentError
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.grpc._wire import frame_message, parse_timeout, prefix

ECHO_M = ECHO["Echo"]


def _request(pair, **kw):
    d = pair.client.call(ECHO_M, echo_pb2.EchoRequest(payload=b"hi"), **kw)
    events = pair.pump()
    (req,) = of(events, RequestReceived)
    return d, req


def test_a_unary_call_sends_grpc_headers_and_one_message_and_reads_the_reply():
    pair = GrpcPair()
    d, req = _request(pair, metadata={"x-user": "zhang", "blob-bin": "\x00\xff"})
    headers = dict(req.headers)
    assert headers[b":method"] == b"POST"
    assert headers[b":path"] == b"/mprpc.test.EchoService/Echo"
    assert headers[b":scheme"] == b"http"
    assert headers[b":authority"] == b"example:50051"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"te"] == b"trailers"
    assert headers[b"x-user"] == b"zhang"
    assert headers[b"blob-bin"] == b"AMO/"  # base64 of the UTF-8 bytes, unpadded
    assert b"grpc-timeout" not in headers
    data = b"".join(e.data for e in pair.events if hasattr(e, "data") and e.stream_id == 1)
    assert data == frame_message(echo_pb2.EchoRequest(payload=b"hi").SerializeToString())
    pair.reply(1, echo_pb2.EchoReply(payload=b"back").SerializeToString())
    assert result(d).payload == b"back"
    assert pair.client.outstanding == {}


def test_the_deadline_goes_as_grpc_timeout_and_ends_the_call_here_with_a_reset():
    pair = GrpcPair()
    d, req = _request(pair, timeout=2.5)
    sent = parse_timeout(dict(req.headers)[b"grpc-timeout"].decode())
    assert 2.5 <= sent <= 2.5001
    pair.clock.advance(2.4)
    assert not d.called
    pair.clock.advance(0.2)
    assert isinstance(failure_of(d), DeadlineExceededError)
    (reset,) = of(pair.pump(), StreamReset)
    assert (reset.stream_id, reset.error_code) == (1, ErrorCodes.CANCEL)
    assert pair.client.outstanding == {} and pair.client.connected


def test_cancel_resets_the_stream_and_fails_cancelled():
    pair = GrpcPair()
    d, _ = _request(pair)
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    (reset,) = of(pair.pump(), StreamReset)
    assert reset.error_code == ErrorCodes.CANCEL


def test_a_trailers_only_error_is_typed_with_its_decoded_message():
    pair = GrpcPair()
    d, _ = _request(pair)
    pair.server.send_headers(
        1,
        [*[(":status", "200"), ("content-type", "application/grpc")]]
        + [("grpc-status", "5"), ("grpc-message", "no user %E5%BC%A0 here")],
        end_stream=True,
    )
    pair.pump()
    error = failure_of(d)
    assert isinstance(error, NotFoundError)
    assert error.message == "no user \u5f20 here"


def test_error_trailers_after_headers_are_typed():
    pair = GrpcPair()
    d, _ = _request(pair)
    pair.reply(1, status=7, message="not yours")
    error = failure_of(d)
    assert isinstance(error, PermissionDeniedError) and error.message == "not yours"


def test_http_errors_map_as_grpc_says():
    cases = [
        ([(":status", "503")], UnavailableError),
        ([(":status", "404"), ("content-type", "text/html")], UnimplementedError),
        ([(":status", "200"), ("content-type", "text/html")], UnknownError),
        (
            [(":status", "200"), ("content-type", "application/grpc"), ("grpc-encoding", "br")],
            InternalError,
        ),
    ]
    for headers, kind in cases:
        pair = GrpcPair()
        d, _ = _request(pair)
        pair.server.send_headers(1, headers)
        events = pair.pump()
        assert isinstance(failure_of(d), kind), headers
        assert [e.error_code for e in of(events, StreamReset)] == [ErrorCodes.CANCEL]


def test_no_response_or_two_responses_are_internal_errors():
    pair = GrpcPair()
    d, _ = _request(pair)
    pair.reply(1)
    assert isinstance(failure_of(d), InternalError)
    pair = GrpcPair()
    d, _ = _request(pair)
    pair.reply(1, b"", b"")
    assert isinstance(failure_of(d), InternalError)


def test_a_refused_stream_was_never_run():
    pair = GrpcPair()
    d, _ = _request(pair)
    pair.server.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    pair.pump()
    assert isinstance(failure_of(d), NotSentError)


def test_goaway_hands_back_the_calls_above_its_last_id_and_the_others_finish():
    pair = GrpcPair()
    taken = []
    pair.client._on_goaway = lambda c, reason, calls: taken.append((reason, calls))
    first, _ = _request(pair)
    second, _ = _request(pair)
    pair.server.close_connection(last_stream_id=1)
    pair.pump()
    assert not pair.client.available
    assert [(r, [c[0] for c in calls]) for r, calls in taken] == [(GoawayReason.SHUTDOWN, [second])]
    assert isinstance(failure_of(pair.client.call(ECHO_M, echo_pb2.EchoRequest())), NotSentError)
    # the call the server kept is still in flight (see the drain test for its end)
    assert not first.called and list(pair.client.outstanding) == [1]
    assert not pair.transport.disconnecting


def test_a_drain_goaway_lets_the_running_call_finish_then_closes():
    pair = GrpcPair()
    d, _ = _request(pair)
    # gRPC's graceful drain: GOAWAY with the last possible id, then the answer.
    goaway = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + (2**31 - 1).to_bytes(4, "big") + bytes(4)
    pair.client.dataReceived(goaway)
    assert pair.client.goaway_received and not pair.client.available
    pair.reply(1, echo_pb2.EchoReply(payload=b"ok").SerializeToString())
    assert result(d).payload == b"ok"
    assert pair.transport.disconnecting  # done: closed, after its own GOAWAY
    assert of(pair.events, ConnectionTerminated)


def test_a_request_waits_for_the_servers_window():
    pair = GrpcPair(server_settings={0x4: 100})  # INITIAL_WINDOW_SIZE
    request = echo_pb2.EchoRequest(payload=b"x" * 250)
    d = pair.client.call(ECHO_M, request)
    pair.pump()
    got = b"".join(e.data for e in pair.events if hasattr(e, "data") and e.stream_id == 1)
    assert len(got) == 100
    pair.server.acknowledge_received_data(100, 1)
    pair.server.increment_flow_control_window(1000, 1)
    pair.pump()
    got = b"".join(e.data for e in pair.events if hasattr(e, "data") and e.stream_id == 1)
    assert got == prefix(len(request.SerializeToString())) + request.SerializeToString()
    assert not d.called


def test_a_message_over_the_limit_ends_the_call_resource_exhausted():
    pair = GrpcPair(max_frame_size=1024)
    d, _ = _request(pair)
    pair.server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    pair.server.send_data(1, prefix(10_000) + b"x" * 100)
    events = pair.pump()
    assert isinstance(failure_of(d), ResourceExhaustedError)
    assert [e.error_code for e in of(events, StreamReset)] == [ErrorCodes.CANCEL]
    assert pair.client.connected  # only that call ended


def test_huge_headers_end_the_calls_unavailable_and_the_connection():
    pair = GrpcPair()
    d, _ = _request(pair)
    pair.server.send_headers(1, [(":status", "200"), ("x-big", "a" * 100_000)])
    pair.pump()
    assert isinstance(failure_of(d), UnavailableError)
    assert pair.transport.disconnecting


def test_data_after_the_trailers_is_refused_and_the_other_calls_go_on():
    pair = GrpcPair()
    first, _ = _request(pair)
    second, _ = _request(pair)
    pair.reply(1, echo_pb2.EchoReply().SerializeToString())
    assert result(first) == echo_pb2.EchoReply()
    # a DATA frame on the ended stream 1, by hand (h2 would not send it)
    pair.client.dataReceived(b"\x00\x00\x05\x00\x00\x00\x00\x00\x01" + prefix(0))
    assert pair.transport.value().endswith(  # RST_STREAM(1, STREAM_CLOSED)
        b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x05"
    )
    pair.transport.clear()
    pair.reply(3, echo_pb2.EchoReply(payload=b"2").SerializeToString())
    assert result(second).payload == b"2"


def test_metadata_that_http2_cannot_carry_fails_the_call_invalid_argument():
    pair = GrpcPair()
    for metadata in ({"Bad Key": "x"}, {"k": "line\nbreak"}):
        error = failure_of(pair.client.call(ECHO_M, echo_pb2.EchoRequest(), metadata=metadata))
        assert error.code == 3, metadata
    assert pair.client.outstanding == {}
