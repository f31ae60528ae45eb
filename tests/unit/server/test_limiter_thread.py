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
    assert limiter.cpu_bound == 1000
    assert limiter.limit > 50  # the gradient decides: it climbed


def test_a_busy_thread_whose_calls_do_not_wait_is_not_bound():
    """The thread is saturated by other work (another listener, a flood of
    requests that fail): these calls' latency does not grow, so no bound."""
    thread = Thread()
    limiter = thread.limiter(min_limit=4, max_limit=1000, window=10)
    for _ in range(100):  # a 10 ms call every 20 ms, the thread busy all along
        thread.run(0.02, 0.02)
        limiter.sample(0.010, 1)
    assert limiter.busy == pytest.approx(1.0)
    assert limiter.cpu_bound == 1000 and limiter.limit >= 4


def test_half_cpu_half_wait_is_bound_to_what_the_thread_runs_in_time():
    thread = Thread()
    limiter = thread.limiter(min_limit=1, max_limit=1000, initial_limit=10, window=10)
    for _ in range(5):  # 2 ms of CPU each, one after the other, then 2 ms of waiting
        admitted = limiter.limit
        for i in range(1, admitted + 1):
            thread.run(0.002, 0.002)
            limiter.sample(i * 0.002 + 0.002, admitted - i + 1)
    assert limiter.cpu_bound == 3  # 4 ms * 1.5 / 2 ms
    assert limiter.limit <= 3


def test_the_bound_is_let_go_a_call_a_window_once_the_thread_has_time_to_spare():
    thread = Thread()
    limiter = thread.limiter(min_limit=4, max_limit=1000)
    _serialised(limiter, thread, work=0.002, rounds=200)
    assert limiter.limit == 1
    bounds = []
    for _ in range(6):  # load falls: the thread idles three quarters of the time
        for _ in range(limiter.window):
            thread.run(0.002, 0.008)
            limiter.sample(0.00205, 1)
        bounds.append(limiter.cpu_bound)
    # (busy is averaged over windows: a lull of one window is not idleness)
    assert bounds == [1, 1, 2, 3, 4, 5]
    assert limiter.limit == 4  # the gradient's floor: min(estimate, bound)
    for _ in range(3):  # several calls in flight that did not wait: let go at once
        for _ in range(limiter.window):
            thread.run(0.002, 0.008)
            limiter.sample(0.00205, 3)
    assert limiter.cpu_bound == 1000 and limiter.limit >= 4


def test_methods_are_compared_with_their_own_no_load_latency():
    """A cheap method beside a slow one does not make the slow one look
    overloaded (nothing waits: each keeps its own latency)."""
    limiter = AdaptiveLimiter(min_limit=4, max_limit=1000, initial_limit=50, window=10)
    for _ in range(300):
        limiter.sample(0.00005, 10, "Health/Check")
        limiter.sample(0.010, 10, "Backend/Get")
    assert limiter.limit >= 50
    assert limiter.no_load == pytest.approx((0.001 + 0.010) / 2)  # the cheap one read as 1 ms
    for _ in range(100):  # the slow one gets 5x slower: the limit falls
        limiter.sample(0.00005, 10, "Health/Check")
        limiter.sample(0.050, 10, "Backend/Get")
    assert limiter.limit < 50


def test_queueing_under_a_millisecond_is_not_overload():
    limiter = AdaptiveLimiter(min_limit=4, max_limit=1000, initial_limit=50, window=16)
    for _ in range(50):  # sixteen 5 us calls a read, the i-th waiting for those before it
        for i in range(1, 17):
            limiter.sample(i * 0.000005, i)
    assert limiter.limit >= 50 and not limiter.serial


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


