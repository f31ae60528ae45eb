"""Outlier ejection (failure accrual, the Health probe, the cap) and peak-EWMA balancing."""

from __future__ import annotations

import random

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import TwoProviders, result
from twisted_rpc import (
    ClientOptions,
    FunctionInterceptor,
    LeastOutstanding,
    RoundRobin,
    UnavailableError,
)
from twisted_rpc.client import ChannelState, ClientConnection
from twisted_rpc.client._balancer import EJECTED, held_out
from twisted_rpc.client._outliers import (
    AccruingConnection,
    FailureAccrual,
    PeakEwma,
    SuccessRates,
)
from twisted_rpc.core import StatusCode, UnimplementedError


@pytest.fixture(autouse=True)
def _no_ejections_left():
    yield
    EJECTED.clear()  # the process-wide set: one test's ejections never leak into another


class _Address:
    weight = 100


class FakeChannel:
    """What a FailureAccrual and a balancer see of a channel; probes are kept."""

    def __init__(
        self, clock: Clock, name: str = "a", dials: object = None, **options: object
    ) -> None:
        self._dials = dials  # the client's dial queue: its channels are peers
        self.name = name
        self.clock = clock
        self.options = ClientOptions(**options)  # type: ignore[arg-type]
        self.address = _Address()
        self.state = ChannelState.READY
        self.ready = self.usable = True
        self.dialling = False
        self.load = 0
        self.protocol: object = None
        self.latency: PeakEwma | None = None
        self.probes: list[tuple[object, object, Deferred[object]]] = []
        self.accrual = FailureAccrual(self, random.Random(17))  # type: ignore[arg-type]

    def call(self, method, request, timeout, metadata):
        d: Deferred[object] = Deferred()
        self.probes.append((method, request, d))
        return d

    def __repr__(self) -> str:
        return f"<FakeChannel {self.name}>"


class FakeConnection:
    """What a FailureAccrual reads of a connection: calls sent, and in flight."""

    def __init__(self) -> None:
        self._next_id = 1
        self.outstanding: dict[int, object] = {}
        self.streams: dict[int, object] = {}


def _fail(accrual: FailureAccrual, code: int, times: int = 1, conn=None) -> FakeConnection:
    conn = conn or getattr(accrual, "_fake", None) or FakeConnection()
    accrual._fake = conn  # type: ignore[attr-defined]
    for _ in range(times):
        conn._next_id += 1  # sent, and answered with ``code``
        accrual.record(conn, code)
    return conn


def _succeed(accrual: FailureAccrual) -> None:
    conn = getattr(accrual, "_fake", None) or FakeConnection()
    accrual._fake = conn  # type: ignore[attr-defined]
    conn._next_id += 1  # sent and answered OK: the accrual is not told


UNAVAILABLE, INTERNAL, DEADLINE = (
    StatusCode.UNAVAILABLE,
    StatusCode.INTERNAL,
    StatusCode.DEADLINE_EXCEEDED,
)


def _serving(value: int = 1) -> object:
    from google.protobuf.wrappers_pb2 import Int32Value

    return Int32Value(value=value)


def test_ejected_after_consecutive_failures_only():
    channel = FakeChannel(Clock())
    accrual = channel.accrual
    _fail(accrual, UNAVAILABLE, 4)
    _succeed(accrual)  # a success ends the run, though the accrual is not told of it
    _fail(accrual, INTERNAL, 4)
    _fail(accrual, StatusCode.INVALID_ARGUMENT)  # the provider answered: the run ends
    assert not accrual.ejected and accrual.failures == 0
    _fail(accrual, DEADLINE, 4)
    _fail(accrual, UNAVAILABLE, conn=FakeConnection())  # another connection: a new run
    assert not accrual.ejected and accrual.failures == 1
    _fail(accrual, UNAVAILABLE, 4)
    assert accrual.ejected and EJECTED == {channel: accrual}


