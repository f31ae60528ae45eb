"""The provider's gRPC connection, call by call: an h2 client and the
listener's connection in memory (tests/unit/grpc/h2peer.py), every call
kind, errors, deadlines and cancellation."""

from __future__ import annotations

import base64
import gzip

from h2.errors import ErrorCodes

from testbed.protos import echo_pb2
from twisted_rpc import ServerLimits, StatusCode

from .h2peer import ASYNC_ECHO, CHAT, COUNT, ECHO, SUM, GrpcPeer, frame


def reply(answer) -> echo_pb2.EchoReply:
    (message,) = answer.messages()
    return echo_pb2.EchoReply.FromString(message)


# ----------------------------------------------------------------- unary


def test_unary_answer_is_headers_data_trailers():
    peer = GrpcPeer()
    answer = peer.unary(ECHO, echo_pb2.EchoRequest(payload=b"hi"))
    assert answer.headers == {
        ":status": "200",
        "content-type": "application/grpc",
        "grpc-accept-encoding": "identity,gzip",
    }
    assert answer.trailers == {"grpc-status": "0"}
    assert answer.ended and answer.reset is None
    got = reply(answer)
    assert got.payload == b"hi"
    assert got.call_id == 1  # the HTTP/2 stream id
    assert not peer.server.calls and not peer.server.pending


def test_text_and_binary_metadata_reach_the_handler():
    peer = GrpcPeer()
    raw = bytes(range(256))
    b64 = base64.b64encode(raw).decode().rstrip("=")
    answer = peer.unary(
        ECHO, echo_pb2.EchoRequest(), [("x-token", "abc"), ("blob-bin", b64), ("te", "trailers")]
    )
    metadata = dict(reply(answer).metadata)
    assert metadata["x-token"] == "abc"
    assert metadata["blob-bin"].encode("latin-1") == raw
    assert "content-type" not in metadata and "te" not in metadata


def test_unknown_method_and_service_are_unimplemented_trailers_only():
    peer = GrpcPeer()
    method = peer.unary("/mprpc.test.EchoService/Nope", echo_pb2.EchoRequest())
    service = peer.unary("/no.Such/Thing", echo_pb2.EchoRequest())
    for answer in (method, service):
        assert answer.trailers is None  # trailers-only: one HEADERS frame
        assert answer.status == StatusCode.UNIMPLEMENTED
        assert answer.headers[":status"] == "200" and answer.ended
    assert "unknown method 'Nope'" in method.message
    assert "unknown service 'no.Such'" in service.message


def test_handler_errors_keep_their_code_and_message():
    peer = GrpcPeer()
    not_found = peer.unary(ECHO, echo_pb2.EchoRequest(fail_code=5, fail_message="no user 7%"))
    assert (not_found.status, not_found.message) == (StatusCode.NOT_FOUND, "no user 7%25")
    crash = peer.unary(ECHO, echo_pb2.EchoRequest(crash=True))
    assert (crash.status, crash.message) == (StatusCode.INTERNAL, "internal error")


def test_unparsable_request_is_invalid_argument():
    peer = GrpcPeer()
    stream_id = peer.open(ECHO)
    peer.send(stream_id, b"\xff\xff\xff", end=True)
    peer.pump()
    assert peer.answers[stream_id].status == StatusCode.INVALID_ARGUMENT


def test_not_grpc_content_type_is_http_415_and_get_405():
    peer = GrpcPeer()
    json = peer.unary(ECHO, echo_pb2.EchoRequest(), content_type="application/json")
    assert json.headers == {":status": "415"} and json.ended
    get = peer.unary(ECHO, echo_pb2.EchoRequest(), method="GET")
    assert get.headers == {":status": "405"}
    plus = peer.unary(ECHO, echo_pb2.EchoRequest(), content_type="application/grpc+proto")
    assert plus.status == 0


def test_malformed_headers_reset_the_stream_only():
    peer = GrpcPeer()
    bad = peer.unary(ECHO, echo_pb2.EchoRequest(), [("X-Upper", "1")])
    assert bad.reset == ErrorCodes.PROTOCOL_ERROR
    conn = peer.unary(ECHO, echo_pb2.EchoRequest(), [("connection", "close")])
    assert conn.reset == ErrorCodes.PROTOCOL_ERROR
    assert peer.unary(ECHO, echo_pb2.EchoRequest(payload=b"ok")).status == 0


def test_unary_needs_exactly_one_message():
    peer = GrpcPeer()
    none = peer.open(ECHO)
    peer.send(none, end=True)
    two = peer.open(ECHO)
    peer.send(two, b"", b"")
    peer.pump()
    assert peer.answers[none].status == StatusCode.INTERNAL
    assert "no request message" in peer.answers[none].message
    assert peer.answers[two].status == StatusCode.INTERNAL
    assert peer.answers[two].reset == ErrorCodes.NO_ERROR  # rest of the request not wanted
    assert not peer.server.calls


