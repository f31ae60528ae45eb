"""Streams retried before their first reply: two providers in memory
(MemoryReactorClock, iosim), a service config giving the stream methods a
retryPolicy; the attempts each provider saw, what was replayed, the budget,
the deadline, ``retry=False``."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter

from testbed.echo_service import STREAMS
from testbed.protos import echo_pb2
from tests.helpers import failure_of, result, timers
from twisted_rpc import Client, Service, StatusCode, UnavailableError
from twisted_rpc.client import _streams
from twisted_rpc.server import Dispatcher, ServerFactory

SERVICE = "mprpc.test.StreamService"
RETRIED = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "1s",
                "maxBackoff": "4s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


class Flaky(Service, descriptor=STREAMS):
    """Fails its next ``fails`` streams UNAVAILABLE: Count before its
    replies (after the first if tagged "late"), Sum and Chat once every
    request is read (each Sum's requests are kept in ``received``)."""

    def __init__(self, fails=0):
        self.fails = fails
        self.calls = 0
        self.received = []

    def _fail(self):
        if self.fails:
            self.fails -= 1
            raise UnavailableError(message="down")

    async def Count(self, request, context):
        self.calls += 1
        if request.tag == "late":
            yield echo_pb2.EchoReply(call_id=0)
        self._fail()
        for n in range(request.count):
            yield echo_pb2.EchoReply(call_id=n)

    async def Sum(self, requests, context):
        self.calls += 1
        got = []
        self.received.append(got)
        async for request in requests:
            got.append(request.payload)
        self._fail()
        return echo_pb2.EchoReply(call_id=len(got))

    async def Chat(self, requests, context):
        self.calls += 1
        got = [request.payload async for request in requests]
        self._fail()
        for payload in got:
            yield echo_pb2.EchoReply(payload=payload)

    def Ends(self, request, context):
        return echo_pb2.EchoReply()


class Providers:
    def __init__(self, fails=(0, 0), **client_kw):
        self.reactor = MemoryReactorClock()
        self.services = [Flaky(fails[0]), Flaky(fails[1])]
        for port, service in zip((1001, 1002), self.services, strict=True):
            factory = ServerFactory(Dispatcher([service]), self.reactor)
            self.reactor.listenTCP(port, factory, interface="127.0.0.1")
        client_kw.setdefault("service_config", RETRIED)
        self.client = Client(
            self.reactor,
            providers={SERVICE: ["127.0.0.1:1001", "127.0.0.1:1002"]},
            consecutive_failures=0,
            **client_kw,
        )
        self.client._retries.random = lambda: 1.0  # the backoff's ceiling, no jitter
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps = []
        self.proxy = self.client.proxy(STREAMS)

    def flush(self):
        for _ in range(10):
            while (pump := self.completer.succeedOnce()) is not None:
                self.pumps.append(pump)
            for pump in self.pumps:
                pump.flush()

    def calls(self):
        return [s.calls for s in self.services]


def _replies(stream):
    """The replies received so far (not the error after them)."""
    got = []
    while stream.inbox.messages:
        got.append(result(stream.read()).call_id)
    while stream.code == StatusCode.OK and (reply := result(stream.read())) is not None:
        got.append(reply.call_id)
    return got


def test_a_server_stream_failing_before_its_first_reply_is_retried_elsewhere():
    p = Providers(fails=(1, 1))
    stream = p.proxy.Count(echo_pb2.CountRequest(count=2))
    p.flush()
    assert sorted(p.calls()) == [0, 1]  # one attempt, then the backoff
    p.reactor.advance(0.99)
    p.flush()
    assert sorted(p.calls()) == [0, 1]
    p.reactor.advance(0.01)  # initialBackoff 1s
    p.flush()
    assert p.calls() == [1, 1]  # the other provider
    p.reactor.advance(2)  # then 2s (x2): the third attempt, which succeeds
    p.flush()
    assert sum(p.calls()) == 3
    assert _replies(stream) == [0, 1]
    assert stream.code == StatusCode.OK


def test_a_failure_after_the_first_reply_goes_to_the_caller():
    p = Providers(fails=(1, 1))
    stream = p.proxy.Count(echo_pb2.CountRequest(count=3, tag="late"))
    p.flush()
    p.reactor.advance(10)
    p.flush()
    assert sum(p.calls()) == 1
    assert _replies(stream) == [0]
    error = failure_of(stream.read())
    assert isinstance(error, UnavailableError)
    assert error.message == "down"  # one attempt: no count in the message


def test_the_final_error_names_the_attempts():
    p = Providers(fails=(5, 5))
    stream = p.proxy.Count(echo_pb2.CountRequest(count=3))
    for _ in range(3):
        p.flush()
        p.reactor.advance(4)
    p.flush()
    assert sum(p.calls()) == 3  # maxAttempts
    error = failure_of(stream.read())
    assert isinstance(error, UnavailableError)
    assert error.message == "down (3 attempts)"


def test_a_client_streams_requests_are_replayed_with_its_end():
    p = Providers(fails=(1, 1))
    stream = p.proxy.Sum([echo_pb2.EchoRequest(payload=b"a"), echo_pb2.EchoRequest(payload=b"b")])
    p.flush()
    p.reactor.advance(1)
    p.flush()
    p.reactor.advance(2)
    p.flush()
    received = [r for s in p.services for r in s.received]
    assert received == [[b"a", b"b"]] * 3  # END_STREAM each time, or Sum would not end
    assert result(stream.response()).call_id == 2


def test_a_bidi_stream_written_by_hand_is_replayed_then_goes_on():
    p = Providers(fails=(1, 1))
    p.client._retries.random = lambda: 0.0  # retried at once
    stream = p.proxy.Chat()
    stream.write(echo_pb2.EchoRequest(payload=b"1"))
    p.flush()
    stream.write(echo_pb2.EchoRequest(payload=b"2"))
    stream.done_writing()
    p.flush()
    assert sum(p.calls()) == 3
    replies = []
    while (reply := result(stream.read())) is not None:
        replies.append(reply.payload)
    assert replies == [b"1", b"2"]
    assert stream.code == StatusCode.OK


def test_past_the_retry_buffer_a_stream_is_committed(monkeypatch):
    monkeypatch.setattr(_streams, "RETRY_BUFFER", 15)
    p = Providers(fails=(1, 1))
    stream = p.proxy.Sum([echo_pb2.EchoRequest(payload=b"x" * 6) for _ in range(2)])
    p.flush()
    p.reactor.advance(10)
    p.flush()
    assert sum(p.calls()) == 1
    error = failure_of(stream.response())
    assert isinstance(error, UnavailableError) and error.message == "down"


def test_within_the_buffer_it_is_not(monkeypatch):
    monkeypatch.setattr(_streams, "RETRY_BUFFER", 16)  # two requests of 8 bytes
    p = Providers(fails=(1, 1))
    stream = p.proxy.Sum([echo_pb2.EchoRequest(payload=b"x" * 6) for _ in range(2)])
    p.flush()
    p.reactor.advance(1)
    p.flush()
    p.reactor.advance(2)
    p.flush()
    assert sum(p.calls()) == 3
    assert result(stream.response()).call_id == 2


def test_the_retry_budget_bounds_stream_retries():
    config = {**RETRIED, "retryThrottling": {"maxTokens": 2, "tokenRatio": 0.1}}
    p = Providers(fails=(5, 5), service_config=config)
    stream = p.proxy.Count(echo_pb2.CountRequest(count=1))
    p.flush()
    p.reactor.advance(10)
    p.flush()
    assert sum(p.calls()) == 1
    error = failure_of(stream.read())
    assert error.message == "down (1 attempt; retry budget exhausted)"


def test_never_retried_past_the_deadline():
    p = Providers(fails=(5, 5))
    stream = p.proxy.Count(echo_pb2.CountRequest(count=1), timeout=0.5)
    p.flush()
    p.reactor.advance(1)
    p.flush()
    assert sum(p.calls()) == 1
    error = failure_of(stream.read())
    assert error.message == "down (1 attempt; no time left to retry)"


def test_retry_false_turns_stream_retries_off():
    p = Providers(fails=(5, 5))
    stream = p.client.proxy(STREAMS, retry=False).Count(echo_pb2.CountRequest(count=1))
    p.flush()
    p.reactor.advance(10)
    p.flush()
    assert sum(p.calls()) == 1
    assert isinstance(failure_of(stream.read()), UnavailableError)


def test_cancelled_during_the_backoff_no_attempt_follows():
    p = Providers(fails=(5, 5))
    stream = p.proxy.Count(echo_pb2.CountRequest(count=1))
    p.flush()
    stream.cancel()
    p.reactor.advance(10)
    p.flush()
    assert sum(p.calls()) == 1
    assert stream.code == StatusCode.CANCELLED
    assert not timers(p.reactor)


class _Seen:
    """Records what the client's retries tell their observers (the metrics)."""

    def __init__(self):
        self.seen = []

    def __getattr__(self, event):
        return lambda *args: self.seen.append((event, *args))


def test_stream_retries_and_refusals_are_told_to_the_observers():
    p = Providers(fails=(1, 1))
    seen = _Seen()
    p.client._retries.events.add(seen)
    stream = p.proxy.Count(echo_pb2.CountRequest(count=1))
    p.flush()
    for _ in range(3):
        p.reactor.advance(2)
        p.flush()
    assert stream.code == StatusCode.OK
    name = "mprpc.test.StreamService/Count"
    assert [e for e in seen.seen if e[0] == "retried"] == [
        ("retried", name, StatusCode.UNAVAILABLE)
    ] * 2
    config = {**RETRIED, "retryThrottling": {"maxTokens": 2, "tokenRatio": 0.1}}
    p = Providers(fails=(5, 5), service_config=config)
    seen = _Seen()
    p.client._retries.events.add(seen)
    p.proxy.Count(echo_pb2.CountRequest(count=1))
    p.flush()
    assert seen.seen == [("retry_refused", name)]
