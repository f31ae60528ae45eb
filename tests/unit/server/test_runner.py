"""The one call runner: the native and the C++ listener run a call the same way.

Every test runs against both listeners (each on a StringTransport with a
Clock): the same handler outcome gives the same status to the observer and
the same logs; only the wire differs (a status frame natively, a reply or a
close without one for a C++ caller). And both factories drain alike
(:class:`IDrainable`).
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from zope.interface import implementer
from zope.interface.verify import verifyObject

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from twisted_rpc import (
    CallContext,
    Dispatcher,
    ICallObserver,
    IDrainable,
    PermissionDeniedError,
    ServerLimits,
    Service,
    StatusCode,
    code_name,
)
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameDecoder, FrameKind
from twisted_rpc.cpp import CppServerFactory, encode_request
from twisted_rpc.server import ServerFactory
from twisted_rpc.server._runner import CallRunner

ECHO_NAME = "mprpc.test.EchoService/Echo"
ASYNC_NAME = "mprpc.test.EchoService/AsyncEcho"


class Outcomes(Service, descriptor=ECHO):
    """Echo ends as its payload says; AsyncEcho waits until told."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waiting: list[Deferred[Any]] = []
        self.contexts: list[CallContext] = []

    def Echo(self, request: echo_pb2.EchoRequest, context: CallContext) -> Any:
        self.contexts.append(context)
        reply = echo_pb2.EchoReply(payload=request.payload)
        how = request.payload.decode()
        if how == "sync":
            return reply
        if how == "deferred":
            return defer.succeed(reply)
        if how == "later":
            d: Deferred[Any] = Deferred()
            self.clock.callLater(1, d.callback, reply)
            return d
        if how == "coroutine":
            return self._coroutine(reply)
        if how == "rpc-error":
            raise PermissionDeniedError(message="not you")
        if how == "rpc-error-later":
            return defer.fail(PermissionDeniedError(message="not you"))
        if how == "cancelled":
            raise defer.CancelledError()
        if how == "cancelled-later":
            return defer.fail(defer.CancelledError())
        if how == "crash":
            raise ValueError("secret detail")
        if how == "crash-later":
            return defer.fail(ValueError("secret detail"))
        if how == "wrong-type":
            return echo_pb2.EchoRequest()
        if how == "wrong-type-later":
            return defer.succeed(echo_pb2.EchoRequest())
        raise AssertionError(how)

    async def _coroutine(self, reply: echo_pb2.EchoReply) -> echo_pb2.EchoReply:
        return reply

    def AsyncEcho(self, request: echo_pb2.EchoRequest, context: CallContext) -> Any:
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return d


@implementer(ICallObserver)
class Observed:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def call_finished(self, method: str, code: int, duration: float) -> None:
        self.calls.append((method, code_name(code)))


class Listener:
    """One listener under test; each call on a connection of its own."""

    kind = ""

    def __init__(self, limits: ServerLimits | None = None) -> None:
        self.clock = Clock()
        self.service = Outcomes(self.clock)
        self.factory = self.make_factory(Dispatcher([self.service]), limits)
        self.observed = Observed()
        self.factory.observer = self.observed
        self.port = 0

    def make_factory(self, dispatcher: Dispatcher, limits: ServerLimits | None) -> Any:
        raise NotImplementedError

    def connect(self) -> tuple[Any, StringTransport]:
        return self.connect_to(self.factory)

    def connect_to(self, factory: Any) -> tuple[Any, StringTransport]:
        self.port += 1
        address = IPv4Address("TCP", "10.0.0.1", self.port)
        proto = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport

    def call(self, method: str, payload: bytes) -> tuple[Any, StringTransport]:
        proto, transport = self.connect()
        self.send(proto, method, payload)
        return proto, transport

    def send(self, proto: Any, method: str, payload: bytes) -> None:
        raise NotImplementedError

    def outcome(self, transport: StringTransport) -> str:
        """``OK`` (the reply echoed), the status code's name, ``closed`` (C++:
        closed without a reply) or ``nothing`` (no answer yet)."""
        raise NotImplementedError


class Native(Listener):
    kind = "native"

    def make_factory(self, dispatcher: Dispatcher, limits: ServerLimits | None) -> Any:
        return ServerFactory(dispatcher, self.clock, 1 << 20, limits)

    def send(self, proto: Any, method: str, payload: bytes) -> None:
        route = f"mprpc.test.EchoService/{method}".encode()
        proto.dataReceived(wire.encode_request(7, route, len(payload)) + payload)

    def outcome(self, transport: StringTransport) -> str:
        frames: list[Any] = []
        FrameDecoder(frames.append).feed(transport.value())
        answers = [f for f in frames if f.kind == FrameKind.RESPONSE]
        if not answers:
            return "nothing"
        (frame,) = answers
        assert frame.call_id == 7
        if frame.status:
            return code_name(frame.status)
        assert echo_pb2.EchoReply.FromString(frame.payload).payload
        return "OK"


