"""Adaptive load shedding: the limiter, the provider's shedding, the consumer's failover."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet.task import Clock, deferLater

from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import ClientConn, ServerConn, TwoProviders, failure_of, result
from twisted_rpc import ConfigError, Dispatcher, NotSentError, ServerLimits, StatusCode
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.provider import load_provider_config
from twisted_rpc.server import ServerFactory
from twisted_rpc.server._limiter import AdaptiveLimiter

ASYNC = describe(ECHO).methods["AsyncEcho"]


def _windows(limiter: AdaptiveLimiter, latency: float, n: int, in_flight: int) -> list[int]:
    """Feed ``n`` windows of calls of ``latency``; the limit after each."""
    limits = []
    for _ in range(n):
        for _ in range(limiter.window):
            limiter.sample(latency, in_flight)
        limits.append(limiter.limit)
    return limits


def test_the_limit_falls_as_latency_rises_and_recovers():
    limiter = AdaptiveLimiter(min_limit=4, max_limit=100, initial_limit=50, window=10)
    steady = _windows(limiter, 0.010, 3, in_flight=50)
    assert steady[-1] > 50  # at the no-load latency and in use: it climbs, slowly
    assert steady[-1] - 50 < 10
    assert limiter.no_load == pytest.approx(0.010)
    high = steady[-1]
    slow = _windows(limiter, 0.050, 20, in_flight=50)  # 5x the no-load latency
    assert slow == sorted(slow, reverse=True)  # falls window after window...
    assert slow[-1] < high / 2
    assert slow[-1] >= 4  # ...never below min_limit
    low = slow[-1]
    back = _windows(limiter, 0.010, 30, in_flight=100)
    assert back == sorted(back)  # recovers, without overshooting max_limit
    assert low < back[-1] <= 100


def test_latency_within_tolerance_does_not_lower_the_limit():
    limiter = AdaptiveLimiter(min_limit=4, max_limit=100, initial_limit=40, window=10)
    _windows(limiter, 0.010, 1, in_flight=40)
    assert _windows(limiter, 0.014, 5, in_flight=40)[-1] >= 40  # 1.4x, tolerance 1.5x


def test_an_idle_provider_does_not_raise_its_limit():
    limiter = AdaptiveLimiter(min_limit=4, max_limit=100, initial_limit=40, window=10)
    assert _windows(limiter, 0.010, 10, in_flight=3) == [40] * 10


def test_the_no_load_latency_follows_recent_windows():
    limiter = AdaptiveLimiter(window=5, history=3)
    _windows(limiter, 0.001, 1, in_flight=10)
    _windows(limiter, 0.020, 3, in_flight=10)  # the 1 ms window falls out of the history
    assert limiter.no_load == pytest.approx(0.020)


class OneThread:
    """A provider whose calls' work runs one at a time on one thread (``work``
    seconds each), admitting up to the limiter's limit: each round, the calls
    admitted finish one after the other, the i-th after ``i * work``, with
    ``limit - i + 1`` in flight as it does; ``wait`` is added to every call
    (e.g. a share of a read it waited behind)."""

    def __init__(self, limiter: AdaptiveLimiter, work: float = 0.002, wait: float = 0.0) -> None:
        self.limiter = limiter
        self.work = work
        self.wait = wait
        self.calls = 0
        self.limits: list[int] = []

    def run(self, calls: int) -> list[int]:
        """Run ``calls`` calls; the limit after each round."""
        end = self.calls + calls
        while self.calls < end:
            admitted = self.limiter.limit
            for i in range(1, admitted + 1):
                self.limiter.sample(self.wait + i * self.work, admitted - i + 1)
            self.calls += admitted
            self.limits.append(self.limiter.limit)
        return self.limits


def test_one_thread_cpu_bound_calls_serialise_and_the_limit_falls_fast_to_them():
    limiter = AdaptiveLimiter(min_limit=1, max_limit=1000, initial_limit=50)
    provider = OneThread(limiter)
    provider.run(150)  # a sudden overload: 50 calls queued at once
    assert limiter.limit <= 4  # from 50 within 150 calls
    provider.run(5000)
    # Latency grew with the calls in flight (serialised, no sqrt headroom): the
    # limit settles where nothing waits, probing one more only now and then.
    settled = provider.limits[-200:]
    assert max(settled) <= 2 and min(settled) >= 1
    assert settled.count(1) >= 0.9 * len(settled)
    assert limiter.no_load == pytest.approx(0.002)


def test_a_parallel_provider_keeps_its_headroom():
    """Latency flat as the calls in flight grow (work off the thread, e.g.
    awaiting a backend): not serial, and the limit climbs by sqrt(limit)."""
    limiter = AdaptiveLimiter(min_limit=4, max_limit=1000, initial_limit=50, window=10)
    climbed = _windows(limiter, 0.010, 5, in_flight=50)
    assert not limiter.serial
    assert climbed[-1] >= 55  # a fifth of sqrt(50) ~ 1.4 a window


def test_an_overloaded_window_ends_early():
    limiter = AdaptiveLimiter(min_limit=1, initial_limit=50)  # window 50, short 4
    for _ in range(9):
        assert not limiter.sample(0.001, 1)
    assert limiter.sample(0.001, 1) is False and limiter.limit == 50  # fine: the window goes on
    limiter = AdaptiveLimiter(min_limit=1, initial_limit=50)
    changed = [limiter.sample(0.001 * i, 50) for i in range(1, 7)]
    # the i-th call at i ms: past 3x no-load (tolerance 1.5, twice) on average at the 6th
    assert changed == [False] * 5 + [True]
    # gradient 1.5 / 3.5 = 0.43: 50 * 0.43 + sqrt(50)
    assert limiter.limit == 28


@pytest.mark.parametrize(
    "kw",
    [
        {"min_limit": 0},
        {"min_limit": 5, "max_limit": 4},
        {"window": 0},
        {"tolerance": 0.5},
        {"floor": 0.0},
        {"short_window": 0},
    ],
)
def test_bad_limiter_settings_are_refused(kw):
    with pytest.raises(ValueError):
        AdaptiveLimiter(**kw)


def _shedding(min_limit=2, max_limit=4):
    clock = Clock()
    limits = ServerLimits(
        adaptive_limit=True, adaptive_min_limit=min_limit, adaptive_max_limit=max_limit
    )
    return clock, ServerFactory(Dispatcher([EchoService()]), clock, limits=limits)


def test_calls_over_the_limit_are_shed_unrun_and_marked():
    clock, factory = _shedding()
    assert factory.admit_limit == 4
    conn = ServerConn(factory)
    for call_id in range(1, 6):
        conn.request(call_id, ASYNC.route, echo_pb2.EchoRequest(delay=1))
    (shed,) = conn.frames()
    assert (shed.call_id, shed.status) == (5, StatusCode.RESOURCE_EXHAUSTED)
    assert shed.metadata == {wire.NOT_RUN_KEY: "shed"}
    assert "adaptive limit 4" in shed.message
    assert factory.calls_in_flight == 4  # the fifth never started
    assert factory.limiter is not None and factory.limiter.shed == 1
    clock.advance(1)
    answers = conn.frames()
    assert sorted(f.call_id for f in answers) == [1, 2, 3, 4]
    assert all(f.status == 0 and f.metadata is None for f in answers)


def test_the_provider_lowers_its_limit_when_calls_slow_down():
    clock, factory = _shedding(min_limit=2, max_limit=8)
    assert factory.limiter is not None
    factory.limiter.window = 4
    conn = ServerConn(factory)
    call_id = 0

    def batch(delay: float) -> None:
        nonlocal call_id
        for _ in range(8):
            call_id += 1
            conn.request(call_id, ASYNC.route, echo_pb2.EchoRequest(delay=delay))
        clock.advance(delay)
        conn.frames()

    batch(0.01)
    assert factory.admit_limit == 8
    for _ in range(10):
        batch(0.1)  # ten times slower
    assert factory.admit_limit < 8
    assert factory.admit_limit == factory.limiter.limit >= 2
    for _ in range(40):
        batch(0.01)
    assert factory.admit_limit == 8  # back up to max_limit


def test_a_handlers_resource_exhausted_is_not_marked():
    clock, factory = _shedding()
    conn = ServerConn(factory)
    conn.request(1, ASYNC.route, echo_pb2.EchoRequest(fail_code=StatusCode.RESOURCE_EXHAUSTED))
    clock.advance(0)
    (answer,) = conn.frames()
    assert answer.status == StatusCode.RESOURCE_EXHAUSTED
    assert answer.metadata is None


def test_off_by_default_with_no_limiter():
    factory = ServerFactory(Dispatcher([EchoService()]), Clock())
    assert factory.limiter is None
    assert factory.admit_limit == factory.limits.max_calls == 10000


def test_the_consumer_takes_a_marked_answer_as_not_sent():
    conn = ClientConn()
    d = conn.proto.call(ASYNC, echo_pb2.EchoRequest())
    (request,) = conn.sent()
    conn.proto.dataReceived(
        wire.encode_header(
            wire.RESPONSE,
            request.call_id,
            0,
            status=StatusCode.RESOURCE_EXHAUSTED,
            message="shed",
            metadata={wire.NOT_RUN_KEY: "shed"},
        )
    )
    error = failure_of(d)
    assert isinstance(error, NotSentError)
    assert error.code == StatusCode.UNAVAILABLE
    plain = conn.proto.call(ASYNC, echo_pb2.EchoRequest())
    (request,) = conn.sent()
    conn.proto.dataReceived(wire.encode_status(request.call_id, StatusCode.RESOURCE_EXHAUSTED))
    error = failure_of(plain)
    assert not isinstance(error, NotSentError)
    assert error.code == StatusCode.RESOURCE_EXHAUSTED


def test_a_shed_call_fails_over_to_another_provider():
    two = TwoProviders()
    shedding = two.factories[1001]
    shedding.limiter = AdaptiveLimiter(min_limit=1, max_limit=1)
    shedding.limit_changed()
    echo = two.client.proxy(ECHO)  # not idempotent: only unrun calls go elsewhere
    calls = [echo.AsyncEcho(echo_pb2.EchoRequest(delay=1, payload=b"%d" % i)) for i in range(6)]
    two.connect_all()
    two.flush()
    assert shedding.limiter.shed >= 1
    two.reactor.advance(1)
    two.flush()
    assert all(result(d).payload == b"%d" % i for i, d in enumerate(calls))
    assert two.served[1001] == 1  # it ran one; the ones it shed ran at 1002
    assert two.served[1002] == 5


def test_a_shed_call_on_a_ready_connection_goes_elsewhere_within_the_budget():
    # Calls made once connected take the client's direct path (no retry
    # policy, not idempotent): a shed answer still sends them elsewhere.
    two = TwoProviders()
    shedding = two.factories[1001]
    shedding.limiter = AdaptiveLimiter(min_limit=1, max_limit=1)
    shedding.limit_changed()
    echo = two.client.proxy(ECHO)
    two.connect_all()
    two.flush()
    calls = [echo.AsyncEcho(echo_pb2.EchoRequest(delay=1, payload=b"%d" % i)) for i in range(6)]
    two.flush()
    shed = shedding.limiter.shed
    assert shed >= 1
    two.reactor.advance(1)
    two.flush()
    assert all(result(d).payload == b"%d" % i for i, d in enumerate(calls))
    assert two.served[1001] + two.served[1002] == 6
    assert two.served[1002] >= shed  # each call it shed ran at the other


def test_a_shed_call_fails_typed_when_the_budget_is_spent():
    two = TwoProviders()
    for factory in two.factories.values():
        factory.limiter = AdaptiveLimiter(min_limit=1, max_limit=1)
        factory.limit_changed()
    echo = two.client.proxy(ECHO)
    two.connect_all()
    two.flush()
    calls = [echo.AsyncEcho(echo_pb2.EchoRequest(delay=1)) for i in range(40)]
    two.flush()
    two.reactor.advance(1)
    two.flush()
    errors = []
    for d in calls:
        outcome: list[object] = []
        d.addBoth(outcome.append)
        errors.extend(o.value for o in outcome if hasattr(o, "value"))
    assert errors, "both providers admit one call at a time: most of 40 are shed"
    assert all(isinstance(e, NotSentError) and "(not run)" in e.message for e in errors)
    served = two.served[1001] + two.served[1002]
    assert served + len(errors) == 40  # every call ended: answered or failed typed


def test_the_ini_keys(tmp_path):
    ini = tmp_path / "provider.ini"
    body = """\
        [provider]
        listen = tcp:7001:interface=127.0.0.1
        services = pkg.mod:Svc
        adaptive_limit = yes
        adaptive_min_limit = 3
        adaptive_max_limit = %s
        """
    ini.write_text(textwrap.dedent(body % "300"))
    limits = load_provider_config(str(ini)).limits
    assert (limits.adaptive_limit, limits.adaptive_min_limit, limits.adaptive_max_limit) == (
        True,
        3,
        300,
    )
    ini.write_text(textwrap.dedent(body % "2"))
    with pytest.raises(ConfigError, match=r"\[provider\] ServerLimits.adaptive_min_limit"):
        load_provider_config(str(ini))


class OneThreadEcho(EchoService):
    """AsyncEcho's work takes ``work`` seconds of the Clock, one call at a
    time, as handlers burning one thread do: a call admitted behind others
    finishes after theirs."""

    def __init__(self, clock: Clock, work: float) -> None:
        self.clock = clock
        self.work = work
        self.free_at = 0.0
        self.served = 0

    def AsyncEcho(self, request, context):  # type: ignore[no-untyped-def]
        now = self.clock.seconds()
        self.free_at = max(now, self.free_at) + self.work

        def done() -> echo_pb2.EchoReply:
            self.served += 1
            return echo_pb2.EchoReply(payload=request.payload)

        return deferLater(self.clock, self.free_at - now, done)


def test_a_one_thread_provider_under_3x_load_settles_at_one_or_two_calls():
    clock = Clock()
    service = OneThreadEcho(clock, work=0.002)  # 500 calls/s at most
    limits = ServerLimits(adaptive_limit=True, adaptive_min_limit=1, adaptive_max_limit=100)
    factory = ServerFactory(Dispatcher([service]), clock, limits=limits)
    limiter = factory.limiter
    assert limiter is not None and limiter.limit == 20  # where it starts
    conn = ServerConn(factory)
    call_id = 0
    latencies: list[float] = []
    sent_at: dict[int, float] = {}
    limits_seen: list[int] = []
    serial = False
    for tick in range(1000):  # 2 s of 3 calls every 2 ms: 1,500 calls/s offered
        for _ in range(3):
            call_id += 1
            sent_at[call_id] = clock.seconds()
            conn.request(call_id, ASYNC.route, echo_pb2.EchoRequest(), timeout_ms=1000)
        clock.advance(0.002)
        for frame in conn.frames():
            if frame.status == 0 and tick >= 500:
                latencies.append(clock.seconds() - sent_at[frame.call_id])
        limits_seen.append(limiter.limit)
        serial |= limiter.serial
    assert max(limits_seen[100:]) <= 2  # down from 50 within 0.2 s, and it stays there
    assert serial  # at 2 calls in flight the windows serialise (at 1 there is nothing to tell)
    # the second second: the thread kept busy (>= 90 % of 500 calls)...
    assert len(latencies) >= 450
    # ...and an admitted call waits at most about one other call's work
    assert max(latencies) <= 0.0041


def test_a_call_dropped_late_ends_deadline_exceeded_and_is_not_resent():
    conn = ClientConn()
    resent = []
    conn.proto.on_shed = lambda entry, error: resent.append(entry)
    d = conn.proto.call(ASYNC, echo_pb2.EchoRequest(), timeout=5)
    (request,) = conn.sent()
    conn.proto.dataReceived(
        wire.encode_header(
            wire.RESPONSE,
            request.call_id,
            0,
            status=StatusCode.DEADLINE_EXCEEDED,
            message="deadline passed before it ran",
            metadata={wire.NOT_RUN_KEY: "late"},
        )
    )
    error = failure_of(d)
    assert error.code == StatusCode.DEADLINE_EXCEEDED and error.message.endswith("(not run)")
    assert not isinstance(error, NotSentError) and resent == []