def test_ejection_period_grows_doubling_to_the_cap():
    clock = Clock()
    channel = FakeChannel(clock, base_ejection_time=30.0, max_ejection_time=100.0)
    accrual = channel.accrual
    _fail(accrual, UNAVAILABLE, 5)
    periods = []
    for _ in range(4):
        (timer,) = clock.getDelayedCalls()
        periods.append(timer.getTime() - clock.seconds())
        clock.advance(timer.getTime() - clock.seconds())
        _, _, probe = channel.probes[-1]
        probe.errback(UnavailableError(message="still down"))  # stays out, longer
    assert 27 <= periods[0] <= 33
    assert 54 <= periods[1] <= 66
    assert 90 <= periods[2] <= 110 and 90 <= periods[3] <= 110  # capped (+- 10 %)
    assert accrual.ejected and accrual.ejections == 5


def test_health_probe_gates_the_return():
    clock = Clock()
    channel = FakeChannel(clock, base_ejection_time=10.0)
    accrual = channel.accrual
    _fail(accrual, UNAVAILABLE, 5)
    clock.advance(9.0 - 0.1)
    assert channel.probes == []  # not probed before its period ends (10 s - 10 %)
    clock.advance(2.2)
    method, request, probe = channel.probes[0]
    assert method.route == b"mprpc.health.v1.Health/Check" and request.value == ""
    probe.callback(_serving(2))  # NOT_SERVING: still out
    assert accrual.ejected and channel in EJECTED
    clock.advance(25.0)
    _, _, probe = channel.probes[1]
    probe.callback(_serving(1))  # SERVING: back
    assert not accrual.ejected and channel not in EJECTED and accrual.failures == 0
    assert clock.getDelayedCalls() == []


def test_outcomes_while_ejected_are_not_counted_and_close_stops_probing():
    clock = Clock()
    channel = FakeChannel(clock)
    accrual = channel.accrual
    _fail(accrual, UNAVAILABLE, 5)
    _fail(accrual, UNAVAILABLE, 20)  # calls still in flight when it was ejected
    assert accrual.ejections == 1
    channel.state = ChannelState.CLOSED
    clock.advance(40.0)  # the period ends on a closed channel: no probe
    assert channel.probes == [] and channel not in EJECTED
    accrual.stop()
    assert clock.getDelayedCalls() == []


def test_provider_without_health_service_returns_when_it_answers():
    clock = Clock()
    channel = FakeChannel(clock)
    _fail(channel.accrual, UNAVAILABLE, 5)
    clock.advance(40.0)
    channel.probes[0][2].errback(UnimplementedError(message="no Health"))
    assert not channel.accrual.ejected


def test_at_most_max_ejection_percent_out_first_ejected_kept():
    clock = Clock()
    channels = [FakeChannel(clock, name) for name in "abcd"]
    for channel in channels[:3]:  # a, b, c ejected in that order
        _fail(channel.accrual, UNAVAILABLE, 5)
        clock.advance(1.0)
    assert held_out(channels, ()) == (channels[0], channels[1])  # 50 % of 4
    balancer = RoundRobin()
    picked = {balancer.pick(channels).name for _ in range(12)}
    assert picked == {"c", "d"}
    assert balancer.pick(channels, [channels[2], channels[3]]) is None
    # A service's only provider is never left out at 50 %.
    assert RoundRobin().pick(channels[:1]) is channels[0]
    assert LeastOutstanding(random.Random(1)).pick(channels[:2]) is not None


