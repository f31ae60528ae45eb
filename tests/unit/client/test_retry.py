"""Retries: policies, backoff, budgets, deadlines and the per-call opt-out,
with a Clock (fake channels) and two providers in memory."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from tests.helpers import TwoProviders, failure_of, result
from twisted_rpc import (
    ClientOptions,
    InternalError,
    ServiceConfig,
    StatusCode,
    UnavailableError,
)
from twisted_rpc.client import RetryPolicy, RetryThrottling
from twisted_rpc.client._calls import ShedError
from twisted_rpc.client._retry import (
    IDEMPOTENT_POLICY,
    Retries,
    TokenBucket,
    WindowBudget,
    descriptor_idempotent,
    send_with_retries,
)
from twisted_rpc.core import MethodInfo

METHOD = MethodInfo(
    "mprpc.test.EchoService",
    "Echo",
    b"mprpc.test.EchoService/Echo",
    echo_pb2.EchoRequest,
    echo_pb2.EchoReply,
)
POLICY = RetryPolicy(5, 0.1, 1.0, 2.0, frozenset({StatusCode.UNAVAILABLE}))


class FakeChannel:
    """Answers every call with ``answer`` (an exception class fails it)."""

    def __init__(self, name, answer=UnavailableError):
        self.name = name
        self.answer = answer
        self.calls = []

    def call(self, method, request, timeout, metadata):
        self.calls.append(timeout)
        if isinstance(self.answer, type):
            return fail(self.answer(message=f"{self.name} says no"))
        return succeed(self.answer)


class FirstFree:
    """Picks the first channel not excluded."""

    def pick(self, channels, exclude=()):
        return next((c for c in channels if c not in exclude), None)


def send(retries, channels, policy=POLICY, timeout=None):
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


def retries_with(clock, budget=None, jitter=1.0):
    retries = Retries(clock, None, budget or WindowBudget(clock))
    retries.random = lambda: jitter
    return retries


def test_backoff_is_exponential_capped_and_fully_jittered():
    retries = retries_with(Clock())
    assert [retries.backoff(POLICY, n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    retries.random = lambda: 0.25
    assert retries.backoff(POLICY, 3) == 0.1
    assert retries.backoff(IDEMPOTENT_POLICY, 1) == 0


def test_retry_goes_to_another_provider_after_backoff():
    clock = Clock()
    bad, good = FakeChannel("a"), FakeChannel("b", echo_pb2.EchoReply(payload=b"ok"))
    d = send(retries_with(clock), [bad, good])
    assert not d.called  # waiting 0.1 s of backoff
    clock.advance(0.1)
    assert result(d).payload == b"ok"
    assert len(bad.calls) == len(good.calls) == 1


def test_attempts_capped_and_counted_in_the_message():
    clock = Clock()
    only = FakeChannel("a")
    d = send(retries_with(clock), [only])
    clock.pump([1.0] * 10)
    error = failure_of(d)
    assert isinstance(error, UnavailableError)
    assert len(only.calls) == 5  # the same provider when there is no other
    assert error.message == "a says no (5 attempts)"


def test_codes_not_retryable_are_not_retried():
    clock = Clock()
    a, b = FakeChannel("a", InternalError), FakeChannel("b")
    error = failure_of(send(retries_with(clock), [a, b]))
    assert isinstance(error, InternalError) and error.message == "a says no"
    assert (len(a.calls), len(b.calls)) == (1, 0)


def test_no_retry_that_cannot_start_before_the_deadline():
    clock = Clock()
    a, b = FakeChannel("a"), FakeChannel("b")
    slow = RetryPolicy(3, 1.0, 1.0, 1.0, frozenset({StatusCode.UNAVAILABLE}))
    error = failure_of(send(retries_with(clock), [a, b], slow, timeout=0.5))
    assert "1 attempt; no time left to retry" in error.message
    assert len(b.calls) == 0
    d = send(retries_with(clock, jitter=0.3), [a, b], slow, timeout=0.5)
    clock.advance(0.3)
    failure_of(d)
    assert b.calls == [pytest.approx(0.2)]  # the retry carries what is left of the deadline


def test_cancelling_during_backoff_stops_the_retry():
    clock = Clock()
    a, b = FakeChannel("a"), FakeChannel("b")
    d = send(retries_with(clock), [a, b])
    d.cancel()
    assert failure_of(d).code == StatusCode.CANCELLED
    clock.advance(5)
    assert len(b.calls) == 0 and not clock.getDelayedCalls()


def test_window_budget_bounds_an_outage_to_1_2x_the_calls():
    clock = Clock()
    channels = [FakeChannel("a"), FakeChannel("b"), FakeChannel("c")]
    retries = retries_with(clock, jitter=0.0)
    ds = [send(retries, channels) for _ in range(1000)]
    errors = [failure_of(d) for d in ds]
    assert all(isinstance(e, UnavailableError) for e in errors)
    attempts = sum(len(c.calls) for c in channels)
    assert 1000 < attempts <= 1200
    assert sum("retry budget exhausted" in e.message for e in errors) >= 800


def test_window_budget_bounds_a_steady_stream_and_refills():
    clock = Clock()
    channels = [FakeChannel("a"), FakeChannel("b")]
    retries = retries_with(clock, jitter=0.0)
    for _ in range(100):  # 10 calls a second for 100 s
        for _ in range(10):
            failure_of(send(retries, channels))
        clock.advance(1)
    attempts = sum(len(c.calls) for c in channels)
    assert 1000 < attempts <= 1200


def test_window_budget_floor_lets_a_trickle_retry():
    clock = Clock()
    budget = WindowBudget(clock, ratio=0.2, min_per_second=1, window=10)
    budget.deposit()
    assert sum(budget.withdraw() for _ in range(20)) == 10  # 1/s over 10 s, not 20 % of 1
    clock.advance(10)
    assert budget.withdraw()  # the window moved on


def test_token_bucket_as_grpc_throttles():
    bucket = TokenBucket(RetryThrottling(max_tokens=10, token_ratio=0.5))
    assert bucket.withdraw()
    for _ in range(5):
        bucket.failed()
    assert not bucket.withdraw()  # 5 tokens: not more than half
    bucket.succeeded()
    assert bucket.withdraw()
    for _ in range(100):
        bucket.succeeded()
    assert bucket.tokens == 10


def test_token_bucket_bounds_an_outage():
    clock = Clock()
    channels = [FakeChannel("a"), FakeChannel("b")]
    bucket = TokenBucket(RetryThrottling(max_tokens=100, token_ratio=0.1))
    retries = retries_with(clock, bucket, jitter=0.0)
    ds = [send(retries, channels) for _ in range(1000)]
    assert all(isinstance(failure_of(d), UnavailableError) for d in ds)
    assert sum(len(c.calls) for c in channels) <= 1000 + 50


def test_descriptor_idempotency_level():
    proto = descriptor_pb2.FileDescriptorProto(name="retry_test.proto", package="rt")
    proto.message_type.add(name="M")
    service = proto.service.add(name="S")
    for name, level in [("Get", 1), ("Put", 2), ("Post", 0)]:
        method = service.method.add(name=name, input_type=".rt.M", output_type=".rt.M")
        if level:
            method.options.idempotency_level = level
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    found = {
        m: descriptor_idempotent(pool.FindMethodByName(f"rt.S.{m}")) for m in "Get Put Post".split()
    }
    assert found == {"Get": True, "Put": True, "Post": False}
    retries = Retries(
        Clock(), None, WindowBudget(Clock()), find=lambda m: pool.FindMethodByName("rt.S.Get")
    )
    assert retries.policy_for(METHOD, False) is IDEMPOTENT_POLICY


def test_policy_comes_from_the_service_config_else_idempotency():
    config = ServiceConfig.parse(
        {
            "methodConfig": [
                {
                    "name": [{"service": "mprpc.test.EchoService", "method": "Echo"}],
                    "retryPolicy": {
                        "maxAttempts": 3,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "INTERNAL"],
                    },
                }
            ]
        }
    )
    retries = Retries(Clock(), config, WindowBudget(Clock()))
    assert retries.policy_for(METHOD, False).max_attempts == 3
    other = MethodInfo(
        METHOD.service, "AsyncEcho", b"x/AsyncEcho", METHOD.request_class, METHOD.response_class
    )
    assert retries.policy_for(other, False) is None
    assert retries.policy_for(other, True) is IDEMPOTENT_POLICY
    assert retries.plain == {b"x/AsyncEcho"}


RETRY_ECHO = {
    "methodConfig": [
        {
            "name": [{"service": "mprpc.test.EchoService", "method": "Echo"}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def _connected(**kw):
    """Two providers, both connected (no ejections), their counts at 0."""
    two = TwoProviders(consecutive_failures=0, **kw)
    d = two.client.proxy(ECHO, retry=False).Echo(echo_pb2.EchoRequest())
    two.connect_all()
    assert result(d)
    for port in two.served:
        two.served[port] = 0
    return two


def _run(two, d):
    for _ in range(20):
        two.flush()
        two.reactor.advance(1)
    two.flush()
    return d


def test_client_retries_a_configured_method_across_providers():
    two = _connected(service_config=RETRY_ECHO)
    echo = two.client.proxy(ECHO)
    error = failure_of(
        _run(two, echo.Echo(echo_pb2.EchoRequest(fail_code=14, fail_message="down")))
    )
    assert isinstance(error, UnavailableError)
    assert error.message == "down (4 attempts)"
    assert two.served == {1001: 2, 1002: 2}


def test_client_call_can_turn_retries_off():
    two = _connected(service_config=RETRY_ECHO)
    request = echo_pb2.EchoRequest(fail_code=14, fail_message="down")
    once = two.client.proxy(ECHO, retry=False)
    assert failure_of(_run(two, once.Echo(request))).message == "down"
    assert failure_of(_run(two, two.client.call(METHOD, request, retry=False))).message == "down"
    assert sum(two.served.values()) == 2


def test_client_without_policy_sends_once():
    two = _connected()
    error = failure_of(_run(two, two.client.proxy(ECHO).Echo(echo_pb2.EchoRequest(fail_code=14))))
    assert isinstance(error, UnavailableError)
    assert sum(two.served.values()) == 1


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"retry_budget_ratio": -0.1}, ValueError),
        ({"retry_budget_min_per_second": "1"}, TypeError),
        ({"retry_budget_window": 0.5}, ValueError),
    ],
)
def test_budget_settings_are_checked(changes, error):
    with pytest.raises(error, match=next(iter(changes))):
        ClientOptions(**changes)


# ---------------------------------------------------------------- shed calls and events


class Events:
    """Records what the retries tell their observers."""

    def __init__(self):
        self.seen = []

    def __getattr__(self, event):
        return lambda *args: self.seen.append((event, *args))


def test_a_shed_call_goes_elsewhere_only_as_the_budget_allows():
    clock = Clock()
    shedding, up = FakeChannel("shedding", ShedError), FakeChannel("up", echo_pb2.EchoReply())
    retries = retries_with(clock, WindowBudget(clock, ratio=0.2, min_per_second=0.1, window=10))
    seen = Events()
    retries.events.add(seen)
    assert result(send(retries, [shedding, up], policy=None)) == echo_pb2.EchoReply()
    assert seen.seen == [("retried", METHOD.full_name, StatusCode.RESOURCE_EXHAUSTED)]
    # The floor (0.1/s over 10 s: one retry) is spent, and a call without a
    # policy is not counted: the next shed call is not resent.
    error = failure_of(send(retries, [shedding, up], policy=None))
    assert isinstance(error, ShedError)
    assert error.message.endswith("(1 attempt; retry budget exhausted)")
    assert (len(shedding.calls), len(up.calls)) == (2, 1)
    assert seen.seen[-1] == ("retry_refused", METHOD.full_name)


def test_a_fleet_wide_overload_is_not_multiplied_by_resending_shed_calls():
    clock = Clock()
    channels = [FakeChannel(name, ShedError) for name in "abc"]
    retries = retries_with(clock, jitter=0.0)  # the default window budget: 20 %
    ds = [send(retries, channels) for _ in range(1000)]
    errors = [failure_of(d) for d in ds]
    assert all(isinstance(e, ShedError) for e in errors)
    attempts = sum(len(c.calls) for c in channels)
    assert 1000 < attempts <= 1200  # without the budget: 3,000 (each provider once)


def test_retries_and_refusals_are_told_to_the_observers():
    clock = Clock()
    channels = [FakeChannel("a"), FakeChannel("b"), FakeChannel("c")]
    retries = retries_with(clock, TokenBucket(RetryThrottling(max_tokens=4, token_ratio=0.1)))
    seen = Events()
    retries.events.add(seen)
    d = send(retries, channels, timeout=10)
    clock.advance(1)  # the backoff (at most 0.1 s)
    error = failure_of(d)
    assert "retry budget exhausted" in error.message
    unavailable = StatusCode.UNAVAILABLE
    assert seen.seen == [
        ("retried", METHOD.full_name, unavailable),  # 4 tokens, 3 after the first failure
        ("retry_refused", METHOD.full_name),  # 2 left: not more than half
    ]