def test_gzip_request_is_decoded_and_unknown_encoding_unimplemented():
    peer = GrpcPeer()
    stream_id = peer.open(ECHO, extra=[("grpc-encoding", "gzip")])
    body = gzip.compress(echo_pb2.EchoRequest(payload=b"zipped").SerializeToString())
    peer.client.send_data(stream_id, frame(body, compressed=True), end_stream=True)
    peer.pump()
    assert reply(peer.answers[stream_id]).payload == b"zipped"
    other = peer.unary(ECHO, echo_pb2.EchoRequest(), extra=[("grpc-encoding", "snappy")])
    assert other.status == StatusCode.UNIMPLEMENTED and "snappy" in other.message


def test_metadata_over_the_limits_is_resource_exhausted():
    peer = GrpcPeer(ServerLimits(max_metadata_entries=2, max_metadata_size=64))
    many = peer.unary(ECHO, echo_pb2.EchoRequest(), [("a", "1"), ("b", "2"), ("c", "3")])
    assert many.status == StatusCode.RESOURCE_EXHAUSTED and "max_metadata_entries" in many.message
    big = peer.unary(ECHO, echo_pb2.EchoRequest(), [("a", "x" * 100)])
    assert big.status == StatusCode.RESOURCE_EXHAUSTED and "max_metadata_size" in big.message


# ----------------------------------------------------------------- deadlines, cancellation


def test_grpc_timeout_is_the_calls_deadline():
    peer = GrpcPeer()
    stream_id = peer.open(ASYNC_ECHO, extra=[("grpc-timeout", "100m")])
    peer.send(stream_id, echo_pb2.EchoRequest(delay=5).SerializeToString(), end=True)
    peer.pump()
    assert peer.answers[stream_id].status is None
    peer.clock.advance(0.1)
    peer.pump()
    answer = peer.answers[stream_id]
    assert answer.status == StatusCode.DEADLINE_EXCEEDED
    assert not peer.server.pending and peer.factory.in_flight == 0


def test_bad_grpc_timeout_is_refused():
    peer = GrpcPeer()
    answer = peer.unary(ECHO, echo_pb2.EchoRequest(), extra=[("grpc-timeout", "soon")])
    assert answer.status == StatusCode.INTERNAL and "grpc-timeout" in answer.message


def test_rst_stream_cancels_a_unary_call():
    peer = GrpcPeer()
    stream_id = peer.open(ASYNC_ECHO)
    peer.send(stream_id, echo_pb2.EchoRequest(delay=5).SerializeToString(), end=True)
    peer.pump()
    assert stream_id in peer.server.pending
    peer.client.reset_stream(stream_id, ErrorCodes.CANCEL)
    peer.pump()
    assert not peer.server.pending and not peer.server.calls
    assert peer.factory.in_flight == 0
    peer.clock.advance(5)
    peer.pump()
    assert peer.answers[stream_id].headers is None  # nothing sent after the cancel


def test_rst_stream_closes_a_streams_generator():
    peer = GrpcPeer(client_settings={4: 1024}, auto_ack=False)  # the stream pauses
    stream_id = peer.open(COUNT)
    peer.send(stream_id, echo_pb2.CountRequest(forever=True, tag="t").SerializeToString(), end=True)
    peer.pump()
    assert peer.answers[stream_id].data
    peer.client.reset_stream(stream_id, ErrorCodes.CANCEL)
    peer.pump()
    assert peer.streams.ends == {"t": "closed"}
    assert not peer.server.streams and peer.factory.streams_in_flight == 0


def test_connection_loss_cancels_every_call():
    peer = GrpcPeer(auto_ack=False)
    slow = peer.open(ASYNC_ECHO)
    peer.send(slow, echo_pb2.EchoRequest(delay=5).SerializeToString(), end=True)
    partial = peer.open(ECHO)
    peer.client.send_data(partial, frame(b"x" * 50)[:20])
    count = peer.open(COUNT)
    peer.send(count, echo_pb2.CountRequest(forever=True, tag="c").SerializeToString(), end=True)
    peer.pump()
    assert peer.factory.partial_bytes > 0
    peer.server.connectionLost()
    assert peer.factory.in_flight == 0 and peer.factory.streams_in_flight == 0
    assert peer.factory.partial_bytes == 0
    assert peer.streams.ends == {"c": "closed"}
    assert not peer.factory.connections


# ----------------------------------------------------------------- streams