def test_peak_ewma_jumps_to_a_slow_sample_and_decays():
    clock = Clock()
    ewma = PeakEwma(clock, decay=10.0)
    ewma.observe(0.010)
    assert ewma.value() == pytest.approx(0.010)
    clock.advance(1.0)
    ewma.observe(0.500)  # slower: counts at once
    assert ewma.value() == pytest.approx(0.500)
    clock.advance(1.0)
    ewma.observe(0.010)  # faster: pulls it down by the elapsed time's share only
    assert 0.4 < ewma.value() < 0.5
    clock.advance(30.0)  # no samples: it decays towards 0, so the provider is tried again
    assert ewma.value() < 0.03
    assert ewma.cost(0) == pytest.approx(ewma.value())
    assert PeakEwma(clock, 10.0).cost(0) == 0.0  # never measured, idle: tried first
    assert PeakEwma(clock, 10.0).cost(2) > 1e5  # never measured and busy: penalised


def test_least_outstanding_prefers_the_fast_provider_and_reacts_at_once():
    clock = Clock()
    fast, slow = FakeChannel(clock, "fast"), FakeChannel(clock, "slow")
    for channel, rtt in ((fast, 0.010), (slow, 0.050)):
        channel.latency = PeakEwma(clock, 10.0)
        channel.latency.observe(rtt)
    fast.load = 3  # 0.01 * 4 < 0.05 * 1: still the fast one, though busier
    balancer = LeastOutstanding(random.Random(5))
    assert {balancer.pick([fast, slow]).name for _ in range(20)} == {"fast"}
    fast.latency.observe(0.400)  # one slow answer: the fast one is avoided at once
    assert {balancer.pick([fast, slow]).name for _ in range(20)} == {"slow"}


def test_client_ejects_a_failing_provider_and_probes_it_back():
    failing = {"on": True}
    two = TwoProviders(consecutive_failures=3, base_ejection_time=10.0)

    def refuse(request, context, proceed):
        if failing["on"]:
            raise UnavailableError(message="1001 is sick")
        return proceed(request, context)

    sick = two.factories[1001].dispatcher  # interceptors apply to services added after them
    sick.interceptors.insert(0, FunctionInterceptor(refuse))
    sick.services.clear()
    sick.routes.clear()
    sick.add(EchoService())
    echo = two.client.proxy(ECHO)
    first = echo.Echo(echo_pb2.EchoRequest())  # waits for 1001's connection
    two.connect_all()
    outcomes = [result_or_failure(first)]
    for _ in range(20):  # one at a time, as answers come
        d = echo.Echo(echo_pb2.EchoRequest())
        two.flush()
        outcomes.append(result_or_failure(d))
    failed = [o for o in outcomes if isinstance(o, Failure)]
    assert len(failed) == 3  # the run that ejected it: then every call goes to 1002
    assert two.served[1002] == 18
    channel = next(c for c in two.client.channels.values() if c.address.port == 1001)
    assert isinstance(channel.protocol, AccruingConnection) and channel.accrual.ejected
    failing["on"] = False
    two.reactor.advance(12.0)  # period over: probed (this provider serves no Health)
    two.flush()
    assert not channel.accrual.ejected
    later = [echo.Echo(echo_pb2.EchoRequest()) for _ in range(4)]
    two.flush()
    assert all(result(d) for d in later)
    assert two.served[1001] >= 2


def result_or_failure(d: Deferred[object]) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    return out[0] if out else None


def test_default_balancer_does_not_time_calls():
    two = TwoProviders()
    echo = two.client.proxy(ECHO)
    echo.Echo(echo_pb2.EchoRequest())
    channel = next(iter(two.client.channels.values()))
    assert channel.latency is None and channel._watch is None and channel.accrual is not None
    timed = TwoProviders(balancer="least_outstanding", consecutive_failures=0)
    d = timed.client.proxy(ECHO).Echo(echo_pb2.EchoRequest())
    timed.connect_all()
    assert result(d) is not None
    channel = next(iter(timed.client.channels.values()))
    assert channel.latency is not None and channel.accrual is None
    assert type(channel.protocol) is ClientConnection  # ejection off: a plain connection
    d = timed.client.proxy(ECHO).Echo(echo_pb2.EchoRequest())
    timed.reactor.advance(0.2)  # the answer takes 0.2 s
    timed.flush()
    assert result(d) is not None
    ewmas = sorted(c.latency.ewma for c in timed.client.channels.values())
    assert ewmas == [0.0, pytest.approx(0.2)]