class Cpp(Listener):
    kind = "cpp"

    def make_factory(self, dispatcher: Dispatcher, limits: ServerLimits | None) -> Any:
        return CppServerFactory(dispatcher, self.clock, 1 << 20, limits)

    def send(self, proto: Any, method: str, payload: bytes) -> None:
        proto.dataReceived(encode_request("EchoService", method, payload))

    def outcome(self, transport: StringTransport) -> str:
        if transport.value():
            assert echo_pb2.EchoReply.FromString(transport.value()).payload
            return "OK"
        return "closed" if transport.disconnecting else "nothing"


@pytest.fixture(params=[Native, Cpp], ids=lambda c: c.kind)
def listener(request: Any) -> Listener:
    return request.param()


def echo(how: str) -> bytes:
    return echo_pb2.EchoRequest(payload=how.encode()).SerializeToString()


def wire_outcome(listener: Listener, code: str) -> str:
    """What the wire shows for a call ending with ``code``."""
    if code == "OK" or listener.kind == "native":
        return code
    return "closed"


def tracebacks(logged: list[dict[str, Any]]) -> list[Any]:
    return [e["log_failure"] for e in logged if e.get("log_level") == LogLevel.critical]


@pytest.mark.parametrize(
    "how, code",
    [
        ("sync", "OK"),
        ("deferred", "OK"),
        ("later", "OK"),
        ("coroutine", "OK"),
        ("rpc-error", "PERMISSION_DENIED"),
        ("rpc-error-later", "PERMISSION_DENIED"),
        ("cancelled", "CANCELLED"),
        ("cancelled-later", "CANCELLED"),
        ("crash", "INTERNAL"),
        ("crash-later", "INTERNAL"),
        ("wrong-type", "INTERNAL"),
        ("wrong-type-later", "INTERNAL"),
    ],
)
def test_every_handler_outcome_ends_alike_on_both_listeners(listener, logged, how, code):
    _, transport = listener.call("Echo", echo(how))
    listener.clock.advance(1)
    assert listener.outcome(transport) == wire_outcome(listener, code)
    assert listener.observed.calls == [(ECHO_NAME, code)]
    assert listener.factory.calls_in_flight == 0
    crashed = tracebacks(logged)
    if how.startswith("crash"):
        (failure,) = crashed
        assert isinstance(failure.value, ValueError)
    else:
        assert crashed == []
    if code != "OK":
        (event,) = [e for e in logged if "failed: {code}" in e.get("log_format", "")]
        assert (event["method"], event["code"]) == (ECHO_NAME, code)


def test_unparseable_request_is_invalid_argument(listener, logged):
    _, transport = listener.call("Echo", b"\xff\xff\xff")
    assert listener.outcome(transport) == wire_outcome(listener, "INVALID_ARGUMENT")
    assert listener.observed.calls == [(ECHO_NAME, "INVALID_ARGUMENT")]
    assert any("cannot parse mprpc.test.EchoRequest" in e.get("message", "") for e in logged)


def test_unknown_method_is_not_found(listener):
    _, transport = listener.call("Nope", b"")
    assert listener.outcome(transport) == wire_outcome(listener, "NOT_FOUND")
    assert listener.observed.calls == [("?/?", "NOT_FOUND")]


def test_max_calls_counts_calls_of_every_kind(listener):
    listener = type(listener)(ServerLimits(max_calls=1))
    _, first = listener.call("AsyncEcho", echo("wait"))
    _, second = listener.call("Echo", echo("later"))
    assert listener.outcome(first) == "nothing"
    assert listener.outcome(second) == wire_outcome(listener, "RESOURCE_EXHAUSTED")
    assert listener.factory.in_flight == 1
    listener.service.waiting[0].callback(echo_pb2.EchoReply(payload=b"done"))
    assert listener.outcome(first) == "OK" and listener.factory.in_flight == 0


def test_a_call_whose_caller_went_away_is_cancelled_and_observed(listener):
    proto, transport = listener.call("AsyncEcho", echo("wait"))
    (waiting,) = listener.service.waiting
    proto.connectionLost(None)
    assert waiting.called  # cancelled
    assert listener.factory.calls_in_flight == 0
    assert listener.observed.calls == [(ASYNC_NAME, "CANCELLED")]
    assert listener.outcome(transport) in ("nothing", "closed")


def test_slow_calls_are_logged(listener, logged):
    listener.factory.slow_call_threshold = 0.5
    listener.call("Echo", echo("later"))
    listener.clock.advance(1)
    (event,) = [e for e in logged if e.get("log_format", "").startswith("slow ")]
    assert event["method"] == ECHO_NAME and event["duration_ms"] == 1000


def test_the_handler_sees_its_connection(listener):
    proto, _ = listener.call("Echo", echo("sync"))
    (context,) = listener.service.contexts
    assert context.connection is proto and isinstance(proto, CallRunner)
    assert context.peer == "10.0.0.1:1"
    assert context.time_remaining() is None


