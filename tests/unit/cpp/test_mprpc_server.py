"""The mprpc-compatible listener, byte by byte on a StringTransport with a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from examples.mprpc_compat.callee import UserServiceRpc
from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from tests.unit.cpp.test_mprpc_wire import LOGIN, LOGIN_REPLY, REGISTER, REGISTER_REPLY
from twisted_rpc import Dispatcher, ServerLimits
from twisted_rpc.cpp import CppServerFactory, encode_request


class HalfClosingTransport(StringTransport):
    """Records the half-close a TCP transport would send as FIN."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Harness:
    def __init__(self, limits: ServerLimits | None = None) -> None:
        self.clock = Clock()
        self.factory = CppServerFactory(
            Dispatcher([UserServiceRpc(), EchoService()]), self.clock, 1 << 20, limits
        )

    def connect(self) -> tuple[object, HalfClosingTransport]:
        proto = self.factory.buildProtocol(None)
        transport = HalfClosingTransport()
        proto.makeConnection(transport)
        return proto, transport


def echo_request(method: str = "Echo", **fields) -> bytes:
    args = echo_pb2.EchoRequest(**fields).SerializeToString()
    return encode_request("EchoService", method, args)


def messages(events) -> str:
    return "\n".join(str(e.get("log_format", "")).format(**e) for e in events)


def test_login_answered_with_the_bare_reply_then_half_closed():
    h = Harness()
    proto, transport = h.connect()
    for i in range(len(LOGIN)):  # one byte per read
        proto.dataReceived(LOGIN[i : i + 1])
    assert transport.value() == LOGIN_REPLY
    assert transport.write_closed and not transport.disconnecting


def test_register_answered_byte_for_byte():
    proto, transport = Harness().connect()
    proto.dataReceived(REGISTER)
    assert transport.value() == REGISTER_REPLY and transport.write_closed


def test_routes_are_short_service_names():
    assert sorted(Harness().factory.routes) == [
        ("EchoService", "AsyncEcho"),
        ("EchoService", "Echo"),
        ("EchoService", "NotImplemented"),
        ("UserServiceRpc", "Login"),
        ("UserServiceRpc", "Register"),
    ]


def check_closed_without_reply(data: bytes, logged, expected: str) -> None:
    proto, transport = Harness().connect()
    proto.dataReceived(data)
    assert transport.value() == b""
    assert transport.disconnecting
    assert expected in messages(logged)


def test_unknown_method_logged_and_closed_without_reply(logged):
    check_closed_without_reply(
        encode_request("UserServiceRpc", "Logout", b""),
        logged,
        "unknown method 'Logout' of service UserServiceRpc",
    )


def test_unknown_service_logged_and_closed_without_reply(logged):
    check_closed_without_reply(encode_request("Nope", "Login", b""), logged, "unknown service")


def test_garbage_args_logged_and_closed_without_reply(logged):
    check_closed_without_reply(
        encode_request("UserServiceRpc", "Login", b"\xff\xff\xff"),
        logged,
        "cannot parse fixbug.LoginRequest",
    )


def test_bad_header_logged_and_closed(logged):
    check_closed_without_reply(b"\x00\x00\x00\x40" + b"x" * 8, logged, "bad request")


def test_handler_errors_logged_and_closed_without_reply(logged):
    check_closed_without_reply(
        echo_request(fail_code=5, fail_message="no such user"), logged, "NOT_FOUND no such user"
    )
    check_closed_without_reply(echo_request(crash=True), logged, "handler raised an exception")
    check_closed_without_reply(echo_request("NotImplemented"), logged, "UNIMPLEMENTED")


def test_other_connections_keep_being_served_after_bad_input():
    h = Harness()
    bad, bad_transport = h.connect()
    bad.dataReceived(b"\xff\xff\xff\xff")
    good, good_transport = h.connect()
    good.dataReceived(LOGIN)
    assert bad_transport.disconnecting and good_transport.value() == LOGIN_REPLY


def test_async_reply_after_the_handler_finishes():
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(echo_request("AsyncEcho", payload=b"later", delay=2))
    assert transport.value() == b"" and h.factory.calls_in_flight == 1
    h.clock.advance(2)
    assert echo_pb2.EchoReply.FromString(transport.value()).payload == b"later"
    assert transport.write_closed and h.factory.calls_in_flight == 0


def test_caller_gone_cancels_the_handler(logged):
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(echo_request("AsyncEcho", delay=5))
    proto.connectionLost(Failure(ConnectionDone()))
    assert h.factory.calls_in_flight == 0
    h.clock.advance(5)  # the cancelled handler does not write
    assert transport.value() == b""
    assert "caller went away" in messages(logged)
    assert not [e for e in logged if e.get("log_failure")]


def test_reply_over_1024_bytes_is_sent_with_a_warning(logged):
    proto, transport = Harness().connect()
    proto.dataReceived(echo_request(payload=b"x" * 2000))
    assert echo_pb2.EchoReply.FromString(transport.value()).payload == b"x" * 2000
    assert "reads only 1024" in messages(logged)