class CheapInline(EchoService):
    """Echo answers inline after 50 us of the (fake) clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def Echo(self, request, context):
        self.clock.advance(0.00005)
        return super().Echo(request, context)


def test_cheap_inline_calls_do_not_drive_a_backend_bound_method_down():
    clock = Clock()
    limits = ServerLimits(adaptive_limit=True)
    factory = ServerFactory(Dispatcher([CheapInline(clock)]), clock, limits=limits)
    backend, cheap = ServerConn(factory), ServerConn(factory, port=1001)
    for i in range(1, 3001):  # a 10 ms call and a 50 us one every ms: ~10 in flight
        backend.request(i, ASYNC_ROUTE, echo_pb2.EchoRequest(delay=0.01))
        cheap.request(i, ECHO_ROUTE, echo_pb2.EchoRequest())
        clock.advance(0.001)
    clock.advance(0.05)
    assert [f for f in backend.frames() if f.status != 0] == []
    assert factory.limiter is not None and factory.limiter.limit > 10


def test_a_deferred_fired_already_is_sampled_once():
    _, factory = _inline_provider(limit=4)
    limiter = factory.limiter
    assert limiter is not None
    limiter.window = 2
    conn = ServerConn(factory)
    conn.request(1, ASYNC_ROUTE, echo_pb2.EchoRequest())  # an async def that never awaits
    assert [f.status for f in conn.frames()] == [0]
    assert factory.inline_ran == 0  # not counted as inline
    assert limiter.no_load == 0.0  # one sample: no window of two yet
    conn.request(2, ASYNC_ROUTE, echo_pb2.EchoRequest())
    assert limiter.no_load == pytest.approx(0.001)  # a window (0 s, read as the 1 ms floor)


def test_inline_calls_over_max_calls_are_refused():
    clock = Clock()
    limits = ServerLimits(adaptive_limit=True, max_calls=2)
    factory = ServerFactory(Dispatcher([EchoService()]), clock, limits=limits)
    conn = ServerConn(factory)
    conn.proto.dataReceived(
        b"".join(_frame(i, ECHO_ROUTE, echo_pb2.EchoRequest()) for i in range(1, 6))
    )
    frames = conn.frames()
    assert [f.status for f in frames] == [0, 0] + [StatusCode.RESOURCE_EXHAUSTED] * 3
    assert "max_calls" in frames[2].message and frames[2].metadata is None  # not a shed


def test_a_read_ending_in_a_protocol_error_lets_go_of_its_count():
    _, factory = _inline_provider(limit=4)
    conn = ServerConn(factory)
    slow = echo_pb2.EchoRequest(delay=1)
    conn.proto.dataReceived(
        _frame(1, ECHO_ROUTE, echo_pb2.EchoRequest())
        + _frame(2, ASYNC_ROUTE, slow)
        + _frame(2, ASYNC_ROUTE, slow)  # a call id in flight: a protocol error
    )
    assert conn.transport.disconnecting
    conn.proto.connectionLost()
    assert factory.inline_of is None and factory.inline_ran == 0


def test_calls_refused_unrun_are_logged_together_not_one_by_one():
    from twisted.logger import formatEvent, globalLogPublisher

    clock, factory = _inline_provider(limit=1)
    conn = ServerConn(factory)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:

        def read_of(n: int, first: int) -> bytes:
            return b"".join(
                _frame(i, ECHO_ROUTE, echo_pb2.EchoRequest()) for i in range(first, first + n)
            )

        conn.proto.dataReceived(read_of(5, 1))  # one runs, four are shed: a line at the first
        clock.advance(1)
        conn.proto.dataReceived(read_of(5, 6))  # four more, within 10 s of the line
        clock.advance(10)
        conn.proto.dataReceived(read_of(3, 11))  # two more: a line at the first, for 3 + 4 + 1
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if "refused unrun" in formatEvent(e)]
    assert len(lines) == 2
    assert "1 calls refused unrun" in lines[0] and "8 calls refused unrun" in lines[1]
    assert "shed:" in lines[1]
    assert not [e for e in events if "failed: RESOURCE_EXHAUSTED" in formatEvent(e)]
    assert factory.limiter is not None and factory.limiter.shed == 10


def test_cpu_on_two_cores_at_once_doubles_the_bound():
    """Threads burning at once on two cores (busy 2: CPU twice the wall time)
    run twice the calls in the same latency."""
    thread = Thread()
    limiter = thread.limiter(min_limit=1, max_limit=1000, window=10)
    for _ in range(20):  # windows of calls that waited (6 ms, 2 ms at no load), 2 ms of CPU each
        for i in range(10):
            thread.run(0.002, 0.001)
            limiter.sample(0.002 if i == 0 else 0.006, 4)
    assert limiter.busy == pytest.approx(2.0, abs=0.01)
    assert limiter.cpu_bound == 3  # 2 ms * 1.5 / 2 ms = 1.5, times 2 (1 on one core)
