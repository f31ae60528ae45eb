"""Calls timed from their arrival: the read's receive time, late drops, the limiter's samples."""

from __future__ import annotations

from twisted.internet.task import Clock

from testbed.echo_service import ECHO, STREAMS, EchoService, StreamService
from testbed.protos import echo_pb2
from tests.helpers import ServerConn
from twisted_rpc import CallContext, Dispatcher, ServerLimits, StatusCode
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.server import ServerFactory

METHODS = describe(ECHO).methods
COUNT = describe(STREAMS).methods["Count"]


class SlowEcho(EchoService):
    """Echo does 0.3 s of work inline (the Clock moves on), so the frames read
    with it wait; AsyncEcho counts the calls that ran."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.ran: list[bytes] = []

    def Echo(self, request: echo_pb2.EchoRequest, context: CallContext) -> echo_pb2.EchoReply:
        self.clock.advance(0.3)
        return echo_pb2.EchoReply(payload=request.payload)

    async def AsyncEcho(self, request: echo_pb2.EchoRequest, context: CallContext):  # type: ignore[no-untyped-def]
        self.ran.append(request.payload)
        return echo_pb2.EchoReply(payload=request.payload)


def _frame(call_id: int, method, message, timeout_ms: int = 0) -> bytes:  # type: ignore[no-untyped-def]
    payload = message.SerializeToString()
    return wire.encode_request(call_id, method.route, len(payload), timeout_ms) + payload


def _provider(adaptive: bool = False) -> tuple[Clock, SlowEcho, StreamService, ServerConn]:
    clock = Clock()
    clock.advance(100)
    echo, streams = SlowEcho(clock), StreamService()
    limits = ServerLimits(adaptive_limit=adaptive)
    factory = ServerFactory(Dispatcher([echo, streams]), clock, limits=limits)
    return clock, echo, streams, ServerConn(factory)


def test_each_read_stamps_its_frames_with_when_it_started():
    clock, _, _, conn = _provider()
    conn.proto.dataReceived(_frame(1, METHODS["Echo"], echo_pb2.EchoRequest()))
    assert conn.proto.received_at == 100.0  # the read started before the 0.3 s of work
    assert conn.proto.last_active == 100.0
    clock.advance(1)
    conn.request(2, METHODS["Echo"].route)
    assert conn.proto.received_at == 101.3


def test_a_call_whose_deadline_passed_after_arrival_is_dropped_unrun_and_marked():
    _, echo, _, conn = _provider(adaptive=True)
    slow = METHODS["Echo"]
    fast = METHODS["AsyncEcho"]
    conn.proto.dataReceived(
        _frame(1, slow, echo_pb2.EchoRequest())  # 0.3 s of work inline: the others wait
        + _frame(2, fast, echo_pb2.EchoRequest(payload=b"late"), timeout_ms=200)
        + _frame(3, fast, echo_pb2.EchoRequest(payload=b"in time"), timeout_ms=1000)
        + _frame(4, fast, echo_pb2.EchoRequest(payload=b"no deadline"))
    )
    frames = {f.call_id: f for f in conn.frames()}
    late = frames[2]
    assert late.status == StatusCode.DEADLINE_EXCEEDED
    assert late.metadata == {wire.NOT_RUN_KEY: "late"}
    assert "before the call ran" in late.message
    assert echo.ran == [b"in time", b"no deadline"]  # the late one never reached its handler
    assert frames[3].status == frames[4].status == 0
    limiter = conn.proto.factory.limiter
    assert limiter is not None
    assert (limiter.dropped_late, limiter.shed) == (1, 1)


def test_a_late_drop_needs_no_limiter():
    _, echo, _, conn = _provider(adaptive=False)
    conn.proto.dataReceived(
        _frame(1, METHODS["Echo"], echo_pb2.EchoRequest())
        + _frame(2, METHODS["AsyncEcho"], echo_pb2.EchoRequest(), timeout_ms=100)
    )
    late = [f for f in conn.frames() if f.call_id == 2]
    assert [(f.status, f.metadata) for f in late] == [
        (StatusCode.DEADLINE_EXCEEDED, {wire.NOT_RUN_KEY: "late"})
    ]
    assert echo.ran == []


def test_a_stream_start_past_its_deadline_is_dropped_unrun():
    clock, _, streams, conn = _provider()
    conn.proto.dataReceived(
        _frame(1, METHODS["Echo"], echo_pb2.EchoRequest())
        + _frame(2, COUNT, echo_pb2.CountRequest(count=1, tag="late"), timeout_ms=250)
        + _frame(3, COUNT, echo_pb2.CountRequest(count=1, tag="ran"), timeout_ms=5000)
    )
    clock.advance(0)
    frames = conn.frames()
    late = [f for f in frames if f.call_id == 2]
    assert [(f.status, f.metadata) for f in late] == [
        (StatusCode.DEADLINE_EXCEEDED, {wire.NOT_RUN_KEY: "late"})
    ]
    assert streams.ends == {"ran": "done"}  # the late stream's handler never started


def test_the_limiter_times_a_call_from_its_arrival():
    _, _, _, conn = _provider(adaptive=True)
    limiter = conn.proto.factory.limiter
    assert limiter is not None
    limiter.window = limiter.short_window = 1
    conn.proto.dataReceived(
        _frame(1, METHODS["Echo"], echo_pb2.EchoRequest())  # 0.3 s inline
        + _frame(2, METHODS["AsyncEcho"], echo_pb2.EchoRequest())  # answers at once
    )
    assert [f.call_id for f in conn.frames()] == [1, 2]
    # timed from its read: the 0.3 s it waited behind call 1 (from dispatch it took 0)
    assert abs(limiter.current - 0.3) < 1e-9