def test_incomplete_request_times_out(logged):
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(LOGIN[:10])
    h.clock.advance(h.factory.read_timeout)
    assert transport.disconnecting and "no whole request" in messages(logged)


def test_half_closed_connection_is_aborted_if_the_caller_never_closes():
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(LOGIN)
    assert not transport.disconnecting
    h.clock.advance(h.factory.read_timeout)
    assert transport.disconnecting  # abortConnection on a StringTransport


def test_draining_factory_refuses_new_calls(logged):
    h = Harness()
    h.factory.goaway()
    proto, transport = h.connect()
    proto.dataReceived(LOGIN)
    assert transport.value() == b"" and "shutting down" in messages(logged)


def test_max_calls_applies_to_compat_calls(logged):
    h = Harness(ServerLimits(max_calls=1))
    first, _ = h.connect()
    first.dataReceived(echo_request("AsyncEcho", delay=1))
    second, transport = h.connect()
    second.dataReceived(LOGIN)
    assert transport.value() == b"" and "1 calls in flight" in messages(logged)


def test_compat_calls_are_observed_like_native_ones():
    from twisted_rpc.ops import ProviderMetrics

    h = Harness()
    h.factory.observer = metrics = ProviderMetrics()
    for data in (LOGIN, REGISTER, encode_request("UserServiceRpc", "Nope", b"")):
        proto, _ = h.connect()
        proto.dataReceived(data)
    proto, _ = h.connect()
    proto.dataReceived(echo_request(fail_code=5))
    assert metrics.totals == {
        "fixbug.UserServiceRpc/Login": {"OK": 1},
        "fixbug.UserServiceRpc/Register": {"OK": 1},
        "?/?": {"NOT_FOUND": 1},
        "mprpc.test.EchoService/Echo": {"NOT_FOUND": 1},
    }


# ---------------------------------------------------------------- streaming methods are refused


@pytest.mark.parametrize(
    "method, request_bytes",
    [
        ("Count", echo_pb2.CountRequest(count=3, tag="cpp").SerializeToString()),
        ("Sum", echo_pb2.EchoRequest(payload=b"ab").SerializeToString()),
        ("Chat", b""),
    ],
)
def test_a_streaming_method_is_refused_unimplemented_and_logged(logged, method, request_bytes):
    from testbed.echo_service import StreamService
    from twisted_rpc.ops import ProviderMetrics

    service = StreamService()
    clock = Clock()
    factory = CppServerFactory(Dispatcher([service, EchoService()]), clock, 1 << 20)
    factory.observer = metrics = ProviderMetrics()
    assert ("StreamService", method) in factory.routes
    proto = factory.buildProtocol(None)
    transport = HalfClosingTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode_request("StreamService", method, request_bytes))
    # No reply (the protocol has no status), the connection closed, the reason logged.
    assert transport.value() == b"" and transport.disconnecting
    text = messages(logged)
    full = f"mprpc.test.StreamService/{method}"
    assert "refused mprpc call from" in text
    assert f"{full} streams, and this listener's protocol has no streams" in text
    assert f"mprpc call {full} from" in text and "failed: UNIMPLEMENTED" in text
    assert metrics.totals == {full: {"UNIMPLEMENTED": 1}}
    # The handler never ran and nothing is left in flight.
    assert service.ends == {}
    assert factory.calls_in_flight == 0 and factory.streams_in_flight == 0
    assert clock.getDelayedCalls() == []  # the read timer went with the connection
    # The listener keeps serving unary calls on other connections.
    good = factory.buildProtocol(None)
    good_transport = HalfClosingTransport()
    good.makeConnection(good_transport)
    good.dataReceived(echo_request(payload=b"still here"))
    assert echo_pb2.EchoReply.FromString(good_transport.value()).payload == b"still here"


def test_a_call_shed_by_the_adaptive_limit_is_closed_unanswered_and_observed():
    # The C++ wire has no trailers for the not-run marking: the caller is
    # closed without a reply, and the shed call still reaches the observer.
    h = Harness(ServerLimits(adaptive_limit=True, adaptive_min_limit=1, adaptive_max_limit=1))
    seen = []

    class Observer:
        def call_finished(self, method, code, duration):
            seen.append((method, code))

    h.factory.observer = Observer()
    first, _ = h.connect()
    first.dataReceived(echo_request("AsyncEcho", delay=1))  # admitted: the limit is 1
    shed, transport = h.connect()
    shed.dataReceived(echo_request("AsyncEcho"))
    assert transport.value() == b"" and transport.disconnecting
    assert seen == [("mprpc.test.EchoService/AsyncEcho", 8)]  # RESOURCE_EXHAUSTED
    assert h.factory.limiter is not None and h.factory.limiter.shed == 1
