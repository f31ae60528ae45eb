"""Balancers, passive health and failover, with two providers in memory."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from tests.helpers import TwoProviders, failure_of, result
from twisted_rpc import (
    Client,
    LeastOutstanding,
    RoundRobin,
    UnavailableError,
    WeightedRandom,
    balancer_named,
)

SERVICE = "mprpc.test.EchoService"


def test_round_robin_alternates():
    two = TwoProviders()
    echo = two.client.proxy(ECHO)
    echo.Echo(echo_pb2.EchoRequest())  # dials both providers
    two.connect_all()
    ds = [echo.Echo(echo_pb2.EchoRequest()) for _ in range(10)]
    two.flush()
    assert all(result(d) for d in ds)
    assert two.served == {1001: 6, 1002: 5}


def test_unreachable_provider_is_skipped_at_once():
    two = TwoProviders()
    echo = two.client.proxy(ECHO)
    waiting = [echo.Echo(echo_pb2.EchoRequest(payload=b"%d" % i)) for i in range(6)]
    two.completer.failOnce(Failure(ConnectionRefusedError()))  # 1001 refuses
    two.connect_all()  # 1002 accepts
    assert [result(d).payload for d in waiting] == [b"%d" % i for i in range(6)]
    assert two.served == {1001: 0, 1002: 6}
    later = [echo.Echo(echo_pb2.EchoRequest()) for _ in range(4)]
    two.flush()
    assert all(result(d) for d in later)
    assert two.served[1001] == 0


def test_call_in_flight_fails_unless_idempotent():
    two = TwoProviders()
    plain = two.client.proxy(ECHO)
    retried = two.client.proxy(ECHO, idempotent={"AsyncEcho"})
    plain.Echo(echo_pb2.EchoRequest())
    two.connect_all()
    d1 = plain.AsyncEcho(echo_pb2.EchoRequest(delay=5))  # goes to 1002 (1001 took the first)
    d2 = retried.AsyncEcho(echo_pb2.EchoRequest(payload=b"again", delay=5))  # to 1001
    two.flush()
    assert two.served == {1001: 2, 1002: 1}
    to_1001, to_1002 = two.pumps
    to_1002.serverIO.loseConnection()
    two.flush()
    assert isinstance(failure_of(d1), UnavailableError)  # not idempotent: fails
    to_1001.serverIO.loseConnection()
    two.flush()
    assert not d2.called  # idempotent: retried on 1002, which is being re-dialled
    two.connect_all()
    two.reactor.advance(5)
    two.flush()
    assert result(d2).payload == b"again"
    assert two.served == {1001: 2, 1002: 2}


def test_retry_needs_another_provider_within_the_deadline():
    two = TwoProviders()
    retried = two.client.proxy(ECHO, idempotent=True)
    retried.Echo(echo_pb2.EchoRequest())
    two.connect_all()
    d = retried.AsyncEcho(echo_pb2.EchoRequest(delay=5), timeout=1)
    two.flush()
    two.reactor.advance(1.5)
    two.flush()
    assert failure_of(d).code == 4  # DEADLINE_EXCEEDED, no retry after the deadline


def test_unknown_idempotent_method_is_refused():
    two = TwoProviders()
    with pytest.raises(ValueError, match="no method Nope"):
        two.client.proxy(ECHO, idempotent={"Nope"})


def test_unknown_balancer_is_refused():
    with pytest.raises(ValueError, match="unknown balancer"):
        Client(MemoryReactorClock(), providers={}, balancer="fastest")
    assert balancer_named("least_outstanding") is LeastOutstanding


# ------------------------------------------------------------------ balancers alone


@dataclass(eq=False)
class FakeChannel:
    name: str
    weight: int = 100
    load: int = 0
    state: str = "ready"  # ready, dialling, idle or down

    @property
    def address(self):
        return self

    @property
    def ready(self):
        return self.state == "ready"

    @property
    def dialling(self):
        return self.state == "dialling"

    @property
    def usable(self):
        return self.state != "down"


def test_round_robin_skips_unusable_and_excluded():
    a, b, c = FakeChannel("a"), FakeChannel("b", state="down"), FakeChannel("c")
    rr = RoundRobin()
    assert [rr.pick([a, b, c]).name for _ in range(4)] == ["a", "c", "a", "c"]
    assert rr.pick([a, b, c], exclude=[a, c]) is b  # only the unusable one is left
    assert rr.pick([a], exclude=[a]) is None


def test_weighted_random_follows_weights():
    light, heavy = FakeChannel("light", weight=1), FakeChannel("heavy", weight=3)
    balancer = WeightedRandom(random.Random(7))
    picks = [balancer.pick([light, heavy]).name for _ in range(4000)]
    share = picks.count("heavy") / len(picks)
    assert 0.72 < share < 0.78


def test_least_outstanding_prefers_the_idle_provider():
    busy, idle = FakeChannel("busy", load=50), FakeChannel("idle", load=1)
    balancer = LeastOutstanding(random.Random(1))
    assert {balancer.pick([busy, idle]).name for _ in range(50)} == {"idle"}
    down = FakeChannel("down", state="down")
    assert {balancer.pick([busy, down]).name for _ in range(20)} == {"busy"}


@pytest.mark.parametrize(
    "make",
    [
        RoundRobin,
        lambda: WeightedRandom(random.Random(3)),
        lambda: LeastOutstanding(random.Random(3)),
    ],
)
def test_every_balancer_prefers_proven_then_dialling_channels(make):
    # A channel not proven yet (a silent port still being pinged, say) takes
    # no call while a proven one exists; with none proven, calls wait on one
    # being dialled rather than dial another.
    balancer = make()
    ready, dialling, idle, down = (
        FakeChannel("ready"),
        FakeChannel("dialling", state="dialling"),
        FakeChannel("idle", state="idle"),
        FakeChannel("down", state="down"),
    )
    assert {balancer.pick([idle, dialling, ready, down]).name for _ in range(30)} == {"ready"}
    assert {balancer.pick([idle, dialling, down]).name for _ in range(30)} == {"dialling"}
    assert {balancer.pick([down, idle]).name for _ in range(30)} == {"idle"}
    assert balancer.pick([down, idle], exclude=[idle]) is down


def test_a_ready_channel_takes_calls_straight_to_its_connection_unless_one_is_timed():
    """Channel.direct: the client's hot path skips Channel.call for a ready
    channel whose calls nothing watches; with least_outstanding each call is
    timed (its Deferred watched), so that path keeps Channel.call."""
    from testbed.echo_service import ECHO
    from testbed.protos import echo_pb2
    from tests.helpers import TwoProviders, result

    for balancer, direct in (("round_robin", True), ("least_outstanding", False)):
        two = TwoProviders(balancer=balancer)
        echo = two.client.proxy(ECHO)
        first = [echo.Echo(echo_pb2.EchoRequest(payload=b"x")) for _ in range(2)]  # dial both
        two.connect_all()
        assert all(result(d).payload == b"x" for d in first)
        channels = list(two.client.channels.values())
        assert all(c.protocol is not None for c in channels)
        assert all((c.direct is c.protocol) is direct for c in channels)
        calls = [echo.Echo(echo_pb2.EchoRequest(payload=b"%d" % i)) for i in range(4)]
        two.reactor.advance(0.01)  # (each call's latency: 10 ms)
        two.flush()
        assert [result(d).payload for d in calls] == [b"0", b"1", b"2", b"3"]
        assert two.served == {1001: 3, 1002: 3}
        if not direct:  # each call's latency was observed
            assert all(c.latency is not None and c.latency.ewma > 0 for c in channels)
        channels[0].protocol.transport.loseConnection()
        two.flush()
        assert channels[0].direct is None and channels[0].protocol is None
