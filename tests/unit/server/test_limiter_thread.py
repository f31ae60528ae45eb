"""The adaptive limit on a provider whose reactor thread does the work: the
thread's CPU bound, and calls answered inline counted until their read ends."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import ServerConn
from twisted_rpc import Dispatcher, ServerLimits, StatusCode
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.server import ServerFactory
from twisted_rpc.server._limiter import AdaptiveLimiter

ECHO_ROUTE = describe(ECHO).methods["Echo"].route
ASYNC_ROUTE = describe(ECHO).methods["AsyncEcho"].route


class Thread:
    """Fake clocks: the thread's CPU seconds and the wall's, advanced by hand."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def limiter(self, **kw: int) -> AdaptiveLimiter:
        return AdaptiveLimiter(cpu_clock=lambda: self.cpu, wall_clock=lambda: self.wall, **kw)

    def run(self, cpu: float, wall: float) -> None:
        self.cpu += cpu
        self.wall += wall


def _serialised(limiter: AdaptiveLimiter, thread: Thread, work: float, rounds: int) -> list[int]:
    """Rounds of the limit's calls run one after the other on the thread
    (``work`` of CPU each, the i-th ending after ``i * work``); the limits seen."""
    seen = []
    for _ in range(rounds):
        admitted = limiter.limit
        for i in range(1, admitted + 1):
            thread.run(work, work)
            limiter.sample(i * work + 0.00005, admitted - i + 1)
        seen.append(limiter.limit)
    return seen


def test_a_thread_burning_its_cpu_is_bound_to_one_call_below_the_min_limit():
    thread = Thread()
    limiter = thread.limiter(min_limit=4, max_limit=1000)
    seen = _serialised(limiter, thread, work=0.002, rounds=400)
    assert limiter.cpu_per_call == pytest.approx(0.002)
    assert limiter.busy == pytest.approx(1.0)
    # no_load 2.05 ms * 1.5 / 2 ms of CPU per call: one call fits the tolerated latency
    assert limiter.cpu_bound == 1
    assert seen[-300:] == [1] * 300  # measured, not probed: it stays there
    assert limiter.estimate >= 4  # the gradient's own figure keeps its floor


def test_a_thread_waiting_on_io_is_not_bound():
    thread = Thread()
    limiter = thread.limiter(min_limit=4, max_limit=1000, initial_limit=50, window=10)
    for _ in range(20):  # 10 ms calls costing the thread 50 us each, 50 in flight
        for _ in range(10):
            thread.run(0.00005, 0.0002)  # one ends every 0.2 ms
            limiter.sample(0.010, 50)
    assert limiter.busy == pytest.approx(0.25)
    assert limiter.cpu_bound == 1000 and limiter.cpu_per_call == 0.0
    assert limiter.limit > 50  # the gradient decides: it climbed


def test_a_busy_thread_doing_little_per_call_is_bound_far_above_its_limit():
    thread = Thread()
    limiter = thread.limiter(min_limit=4, max_limit=1000, initial_limit=50, window=10)
    for _ in range(20):  # as above, with the thread busy with other work as well
        for _ in range(10):
            thread.run(0.0002, 0.0002)
            limiter.sample(0.010, 50)
    assert limiter.cpu_bound == 75  # 10 ms * 1.5 / 0.2 ms
    assert limiter.limit > 50


def test_half_cpu_half_wait_is_bound_to_what_the_thread_runs_in_time():
    thread = Thread()
    limiter = thread.limiter(min_limit=1, max_limit=1000, initial_limit=10, window=10)
    for _ in range(5):  # 2 ms of CPU then 2 ms of waiting: 4 ms at no load
        for _ in range(10):
            thread.run(0.002, 0.002)
            limiter.sample(0.004, 3)
    assert limiter.cpu_bound == 3  # 4 ms * 1.5 / 2 ms
    assert limiter.limit <= 3


def test_no_cpu_clock_no_bound():
    limiter = AdaptiveLimiter(min_limit=4, max_limit=100)
    seen = _serialised(limiter, Thread(), work=0.002, rounds=200)
    assert limiter.cpu_bound == 100 and limiter.cpu_per_call == 0.0
    assert min(seen) >= 4
    with pytest.raises(ValueError):
        AdaptiveLimiter(cpu_clock=lambda: 0.0)


