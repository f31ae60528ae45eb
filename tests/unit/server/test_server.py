"""Provider-side connections on StringTransport: every status path, byte-exact frames."""

from __future__ import annotations

import os

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from tests.helpers import ServerConn
from twisted_rpc import Dispatcher, FunctionInterceptor, RpcError, Service, StatusCode
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind
from twisted_rpc.server import ServerFactory

ECHO = b"mprpc.test.EchoService/Echo"
ASYNC = b"mprpc.test.EchoService/AsyncEcho"


class Harness(ServerConn):
    def __init__(self, services=None, interceptors=(), max_frame_size=1 << 20):
        self.clock = Clock()
        super().__init__(
            ServerFactory(
                Dispatcher(services or [EchoService()], interceptors), self.clock, max_frame_size
            )
        )


def test_sync_answer_is_byte_exact():
    h = Harness()
    h.request(5, ECHO, echo_pb2.EchoRequest(payload=b"hi"))
    reply = echo_pb2.EchoReply(payload=b"hi", call_id=5, pid=os.getpid()).SerializeToString()
    assert h.transport.value() == wire.encode_response(5, len(reply)) + reply


def test_metadata_reaches_the_handler():
    h = Harness()
    h.request(1, ECHO, echo_pb2.EchoRequest(), metadata={"user": "zhang san"})
    (frame,) = h.frames()
    reply = echo_pb2.EchoReply.FromString(frame.payload)
    assert dict(reply.metadata) == {"user": "zhang san"}


@pytest.mark.parametrize(
    "route, message",
    [
        (b"mprpc.test.EchoService/Nope", "unknown method 'Nope' of service mprpc.test.EchoService"),
        (b"no.Such/Method", "unknown service 'no.Such'"),
        (b"\xff\xfe", "unknown service"),
    ],
)
def test_unknown_route_is_not_found(route, message):
    h = Harness()
    h.request(3, route)
    (frame,) = h.frames()
    assert (frame.kind, frame.call_id, frame.status) == (
        FrameKind.RESPONSE,
        3,
        StatusCode.NOT_FOUND,
    )
    assert message in frame.message
    assert h.proto.connected and not h.transport.disconnecting


def test_every_failed_call_is_logged_with_its_details(logged):
    h = Harness()
    h.request(9, b"no.Such/Method")
    (event,) = [e for e in logged if "failed:" in e.get("log_format", "")]
    assert (event["call_id"], event["method"], event["code"]) == (9, "no.Such/Method", "NOT_FOUND")
    assert event["peer"] == h.proto.peer


def test_garbage_payload_is_invalid_argument():
    h = Harness()
    h.request(4, ECHO, b"\xff\xff\xff")
    (frame,) = h.frames()
    assert frame.status == StatusCode.INVALID_ARGUMENT
    assert "cannot parse mprpc.test.EchoRequest" in frame.message


def test_declared_error_is_sent_as_is():
    h = Harness()
    h.request(6, ECHO, echo_pb2.EchoRequest(fail_code=7, fail_message="not you"))
    (frame,) = h.frames()
    assert (frame.status, frame.message) == (StatusCode.PERMISSION_DENIED, "not you")


def test_crash_is_internal_without_details_and_logged(logged):
    h = Harness()
    h.request(8, ECHO, echo_pb2.EchoRequest(crash=True))
    (frame,) = h.frames()
    assert (frame.status, frame.message) == (StatusCode.INTERNAL, "internal error")
    errors = [e for e in logged if e.get("log_level") == LogLevel.critical]
    assert errors and errors[0]["call_id"] == 8
    assert errors[0]["method"] == "mprpc.test.EchoService/Echo"
    assert isinstance(errors[0]["log_failure"].value, ValueError)


def test_unimplemented_method():
    h = Harness()
    h.request(2, b"mprpc.test.EchoService/NotImplemented", echo_pb2.EchoRequest())
    (frame,) = h.frames()
    assert frame.status == StatusCode.UNIMPLEMENTED


def test_wrong_return_type_is_internal(logged):
    class Bad(Service, descriptor=echo_pb2.DESCRIPTOR.services_by_name["EchoService"]):
        def Echo(self, request, context):
            return echo_pb2.EchoRequest()

    h = Harness([Bad()])
    h.request(1, ECHO, echo_pb2.EchoRequest())
    (frame,) = h.frames()
    assert frame.status == StatusCode.INTERNAL
    assert any("handler returned" in e.get("log_format", "") for e in logged)


def test_async_answers_in_any_order():
    h = Harness()
    h.request(1, ASYNC, echo_pb2.EchoRequest(payload=b"slow", delay=2))
    h.request(2, ASYNC, echo_pb2.EchoRequest(payload=b"fast", delay=1))
    assert h.frames() == []
    assert len(h.proto.pending) == 2
    h.clock.advance(1)
    (fast,) = h.frames()
    h.clock.advance(1)
    (slow,) = h.frames()
    assert (fast.call_id, slow.call_id) == (2, 1)
    assert echo_pb2.EchoReply.FromString(slow.payload).payload == b"slow"
    assert h.proto.pending == {}