def test_a_shed_answer_is_not_counted_as_a_failure():
    """An answer marked not run (the provider shed it) says nothing of the
    provider's health: it is not a failure in a row."""
    from twisted.internet.task import Clock

    from twisted_rpc.core import _codec as wire

    recorded: list[int] = []
    shed: list[str] = []

    class Accrual:
        peers = SuccessRates()
        channel = FakeChannel(Clock(), "p")

        def record(self, connection, status, n=1):
            recorded.append(status)

    class Observer:
        def call_shed(self, provider):
            shed.append(provider)

    observer = Observer()  # held weakly by the events: kept here
    Accrual.peers.events.add(observer)

    conn = AccruingConnection(Accrual(), Clock(), ClientOptions(), lambda *a: None, lambda *a: None)
    d1, d2 = Deferred(), Deferred()
    d1.addErrback(lambda f: None)
    d2.addErrback(lambda f: None)
    conn._call_failed((d1,), StatusCode.RESOURCE_EXHAUSTED, "shed", {wire.NOT_RUN_KEY: "shed"})
    conn._call_failed((d2,), StatusCode.UNAVAILABLE, "down", None)
    assert recorded == [StatusCode.UNAVAILABLE]
    assert shed == [str(Accrual.channel.address)]  # told to the metrics, as shed


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"consecutive_failures": -1}, ValueError),
        ({"consecutive_failures": 2.5}, TypeError),
        ({"base_ejection_time": 0}, ValueError),
        ({"base_ejection_time": 60, "max_ejection_time": 30}, ValueError),
        ({"max_ejection_percent": 101}, ValueError),
        ({"max_ejection_percent": True}, TypeError),
        ({"latency_decay": float("nan")}, ValueError),
        ({"success_rate_min_calls": -1}, ValueError),
        ({"success_rate_min_providers": 1}, ValueError),
        ({"success_rate_ratio": 0}, ValueError),
        ({"success_rate_ratio": 1.5}, ValueError),
        ({"success_rate_window": 0}, ValueError),
    ],
)
def test_ejection_settings_are_checked(changes, error):
    with pytest.raises(error):
        ClientOptions(**changes)
    assert (
        ClientOptions(consecutive_failures=0, max_ejection_percent=100).max_ejection_percent == 100
    )


# ---------------------------------------------------------------- success rate


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def ejected(self, provider):
        self.seen.append(("ejected", provider))

    def returned(self, provider):
        self.seen.append(("returned", provider))


def _peers(clock: Clock, n: int = 3, **options: object) -> list[FakeChannel]:
    """``n`` channels of one client, each with its connection."""
    dials = object.__new__(type("Dials", (), {}))  # any weak-referenceable key
    channels = [FakeChannel(clock, name, dials, **options) for name in "abcdef"[:n]]
    for channel in channels:
        channel.protocol = channel.accrual._fake = FakeConnection()  # type: ignore[attr-defined]
        channel.address = f"{channel.name}:1"  # type: ignore[assignment]
    channels[0]._keep = dials  # type: ignore[attr-defined]
    return channels


def _calls(channel: FakeChannel, calls: int, failing: int) -> None:
    """``calls`` calls, ``failing`` of them UNAVAILABLE, never 3 in a row."""
    failures = {round(i * calls / failing) for i in range(failing)} if failing else set()
    for i in range(calls):
        if i in failures:
            _fail(channel.accrual, UNAVAILABLE)
        else:
            _succeed(channel.accrual)