def _inline_provider(limit: int) -> tuple[Clock, ServerFactory]:
    clock = Clock()
    limits = ServerLimits(adaptive_limit=True, adaptive_min_limit=limit, adaptive_max_limit=limit)
    factory = ServerFactory(Dispatcher([EchoService()]), clock, limits=limits)
    return clock, factory


def _frame(call_id: int, route: bytes, message: echo_pb2.EchoRequest) -> bytes:
    payload = message.SerializeToString()
    return wire.encode_request(call_id, route, len(payload), 0, None) + payload


def test_calls_answered_inline_count_until_their_read_ends():
    _, factory = _inline_provider(limit=2)
    conn = ServerConn(factory)
    # Four calls of an inline handler in one read: their answers leave together
    # at its end, so the third and fourth would wait behind two others.
    conn.proto.dataReceived(
        b"".join(_frame(i, ECHO_ROUTE, echo_pb2.EchoRequest(payload=b"x")) for i in range(1, 5))
    )
    frames = {f.call_id: f for f in conn.frames()}
    assert [frames[i].status for i in (1, 2)] == [0, 0]
    for i in (3, 4):
        assert frames[i].status == StatusCode.RESOURCE_EXHAUSTED
        assert frames[i].metadata == {wire.NOT_RUN_KEY: "shed"}
        assert "shed: 2 calls in flight" in frames[i].message
    assert factory.limiter is not None and factory.limiter.shed == 2
    # The next read starts afresh.
    conn.proto.dataReceived(_frame(5, ECHO_ROUTE, echo_pb2.EchoRequest()))
    assert [(f.call_id, f.status) for f in conn.frames()] == [(5, 0)]
    assert factory.inline_ran == 0 and factory.inline_of is None  # reset as the read ended


def test_inline_and_deferred_calls_share_the_limit():
    clock, factory = _inline_provider(limit=2)
    conn = ServerConn(factory)
    conn.request(1, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=1))  # holds a slot for 1 s
    conn.proto.dataReceived(
        _frame(2, ECHO_ROUTE, echo_pb2.EchoRequest())
        + _frame(3, ECHO_ROUTE, echo_pb2.EchoRequest())
    )
    frames = {f.call_id: f.status for f in conn.frames()}
    assert frames == {2: 0, 3: StatusCode.RESOURCE_EXHAUSTED}
    clock.advance(1)
    assert [(f.call_id, f.status) for f in conn.frames()] == [(1, 0)]


def test_inline_failures_do_not_count_nor_sample():
    _, factory = _inline_provider(limit=1)
    conn = ServerConn(factory)
    garbage = wire.encode_request(1, ECHO_ROUTE, 3, 0, None) + b"\xff\xff\xff"  # does not parse
    failing = _frame(2, ECHO_ROUTE, echo_pb2.EchoRequest(fail_code=StatusCode.NOT_FOUND))
    ok = _frame(3, ECHO_ROUTE, echo_pb2.EchoRequest())
    conn.proto.dataReceived(garbage + failing + ok)
    frames = {f.call_id: f.status for f in conn.frames()}
    assert frames == {1: StatusCode.INVALID_ARGUMENT, 2: StatusCode.NOT_FOUND, 3: 0}
    limiter = factory.limiter
    assert limiter is not None and limiter.shed == 0


class TakesAMillisecond(EchoService):
    """Echo answers inline after 1 ms of the (fake) clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def Echo(self, request, context):
        self.clock.advance(0.001)
        return super().Echo(request, context)


def test_inline_calls_are_sampled_from_their_read():
    clock = Clock()
    limits = ServerLimits(adaptive_limit=True, adaptive_min_limit=1, adaptive_max_limit=100)
    factory = ServerFactory(Dispatcher([TakesAMillisecond(clock)]), clock, limits=limits)
    limiter = factory.limiter
    assert limiter is not None
    limiter.window = 6
    conn = ServerConn(factory)
    for i in range(1, 4):
        conn.request(i, ECHO_ROUTE, echo_pb2.EchoRequest())  # 1 ms each, alone in its read
    conn.proto.dataReceived(
        b"".join(_frame(i, ECHO_ROUTE, echo_pb2.EchoRequest()) for i in (4, 5, 6))
    )
    assert [f.status for f in conn.frames()] == [0] * 6
    # A window of six: three of 1 ms, then 1, 2 and 3 ms from their read's start.
    assert limiter.no_load == pytest.approx(0.001)
    assert limiter.current == pytest.approx(0.009 / 6)