def test_deadline_expires_at_the_provider():
    h = Harness()
    h.request(1, ASYNC, echo_pb2.EchoRequest(delay=10), timeout_ms=500)
    h.clock.advance(0.4)
    assert h.frames() == []
    h.clock.advance(0.2)
    (frame,) = h.frames()
    assert frame.status == StatusCode.DEADLINE_EXCEEDED
    h.clock.advance(20)  # the handler was cancelled: no second answer
    assert h.frames() == [] and h.clock.getDelayedCalls() == []


def hanging(cancelled: list) -> Service:
    """An EchoService whose Echo never answers; cancelling it is recorded."""

    class Hanging(Service, descriptor=echo_pb2.DESCRIPTOR.services_by_name["EchoService"]):
        def Echo(self, request, context):
            return Deferred(cancelled.append)

    return Hanging()


def test_cancel_frame_cancels_the_handler():
    cancelled = []

    h = Harness([hanging(cancelled)])
    h.request(11, ECHO, echo_pb2.EchoRequest())
    h.proto.dataReceived(wire.encode_cancel(11))
    assert len(cancelled) == 1
    assert h.frames() == [] and h.proto.pending == {}


def test_connection_lost_cancels_pending_handlers():
    cancelled = []

    h = Harness([hanging(cancelled)])
    h.request(1, ECHO, echo_pb2.EchoRequest())
    h.request(2, ECHO, echo_pb2.EchoRequest())
    h.proto.connectionLost(None)
    assert len(cancelled) == 2
    assert h.factory.connections == set()


@pytest.mark.parametrize(
    "data",
    [
        b"\x7f\xff\xff\xff",  # length far over the cap
        b"\x00\x00\x00\x05" + b"\x00" * 14,  # length shorter than a header
        wire.encode_header(99, 1, 0),  # unknown frame kind
        wire.encode_response(1, 0),  # a provider takes no responses
    ],
)
def test_bad_frames_close_only_that_connection(data, logged):
    h = Harness()
    other = Harness()
    other.factory = h.factory
    h.proto.dataReceived(data)
    assert h.transport.disconnecting
    assert any("closing connection" in e.get("log_format", "") for e in logged)
    other.request(1, ECHO, echo_pb2.EchoRequest(payload=b"still here"))
    (frame,) = other.frames()
    assert echo_pb2.EchoReply.FromString(frame.payload).payload == b"still here"


def test_duplicate_call_id_in_flight_is_a_protocol_error():
    h = Harness()
    h.request(1, ASYNC, echo_pb2.EchoRequest(delay=1))
    h.request(1, ASYNC, echo_pb2.EchoRequest(delay=1))
    assert h.transport.disconnecting


def test_ping_is_answered_with_pong():
    h = Harness()
    h.proto.dataReceived(wire.encode_ping(77, b"x"))
    assert h.transport.value() == wire.encode_pong(77, b"x")


def test_goaway_then_new_calls_are_unavailable():
    h = Harness()
    h.request(1, ASYNC, echo_pb2.EchoRequest(delay=1))
    h.factory.goaway("bye")
    (goaway,) = h.frames()
    assert (goaway.kind, goaway.call_id, goaway.message) == (FrameKind.GOAWAY, 1, "bye")
    h.request(2, ECHO, echo_pb2.EchoRequest())
    (refused,) = h.frames()
    assert (refused.call_id, refused.status) == (2, StatusCode.UNAVAILABLE)
    assert h.factory.calls_in_flight == 1
    h.clock.advance(1)
    (done,) = h.frames()
    assert (done.call_id, done.status) == (1, 0)
    assert h.factory.calls_in_flight == 0


def test_interceptors_wrap_in_order_and_may_reject():
    seen = []

    def outer(request, context, proceed):
        seen.append(("outer", context.method.name))
        if context.metadata.get("token") != "ok":
            raise RpcError(StatusCode.UNAUTHENTICATED, "no token")
        return proceed(request, context)

    def inner(request, context, proceed):
        seen.append(("inner", request.payload))
        return proceed(request, context)

    h = Harness(interceptors=[FunctionInterceptor(outer), FunctionInterceptor(inner)])
    h.request(1, ECHO, echo_pb2.EchoRequest(payload=b"a"), metadata={"token": "ok"})
    h.request(2, ECHO, echo_pb2.EchoRequest(payload=b"b"))
    ok, rejected = h.frames()
    assert ok.status == 0 and rejected.status == StatusCode.UNAUTHENTICATED
    assert seen == [("outer", "Echo"), ("inner", b"a"), ("outer", "Echo")]


def test_handlers_see_the_time_left_before_the_callers_deadline():
    seen = []

    class Timed(Service, descriptor=echo_pb2.DESCRIPTOR.services_by_name["EchoService"]):
        def Echo(self, request, context):
            seen.append(context.time_remaining())
            return echo_pb2.EchoReply()

    h = Harness([Timed()])
    h.clock.advance(100)
    h.request(1, ECHO, echo_pb2.EchoRequest(), timeout_ms=2500)
    h.request(2, ECHO, echo_pb2.EchoRequest())
    assert seen == [2.5, None]
