"""Hedging: timing, the winner and the losers cancelled, non-fatal and fatal
codes, the deadline and the budget, with a Clock (fake channels), then two
providers in memory (the loser's CANCEL reaching its handler)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from tests.helpers import failure_of, result
from twisted_rpc import (
    CallContext,
    CancelledError,
    Client,
    DeadlineExceededError,
    InternalError,
    Service,
    StatusCode,
    UnavailableError,
)
from twisted_rpc.client import HedgingPolicy, NotSentError
from twisted_rpc.client._calls import ShedError
from twisted_rpc.client._retry import Retries, WindowBudget, send_with_retries
from twisted_rpc.core import MethodInfo
from twisted_rpc.server import Dispatcher, ServerFactory

METHOD = MethodInfo(
    "mprpc.test.EchoService",
    "Echo",
    b"mprpc.test.EchoService/Echo",
    echo_pb2.EchoRequest,
    echo_pb2.EchoReply,
)
POLICY = HedgingPolicy(3, 1.0, frozenset({StatusCode.UNAVAILABLE}))
REPLY = echo_pb2.EchoReply(payload=b"ok")


class HeldChannel:
    """Each call gets a Deferred the test fires; a cancelled one is noted."""

    def __init__(self, name):
        self.name = name
        self.calls = []  # (timeout, Deferred)
        self.cancelled = 0

    def call(self, method, request, timeout, metadata):
        def cancel(d):
            self.cancelled += 1
            d.errback(CancelledError(message="cancelled by the caller"))

        d = Deferred(cancel)
        self.calls.append((timeout, d))
        return d


class FirstFree:
    def pick(self, channels, exclude=()):
        return next((c for c in channels if c not in exclude), None)


class Budget:
    """A budget allowing ``allowed`` withdrawals, counting what it is told."""

    def __init__(self, allowed=10):
        self.allowed = allowed
        self.counts = {"deposit": 0, "succeeded": 0, "failed": 0, "withdraw": 0}

    def deposit(self):
        self.counts["deposit"] += 1

    def succeeded(self):
        self.counts["succeeded"] += 1

    def failed(self):
        self.counts["failed"] += 1

    def withdraw(self):
        self.counts["withdraw"] += 1
        if self.allowed <= 0:
            return False
        self.allowed -= 1
        return True


def hedge(clock, channels, budget=None, policy=POLICY, timeout=None, observer=None):
    retries = Retries(clock, None, budget or Budget(), find=lambda m: None)
    if observer is not None:
        retries.events.add(observer)
    return Deferred.fromCoroutine(
        send_with_retries(
            retries,
            lambda: channels,
            FirstFree(),
            channels[0],
            METHOD,
            echo_pb2.EchoRequest(),
            timeout,
            None,
            policy,
        )
    )


def three():
    return [HeldChannel("a"), HeldChannel("b"), HeldChannel("c")]


def test_no_hedge_before_the_delay_one_at_it_and_max_attempts_in_all():
    clock, channels = Clock(), three()
    d = hedge(clock, channels)
    clock.advance(0.999)
    assert [len(c.calls) for c in channels] == [1, 0, 0]
    clock.advance(0.001)
    assert [len(c.calls) for c in channels] == [1, 1, 0]
    clock.advance(1)
    assert [len(c.calls) for c in channels] == [1, 1, 1]
    clock.advance(10)
    assert [len(c.calls) for c in channels] == [1, 1, 1]  # maxAttempts in all
    assert not clock.getDelayedCalls()
    assert not d.called


def test_first_ok_wins_and_the_others_are_cancelled():
    clock, channels = Clock(), three()
    budget = Budget()
    d = hedge(clock, channels, budget)
    clock.advance(1)
    clock.advance(1)
    channels[1].calls[0][1].callback(REPLY)
    assert result(d) == REPLY
    assert [c.cancelled for c in channels] == [1, 0, 1]
    assert budget.counts == {"deposit": 1, "succeeded": 1, "failed": 0, "withdraw": 2}


def test_an_answer_before_the_delay_sends_no_hedge():
    clock, channels = Clock(), three()
    d = hedge(clock, channels)
    channels[0].calls[0][1].callback(REPLY)
    assert result(d) == REPLY
    assert not clock.getDelayedCalls()
    assert [len(c.calls) for c in channels] == [1, 0, 0]


def test_a_non_fatal_code_lets_the_others_go_on_and_hedges_at_once():
    clock, channels = Clock(), three()
    d = hedge(clock, channels)
    clock.advance(1)  # a and b in flight
    channels[0].calls[0][1].errback(UnavailableError(message="a down"))
    assert [len(c.calls) for c in channels] == [1, 1, 1]  # c at once, not at t=2
    assert not d.called
    channels[2].calls[0][1].callback(REPLY)
    assert result(d) == REPLY
    assert [c.cancelled for c in channels] == [0, 1, 0]


def test_non_fatal_codes_everywhere_fail_naming_the_attempts():
    clock, channels = Clock(), three()
    budget = Budget()
    d = hedge(clock, channels, budget)
    for i, channel in enumerate(channels):
        clock.advance(0 if i == 0 else 1)
        channel.calls[0][1].errback(UnavailableError(message=f"{channel.name} down"))
    error = failure_of(d)
    assert isinstance(error, UnavailableError)
    assert error.message == "c down (3 attempts)"
    assert budget.counts["failed"] == 3


def test_a_fatal_code_ends_the_call_and_cancels_the_rest():
    clock, channels = Clock(), three()
    d = hedge(clock, channels)
    clock.advance(1)
    channels[1].calls[0][1].errback(InternalError(message="b broke"))
    error = failure_of(d)
    assert isinstance(error, InternalError)
    assert error.message == "b broke (2 attempts)"
    assert [c.cancelled for c in channels] == [1, 0, 0]
    clock.advance(10)
    assert [len(c.calls) for c in channels] == [1, 1, 0]


def test_never_past_the_deadline():
    clock, channels = Clock(), three()
    d = hedge(clock, channels, timeout=1.5)
    clock.advance(1)
    assert [t for c in channels for t, _ in c.calls] == [1.5, 0.5]  # what is left
    assert not clock.getDelayedCalls()  # no hedge at t=2: past the deadline
    channels[0].calls[0][1].errback(DeadlineExceededError(message="deadline exceeded"))
    assert isinstance(failure_of(d), DeadlineExceededError)
    assert channels[1].cancelled == 1


def test_the_budget_bounds_hedges():
    clock, channels = Clock(), three()
    budget = Budget(allowed=1)
    d = hedge(clock, channels, budget)
    for _ in range(5):
        clock.advance(1)
    assert [len(c.calls) for c in channels] == [1, 1, 0]  # the second hedge refused
    channels[0].calls[0][1].errback(UnavailableError(message="a down"))
    channels[1].calls[0][1].errback(UnavailableError(message="b down"))
    assert failure_of(d).message == "b down (2 attempts; retry budget exhausted)"


def test_window_budget_counts_hedges():
    clock = Clock()
    budget = WindowBudget(clock, ratio=0.0, min_per_second=0.1, window=10)  # one retry in 10 s
    first, second = three(), three()
    hedge(clock, first, budget)
    hedge(clock, second, budget)
    clock.advance(1)
    assert [len(c.calls) for c in first + second] == [1, 1, 0, 1, 0, 0]


def test_a_call_never_written_goes_elsewhere_uncounted():
    clock = Clock()
    down, up = HeldChannel("down"), HeldChannel("up")
    down.call = lambda *a: fail(NotSentError(message="down"))
    d = hedge(clock, [down, up])
    up.calls[0][1].callback(REPLY)
    assert result(d) == REPLY


def test_cancelling_the_call_cancels_every_attempt():
    clock, channels = Clock(), three()
    d = hedge(clock, channels)
    clock.advance(1)
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    assert [c.cancelled for c in channels] == [1, 1, 0]
    assert not clock.getDelayedCalls()


# Two providers in memory: the loser's CANCEL reaches its handler.

HEDGED_ECHO = {
    "methodConfig": [
        {
            "name": [{"service": "mprpc.test.EchoService", "method": "AsyncEcho"}],
            "hedgingPolicy": {
                "maxAttempts": 2,
                "hedgingDelay": "0.5s",
                "nonFatalStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


class Held(Service, descriptor=ECHO):
    """AsyncEcho waits on a Deferred the test holds; a cancel is noted."""

    def __init__(self):
        self.waiting = []
        self.cancelled = 0

    def Echo(self, request, context):
        return echo_pb2.EchoReply()

    async def AsyncEcho(self, request: echo_pb2.EchoRequest, context: CallContext):
        def cancel(d):
            self.cancelled += 1

        d = Deferred(cancel)
        self.waiting.append(d)
        await d
        return echo_pb2.EchoReply(payload=request.payload)


class Providers:
    def __init__(self, **client_kw):
        self.reactor = MemoryReactorClock()
        self.services = {1001: Held(), 1002: Held()}
        for port, service in self.services.items():
            factory = ServerFactory(Dispatcher([service]), self.reactor)
            self.reactor.listenTCP(port, factory, interface="127.0.0.1")
        self.client = Client(
            self.reactor,
            providers={"mprpc.test.EchoService": ["127.0.0.1:1001", "127.0.0.1:1002"]},
            consecutive_failures=0,
            **client_kw,
        )
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps = []

    def flush(self):
        for _ in range(10):
            while (pump := self.completer.succeedOnce()) is not None:
                self.pumps.append(pump)
            for pump in self.pumps:
                pump.flush()


def test_the_losers_cancel_reaches_its_provider():
    p = Providers(service_config=HEDGED_ECHO)
    echo = p.client.proxy(ECHO)
    for _ in range(2):  # both connected
        assert result(_settled(p, p.client.proxy(ECHO, retry=False).Echo(echo_pb2.EchoRequest())))
    d = echo.AsyncEcho(echo_pb2.EchoRequest(payload=b"x"))
    p.flush()
    first, second = p.services.values()
    assert (len(first.waiting), len(second.waiting)) in {(1, 0), (0, 1)}
    p.reactor.advance(0.5)
    p.flush()
    assert (len(first.waiting), len(second.waiting)) == (1, 1)
    first.waiting[0].callback(None)
    p.flush()
    assert result(d).payload == b"x"
    assert (first.cancelled, second.cancelled) == (0, 1)


def test_retry_false_turns_hedging_off():
    p = Providers(service_config=HEDGED_ECHO)
    d = p.client.proxy(ECHO, retry=False).AsyncEcho(echo_pb2.EchoRequest())
    p.flush()
    p.reactor.advance(5)
    p.flush()
    assert sum(len(s.waiting) for s in p.services.values()) == 1
    assert not d.called


def _settled(p, d):
    p.flush()
    return d


def test_a_method_with_no_policy_stays_on_the_hot_path(monkeypatch):
    """No policy: Client.call sends straight to the channel, never reaching
    send_with_retries (nor hedging)."""
    from twisted_rpc.client import _client

    def reached(*args, **kw):
        raise AssertionError("the hot path went through send_with_retries")

    p = Providers(service_config=HEDGED_ECHO)
    warm = p.client.proxy(ECHO, retry=False).Echo(echo_pb2.EchoRequest())
    p.flush()
    assert result(warm) is not None
    result(_settled(p, p.client.proxy(ECHO).Echo(echo_pb2.EchoRequest())))  # memoized: no policy
    monkeypatch.setattr(_client, "send_with_retries", reached)
    for _ in range(4):
        assert result(_settled(p, p.client.proxy(ECHO).Echo(echo_pb2.EchoRequest()))) is not None


class Seen:
    """Records what hedging tells its observers."""

    def __init__(self):
        self.seen = []

    def __getattr__(self, event):
        return lambda *args: self.seen.append((event, *args))


def test_hedges_wins_and_losers_are_told_to_the_observers():
    clock, channels = Clock(), three()
    seen = Seen()
    d = hedge(clock, channels, observer=seen)
    clock.advance(1)
    clock.advance(1)
    channels[1].calls[0][1].callback(REPLY)  # the first hedge wins
    assert result(d) == REPLY
    name = METHOD.full_name
    assert seen.seen == [
        ("hedged", name),
        ("hedged", name),
        ("hedge_won", name),
        ("hedges_cancelled", name, 2),  # the first attempt and the second hedge
    ]
    seen.seen.clear()
    d = hedge(clock, channels, observer=seen)
    channels[0].calls[-1][1].callback(REPLY)  # the first attempt answers: nothing to tell
    assert result(d) == REPLY and seen.seen == []
    d = hedge(clock, channels, Budget(allowed=0), observer=seen)
    clock.advance(1)
    assert seen.seen == [("retry_refused", name)]
    channels[0].calls[-1][1].callback(REPLY)
    assert result(d) == REPLY


def test_a_shed_attempt_is_resent_only_as_the_budget_allows():
    clock = Clock()
    shedding, up = HeldChannel("shedding"), HeldChannel("up")
    shedding.call = lambda *a: fail(ShedError(message="shed (not run)"))
    budget = Budget(allowed=1)
    d = hedge(clock, [shedding, up], budget)
    up.calls[0][1].callback(REPLY)
    assert result(d) == REPLY and budget.counts["withdraw"] == 1
    d = hedge(clock, [shedding, up], budget)  # the budget is spent: not resent
    assert isinstance(failure_of(d), ShedError)
    assert len(up.calls) == 1