def test_a_provider_well_below_its_peers_success_rate_is_ejected_then_probed():
    clock = Clock()
    a, b, c = _peers(clock)
    seen = _Recorder()
    a.accrual.peers.events.add(seen)
    for _ in range(10):  # 100 calls each over 10 s: a succeeds 70 %
        _calls(a, 10, 3)
        _calls(b, 10, 0)
        _calls(c, 10, 0)
        clock.advance(1)
    assert not a.accrual.ejected  # no run of 5 failures in a row
    _fail(a.accrual, UNAVAILABLE)  # a failure after the window: the rates are compared
    assert a.accrual.ejected and not b.accrual.ejected and not c.accrual.ejected
    assert set(EJECTED) == {a}
    assert seen.seen == [("ejected", "a:1")]
    assert (a.accrual.window_failures, b.accrual.window_calls()) == (0, 0)  # a new window
    clock.advance(35)  # the same growing period, then the same Health probe
    ((_, _, probe),) = a.probes
    probe.callback(_serving())
    assert not a.accrual.ejected and not EJECTED
    assert seen.seen == [("ejected", "a:1"), ("returned", "a:1")]


def test_none_is_ejected_when_all_fail_alike():
    clock = Clock()
    channels = _peers(clock)
    for _ in range(3):
        for channel in channels:
            _calls(channel, 200, 60)  # 70 % each
        clock.advance(10)
    for channel in channels:
        _fail(channel.accrual, UNAVAILABLE)
    assert not EJECTED
    assert channels[0].accrual.peers.started == clock.seconds()  # they were compared


def test_too_little_volume_or_too_few_providers_ejects_none():
    clock = Clock()
    a, b, c = _peers(clock)
    _calls(a, 90, 45)  # under success_rate_min_calls (100)
    _calls(b, 200, 0)
    _calls(c, 200, 0)
    clock.advance(10)
    _fail(a.accrual, UNAVAILABLE)
    assert not EJECTED
    two = _peers(clock, 2)  # enough calls, but two providers (min 3)
    _calls(two[0], 200, 100)
    _calls(two[1], 200, 0)
    clock.advance(10)
    _fail(two[0].accrual, UNAVAILABLE)
    assert not EJECTED
    off = _peers(clock, 3, success_rate_min_calls=0)  # turned off
    _calls(off[0], 200, 100)
    _calls(off[1], 200, 0)
    _calls(off[2], 200, 0)
    clock.advance(10)
    _fail(off[0].accrual, UNAVAILABLE)
    assert not EJECTED
    lower = _peers(clock, 2, success_rate_min_providers=2, success_rate_min_calls=50)
    _calls(lower[0], 60, 30)
    _calls(lower[1], 60, 0)
    clock.advance(10)
    _fail(lower[0].accrual, UNAVAILABLE)
    assert set(EJECTED) == {lower[0]}  # with the thresholds lowered, the same rule ejects


def test_success_rate_ejection_respects_the_cap():
    clock = Clock()
    channels = _peers(clock, 4, max_ejection_percent=25)
    for channel in channels[:2]:
        _calls(channel, 100, 50)
    for channel in channels[2:]:
        _calls(channel, 100, 0)
    clock.advance(10)
    _fail(channels[0].accrual, UNAVAILABLE)
    assert channels[0].accrual.ejected and channels[1].accrual.ejected  # both well below
    assert held_out(channels, ()) == (channels[0],)  # 25 % of 4: one kept out, the first


def test_calls_on_a_new_connection_count_in_the_window():
    clock = Clock()
    a, b, c = _peers(clock)
    _calls(a, 60, 18)  # read off the connection its failures came on
    a.protocol = a.accrual._fake = FakeConnection()  # type: ignore[attr-defined]
    _calls(a, 60, 18)
    _calls(b, 120, 0)
    _calls(c, 120, 0)
    assert a.accrual.window_calls() == 120 and a.accrual.window_failures == 36
    clock.advance(10)
    _fail(a.accrual, UNAVAILABLE)
    assert set(EJECTED) == {a}