def strict_service() -> tuple[Service, type[Any]]:
    """A proto2 service whose response has a required field: an empty
    response cannot be serialised. ``Req.later``: answer through a Deferred."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="strict.proto", package="strict")
    proto.syntax = "proto2"
    request = proto.message_type.add(name="Req")
    request.field.add(name="later", number=1, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="Resp")
    response.field.add(name="x", number=1, type=field.TYPE_INT32, label=field.LABEL_REQUIRED)
    method = proto.service.add(name="Strict").method.add(name="Get")
    method.input_type, method.output_type = ".strict.Req", ".strict.Resp"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    file = pool.FindFileByName("strict.proto")
    req = message_factory.GetMessageClass(file.message_types_by_name["Req"])
    resp = message_factory.GetMessageClass(file.message_types_by_name["Resp"])

    class Strict(Service, descriptor=file.services_by_name["Strict"]):
        def Get(self, request: Any, context: CallContext) -> Any:
            return defer.succeed(resp()) if request.later else resp()

    return Strict(), req


@pytest.mark.parametrize("later", [False, True])
def test_a_response_that_cannot_be_serialised_is_internal(listener, logged, later):
    service, req = strict_service()
    factory = listener.make_factory(Dispatcher([service]), None)
    factory.observer = listener.observed
    proto, transport = listener.connect_to(factory)
    args = req(later=later).SerializeToString()
    if listener.kind == "native":
        proto.dataReceived(wire.encode_request(7, b"strict.Strict/Get", len(args)) + args)
    else:
        proto.dataReceived(encode_request("Strict", "Get", args))
    assert listener.outcome(transport) == wire_outcome(listener, "INTERNAL")
    assert listener.observed.calls == [("strict.Strict/Get", "INTERNAL")]
    (failure,) = tracebacks(logged)
    assert "missing required fields" in str(failure.value)


# ------------------------------------------------------------------- draining


def test_both_factories_are_drainable(listener):
    verifyObject(IDrainable, listener.factory)


def test_goaway_refuses_calls_on_open_and_new_connections(listener, logged):
    open_proto, open_transport = listener.connect()
    listener.factory.goaway()
    listener.send(open_proto, "Echo", echo("sync"))
    _, new_transport = listener.call("Echo", echo("sync"))
    for transport in (open_transport, new_transport):
        assert listener.outcome(transport) == wire_outcome(listener, "UNAVAILABLE")
    assert listener.observed.calls == [(ECHO_NAME, "UNAVAILABLE")] * 2
    assert listener.service.contexts == []  # never run
    refused = [e for e in logged if e.get("code") == "UNAVAILABLE"]
    assert [e["message"] for e in refused] == ["provider is shutting down"] * 2


def test_when_drained_fires_once_the_last_call_ends(listener):
    assert listener.factory.whenDrained().called  # none in flight
    listener.call("AsyncEcho", echo("wait"))
    listener.call("AsyncEcho", echo("wait"))
    drained = listener.factory.whenDrained()
    listener.factory.goaway()
    first, second = listener.service.waiting
    first.callback(echo_pb2.EchoReply(payload=b"1"))
    listener.clock.advance(0)
    assert not drained.called
    second.callback(echo_pb2.EchoReply(payload=b"2"))
    assert not drained.called  # on the next turn: the answer is sent first
    listener.clock.advance(0)
    assert drained.called


def test_when_drained_can_be_cancelled(listener):
    listener.call("AsyncEcho", echo("wait"))
    drained = listener.factory.whenDrained()
    drained.cancel()
    assert listener.factory.idle_waiters == []
    drained.addErrback(lambda f: f.trap(defer.CancelledError))


def test_close_connections_fires_when_all_are_gone(listener):
    (a, ta), (b, tb) = listener.connect(), listener.connect()
    closed = listener.factory.closeConnections()
    assert ta.disconnecting and tb.disconnecting and not closed.called
    a.connectionLost(None)
    assert not closed.called
    b.connectionLost(None)
    assert closed.called and listener.factory.connections == set()
    assert listener.factory.closeConnections().called  # none left: at once


def test_abort_connections(listener):
    aborted = []
    proto, transport = listener.connect()
    transport.abortConnection = lambda: aborted.append(proto)  # type: ignore[method-assign]
    listener.factory.abortConnections()
    assert aborted == [proto]


def test_native_goaway_frame_reports_the_last_call_run():
    native = Native()
    proto, transport = native.call("AsyncEcho", echo("wait"))
    native.factory.goaway()
    frames: list[Any] = []
    FrameDecoder(frames.append).feed(transport.value())
    (goaway,) = [f for f in frames if f.kind == FrameKind.GOAWAY]
    assert goaway.call_id == 7 and goaway.status == wire.GoawayReason.SHUTDOWN
    assert proto.pending  # the call in flight still runs
    native.service.waiting[0].callback(echo_pb2.EchoReply(payload=b"x"))
    assert native.outcome(transport) == "OK"


def test_status_codes_seen_by_the_observer_are_ints():
    native = Native()
    codes: list[int] = []
    native.factory.observer.call_finished = lambda m, code, d: codes.append(code)
    native.call("Echo", echo("rpc-error"))
    assert codes == [StatusCode.PERMISSION_DENIED] and type(codes[0]) is int
