"""Server streams hedged (a hedgingPolicy): two providers in memory
(MemoryReactorClock, iosim) whose Count waits on a Deferred the test holds;
the hedge's timing, the winner, the loser's CANCEL reaching its provider,
non-fatal codes, ``retry=False``."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter

from testbed.echo_service import STREAMS
from testbed.protos import echo_pb2
from tests.helpers import failure_of, result, timers
from twisted_rpc import Client, Service, StatusCode, UnavailableError
from twisted_rpc.server import Dispatcher, ServerFactory

SERVICE = "mprpc.test.StreamService"
HEDGED = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "hedgingPolicy": {
                "maxAttempts": 2,
                "hedgingDelay": "0.5s",
                "nonFatalStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


class Held(Service, descriptor=STREAMS):
    """Count waits on a Deferred in ``waiting`` (fired with a status code:
    0 replies ``count`` times, else fails with it); a cancel is counted.
    Sum fails UNAVAILABLE its first ``fails`` streams."""

    def __init__(self, fails=0):
        self.waiting = []
        self.cancelled = 0
        self.fails = fails
        self.sums = 0

    async def Count(self, request, context):
        def cancel(d):
            self.cancelled += 1

        d = Deferred(cancel)
        self.waiting.append(d)
        code = await d
        if code:
            raise UnavailableError(message="down")
        for n in range(request.count):
            yield echo_pb2.EchoReply(call_id=n)

    async def Sum(self, requests, context):
        self.sums += 1
        got = [request async for request in requests]
        if self.fails:
            self.fails -= 1
            raise UnavailableError(message="down")
        return echo_pb2.EchoReply(call_id=len(got))

    async def Chat(self, requests, context):
        yield echo_pb2.EchoReply()

    def Ends(self, request, context):
        return echo_pb2.EchoReply()


class Providers:
    def __init__(self, fails=(0, 0), **client_kw):
        self.reactor = MemoryReactorClock()
        self.services = [Held(fails[0]), Held(fails[1])]
        for port, service in zip((1001, 1002), self.services, strict=True):
            factory = ServerFactory(Dispatcher([service]), self.reactor)
            self.reactor.listenTCP(port, factory, interface="127.0.0.1")
        self.client = Client(
            self.reactor,
            providers={SERVICE: ["127.0.0.1:1001", "127.0.0.1:1002"]},
            consecutive_failures=0,
            service_config=HEDGED,
            **client_kw,
        )
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps = []
        self.proxy = self.client.proxy(STREAMS)

    def flush(self):
        for _ in range(10):
            while (pump := self.completer.succeedOnce()) is not None:
                self.pumps.append(pump)
            for pump in self.pumps:
                pump.flush()

    def waiting(self):
        return [len(s.waiting) for s in self.services]


def _all(stream):
    got = []
    while (reply := result(stream.read())) is not None:
        got.append(reply.call_id)
    return got


def test_a_hedge_after_the_delay_the_first_reply_wins_the_loser_is_cancelled():
    p = Providers()
    stream = p.proxy.Count(echo_pb2.CountRequest(count=2))
    p.flush()
    assert sorted(p.waiting()) == [0, 1]
    p.reactor.advance(0.49)
    p.flush()
    assert sorted(p.waiting()) == [0, 1]
    p.reactor.advance(0.01)
    p.flush()
    assert p.waiting() == [1, 1]
    first, second = p.services
    second.waiting[0].callback(0)  # the hedge (or the first) answers
    p.flush()
    assert (first.cancelled, second.cancelled) == (1, 0)  # CANCEL reached the loser
    assert _all(stream) == [0, 1]
    assert stream.code == StatusCode.OK
    assert not timers(p.reactor)  # no hedge timer left


def test_a_reply_before_the_delay_sends_no_hedge():
    p = Providers()
    stream = p.proxy.Count(echo_pb2.CountRequest(count=1))
    p.flush()
    (held,) = [s for s in p.services if s.waiting]
    held.waiting[0].callback(0)
    p.flush()
    p.reactor.advance(5)
    p.flush()
    assert sum(p.waiting()) == 1
    assert _all(stream) == [0]


def test_a_non_fatal_code_hedges_at_once_and_the_last_names_the_attempts():
    p = Providers()
    stream = p.proxy.Count(echo_pb2.CountRequest(count=1))
    p.flush()
    (held,) = [s for s in p.services if s.waiting]
    held.waiting[0].callback(14)
    p.flush()
    assert p.waiting() == [1, 1]  # the hedge went at once, to the other
    (other,) = [s for s in p.services if s is not held]
    other.waiting[0].callback(14)
    p.flush()
    error = failure_of(stream.read())
    assert isinstance(error, UnavailableError)
    assert error.message == "down (2 attempts)"


def test_cancelling_a_hedged_stream_cancels_every_attempt():
    p = Providers()
    stream = p.proxy.Count(echo_pb2.CountRequest(count=1))
    p.flush()
    p.reactor.advance(0.5)
    p.flush()
    stream.cancel()
    p.flush()
    assert [s.cancelled for s in p.services] == [1, 1]
    assert stream.code == StatusCode.CANCELLED
    assert not timers(p.reactor)


def test_retry_false_turns_stream_hedging_off():
    p = Providers()
    stream = p.client.proxy(STREAMS, retry=False).Count(echo_pb2.CountRequest(count=1))
    p.flush()
    p.reactor.advance(5)
    p.flush()
    assert sum(p.waiting()) == 1
    assert stream.code is None


def test_a_client_stream_with_a_hedging_policy_is_retried_not_hedged():
    p = Providers(fails=(1, 1))
    stream = p.proxy.Sum([echo_pb2.EchoRequest(payload=b"a")])
    p.flush()
    assert sum(s.sums for s in p.services) == 2  # one after the other, at once
    error = failure_of(stream.response())
    assert error.message == "down (2 attempts)"