def test_server_stream_messages_then_trailers():
    peer = GrpcPeer()
    stream_id = peer.open(COUNT)
    peer.send(stream_id, echo_pb2.CountRequest(count=5, tag="n").SerializeToString(), end=True)
    peer.pump()
    answer = peer.answers[stream_id]
    ids = [echo_pb2.EchoReply.FromString(m).call_id for m in answer.messages()]
    assert ids == [0, 1, 2, 3, 4]
    assert answer.trailers == {"grpc-status": "0"}
    assert peer.streams.ends == {"n": "done"}


def test_server_stream_error_after_messages_is_in_the_trailers():
    peer = GrpcPeer()
    request = echo_pb2.CountRequest(count=2, fail_code=9, fail_message="late")
    stream_id = peer.open(COUNT)
    peer.send(stream_id, request.SerializeToString(), end=True)
    peer.pump()
    answer = peer.answers[stream_id]
    assert len(answer.messages()) == 2
    assert answer.trailers == {"grpc-status": "9", "grpc-message": "late"}


def test_client_stream_response_and_trailing_metadata():
    peer = GrpcPeer()
    stream_id = peer.open(SUM)
    peer.send(stream_id, *[echo_pb2.EchoRequest(payload=b"abc").SerializeToString()] * 3)
    peer.pump()
    assert peer.answers[stream_id].headers is None  # still reading
    peer.send(stream_id, echo_pb2.EchoRequest(payload=b"de").SerializeToString(), end=True)
    peer.pump()
    answer = peer.answers[stream_id]
    got = reply(answer)
    assert (got.payload, got.call_id) == (b"11", 4)
    assert answer.trailers == {"grpc-status": "0", "count": "4"}


def test_client_stream_of_no_messages_answers_an_empty_sum():
    peer = GrpcPeer()
    stream_id = peer.open(SUM)
    peer.send(stream_id, end=True)
    peer.pump()
    answer = peer.answers[stream_id]
    assert reply(answer).payload == b"0"
    assert answer.status == 0


def test_bidi_initial_metadata_messages_and_end():
    peer = GrpcPeer()
    stream_id = peer.open(CHAT, [("hello", "world")])
    peer.send(stream_id, echo_pb2.EchoRequest(payload=b"1").SerializeToString())
    peer.pump()
    answer = peer.answers[stream_id]
    assert answer.headers["hello"] == "world"
    assert [echo_pb2.EchoReply.FromString(m).payload for m in answer.messages()] == [b"1"]
    peer.send(stream_id, echo_pb2.EchoRequest(payload=b"2").SerializeToString(), end=True)
    peer.pump()
    assert len(answer.messages()) == 2 and answer.trailers == {"grpc-status": "0"}


def test_bidi_handler_error_ends_the_stream_and_resets_the_rest():
    peer = GrpcPeer()
    stream_id = peer.open(CHAT)
    bad = echo_pb2.EchoRequest(fail_code=StatusCode.PERMISSION_DENIED, fail_message="no")
    peer.send(stream_id, bad.SerializeToString())
    peer.pump()
    answer = peer.answers[stream_id]
    assert answer.status == StatusCode.PERMISSION_DENIED
    assert answer.reset == ErrorCodes.NO_ERROR
    assert not peer.server.calls and not peer.server.streams


def test_streams_past_max_streams_are_refused():
    peer = GrpcPeer(ServerLimits(max_streams=1), auto_ack=False)
    first = peer.open(COUNT)
    peer.send(first, echo_pb2.CountRequest(forever=True).SerializeToString(), end=True)
    second = peer.open(SUM)
    peer.pump()
    assert peer.answers[second].status == StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams" in peer.answers[second].message
    assert peer.answers[first].status is None  # still streaming, paused by its window


def test_http2_settings_follow_the_limits():
    limits = ServerLimits(max_streams_per_connection=7, stream_window=4096)
    peer = GrpcPeer(limits)
    remote = peer.client.remote_settings
    assert remote.max_concurrent_streams == 7
    assert remote.initial_window_size == 4096
    assert remote.max_header_list_size == 16 * 1024
    assert peer.client.outbound_flow_control_window == 4096 * 16


def test_a_reset_in_the_same_read_as_the_request_is_a_cancel():
    peer = GrpcPeer()
    stream_id = peer.open(ECHO)
    peer.send(stream_id, echo_pb2.EchoRequest().SerializeToString(), end=True)
    peer.client.reset_stream(stream_id, ErrorCodes.CANCEL)  # (h2 reads both before its events)
    peer.pump()
    assert not peer.closed and not peer.server.calls
    assert peer.unary(ECHO, echo_pb2.EchoRequest(payload=b"next")).status == 0
