"""Streams in operations, in memory with a Clock: metrics per method, the status
page's open streams, Health.WatchStream, and reflection of streaming methods."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred

from testbed.echo_service import STREAMS, EchoService, StreamService
from testbed.protos import echo_pb2
from twisted_rpc import (
    Client,
    NotFoundError,
    ResourceExhaustedError,
    RpcError,
    ServerLimits,
    StatusCode,
)
from twisted_rpc.ops import (
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    ProviderMetrics,
    RemoteDescriptors,
    message_class,
)
from twisted_rpc.ops._admin import render_status, status_data
from twisted_rpc.ops._protos import HEALTH, HealthCheckRequest, HealthWatchRequest
from twisted_rpc.testing import MemoryProvider

COUNT = echo_pb2.CountRequest
ADDRESS = f"127.0.0.1:{MemoryProvider.port}"


def served(builtins: bool = False, limits: ServerLimits | None = None):
    service = StreamService()
    memory = MemoryProvider([EchoService(), service], builtins=builtins, limits=limits)
    metrics = ProviderMetrics()
    memory.factory.observer = metrics
    metrics.watch_streams(memory.factory)
    return memory, metrics, service


def run(memory: MemoryProvider, coroutine: Any) -> Any:
    d = Deferred.fromCoroutine(coroutine)
    for _ in range(50):
        memory.flush()
        if d.called:
            break
    return memory.result(d)


def scraped(metrics: ProviderMetrics) -> dict[tuple, float]:
    """``{(sample name, sorted label items): value}`` as Prometheus would read them."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(method: str, code: str | None = None) -> tuple:
    items = [("method", method), ("service", "mprpc.test.StreamService")]
    if code is not None:
        items.insert(0, ("code", code))
    return tuple(items)


# ---------------------------------------------------------------- metrics


def test_streams_and_messages_are_counted_per_method_and_code():
    memory, metrics, _ = served()
    proxy = memory.proxy(STREAMS)

    async def calls() -> None:
        assert len([r async for r in proxy.Count(COUNT(count=5))]) == 5
        with pytest.raises(NotFoundError):
            async for _ in proxy.Count(COUNT(count=2, fail_code=5)):
                pass
        await proxy.Sum([echo_pb2.EchoRequest(payload=b"ab")] * 4)
        chat = proxy.Chat()
        for payload in (b"1", b"2", b"3"):
            await chat.write(echo_pb2.EchoRequest(payload=payload))
            assert (await chat.read()).payload == payload
        await chat.done_writing()
        assert await chat.read() is None

    run(memory, calls())
    got = scraped(metrics)
    started = "mprpc_server_streams_started_total"
    finished = "mprpc_server_streams_finished_total"
    assert got[(started, labels("Count"))] == 2
    assert got[(finished, labels("Count", "OK"))] == 1
    assert got[(finished, labels("Count", "NOT_FOUND"))] == 1
    assert got[(finished, labels("Sum", "OK"))] == 1
    assert got[(finished, labels("Chat", "OK"))] == 1
    assert got[("mprpc_server_streams_open", labels("Count"))] == 0
    sent, received = (
        "mprpc_server_stream_messages_sent_total",
        "mprpc_server_stream_messages_received_total",
    )
    assert got[(sent, labels("Count"))] == 7
    assert got[(received, labels("Sum"))] == 4
    assert (got[(received, labels("Chat"))], got[(sent, labels("Chat"))]) == (3, 3)
    # A stream is a call too: the calls' counters see it once, at its end.
    assert got[("mprpc_server_calls_total", labels("Count", "OK"))] == 1


def test_open_streams_and_their_messages_so_far_are_seen_live_and_a_cancel_is_counted():
    memory, metrics, service = served()
    stream = memory.proxy(STREAMS).Count(COUNT(forever=True, tag="slow"))
    taken = []

    async def take(n: int) -> None:
        for _ in range(n):
            taken.append(await stream.read())

    run(memory, take(10))
    got = scraped(metrics)
    assert got[("mprpc_server_streams_open", labels("Count"))] == 1
    assert memory.factory.streams_in_flight == 1
    sent = got[("mprpc_server_stream_messages_sent_total", labels("Count"))]
    assert sent >= 10  # what the window let out so far, before the end
    stream.cancel()
    memory.flush()
    got = scraped(metrics)
    assert got[("mprpc_server_streams_open", labels("Count"))] == 0
    assert got[("mprpc_server_streams_finished_total", labels("Count", "CANCELLED"))] == 1
    assert got[("mprpc_server_stream_messages_sent_total", labels("Count"))] == sent  # monotonic
    assert service.ends == {"slow": "closed"}


def test_a_stream_refused_by_the_limits_is_a_call_not_a_stream():
    memory, metrics, _ = served(limits=ServerLimits(max_streams_per_connection=1))
    proxy = memory.proxy(STREAMS)
    held = proxy.Count(COUNT(forever=True))
    memory.flush()
    refused = proxy.Count(COUNT(count=1))

    async def read_all() -> None:
        async for _ in refused:
            pass

    with pytest.raises(ResourceExhaustedError, match="max_streams_per_connection"):
        run(memory, read_all())
    got = scraped(metrics)
    assert got[("mprpc_server_streams_started_total", labels("Count"))] == 1
    assert got[("mprpc_server_calls_total", labels("Count", "RESOURCE_EXHAUSTED"))] == 1
    assert ("mprpc_server_streams_finished_total", labels("Count", "RESOURCE_EXHAUSTED")) not in got
    held.cancel()
    memory.flush()
    got = scraped(metrics)
    assert got[("mprpc_server_streams_finished_total", labels("Count", "CANCELLED"))] == 1


def test_stream_finished_takes_a_code_when_given_one():
    metrics = ProviderMetrics()
    metrics.stream_started("a.B/C")
    metrics.call_finished("x.Y/Z", 0, 0.1)  # another method's end: not this stream's
    metrics.stream_finished("a.B/C", 1, 2)
    metrics.stream_started("a.B/C")
    metrics.stream_finished("a.B/C", 0, 0, code=StatusCode.ABORTED)
    got = scraped(metrics)
    finished = "mprpc_server_streams_finished_total"
    assert got[(finished, (("code", "UNKNOWN"), ("method", "C"), ("service", "a.B")))] == 1
    assert got[(finished, (("code", "ABORTED"), ("method", "C"), ("service", "a.B")))] == 1
    assert metrics.messages() == {"a.B/C": (1, 2)}


# ---------------------------------------------------------------- status page


class _Registry:
    registrations: list[Any] = []


class _Provider:
    """What status_data reads of a ProviderService, over a MemoryProvider."""

    def __init__(self, memory: MemoryProvider) -> None:
        self.reactor = memory.reactor
        self.dispatcher = memory.dispatcher
        self.health = memory.health
        self.factory = memory.factory
        self.cpp_factory = None
        self.registry = _Registry()
        self.started_at = 0.0
        self.advertise = self.cpp_advertise = None

    @property
    def calls_in_flight(self) -> int:
        return self.factory.calls_in_flight


def test_status_shows_open_streams_per_method_and_connection_beside_calls_in_flight():
    memory, metrics, _ = served(builtins=True)
    proxy = memory.proxy(STREAMS)
    streams = [proxy.Count(COUNT(forever=True)) for _ in range(2)]
    chat = proxy.Chat()
    unary = memory.proxy(EchoService).AsyncEcho(echo_pb2.EchoRequest(delay=5))
    memory.flush()
    data = status_data(_Provider(memory), metrics)
    assert data["provider"]["streams_in_flight"] == 3
    assert data["provider"]["calls_in_flight"] == 4  # the streams and the AsyncEcho
    by_method = {f"{s['name']}/{m['name']}": m for s in data["services"] for m in s["methods"]}
    count = by_method["mprpc.test.StreamService/Count"]
    assert (count["kind"], count["open_streams"]) == ("server stream", 2)
    assert count["messages_sent"] > 0  # open streams' messages so far
    assert by_method["mprpc.test.StreamService/Chat"]["kind"] == "bidi"
    assert by_method["mprpc.test.StreamService/Chat"]["open_streams"] == 1
    assert by_method["mprpc.test.StreamService/Sum"]["kind"] == "client stream"
    assert by_method["mprpc.health.v1.Health/WatchStream"]["kind"] == "server stream"
    assert by_method["mprpc.test.EchoService/Echo"]["kind"] == "unary"
    (connection,) = data["connections"]
    assert (connection["streams"], connection["calls_in_flight"]) == (3, 1)
    page = render_status(data, 0)
    assert '<b id="streams-in-flight">3</b>' in page
    assert (
        '<tr data-method="mprpc.test.StreamService/Count"><td>mprpc.test.StreamService</td>'
        '<td>Count</td><td class="kind">server stream</td>'
    ) in page
    assert '<td class="streams">2</td>' in page
    assert '<td class="calls">1</td><td class="streams">3</td>' in page  # the connection
    for stream in streams:
        stream.cancel()
    chat.cancel()
    memory.advance(5)
    memory.result(unary)
    data = status_data(_Provider(memory), metrics)
    assert (data["provider"]["streams_in_flight"], data["provider"]["calls_in_flight"]) == (0, 0)
    by_method = {f"{s['name']}/{m['name']}": m for s in data["services"] for m in s["methods"]}
    assert by_method["mprpc.test.StreamService/Count"]["open_streams"] == 0
    assert by_method["mprpc.test.StreamService/Count"]["errors"] == {"CANCELLED": 2}


# ---------------------------------------------------------------- Health.WatchStream


def watch_stream(memory: MemoryProvider, service: str = "") -> tuple[Any, list[int]]:
    stream = memory.proxy(HEALTH).WatchStream(HealthCheckRequest(service=service))
    seen: list[int] = []
    stream.on_message(lambda reply: seen.append(reply.status)).addErrback(lambda f: None)
    memory.flush()
    return stream, seen


def test_watch_stream_sends_the_status_at_once_then_each_change():
    memory, _, _ = served(builtins=True)
    stream, seen = watch_stream(memory, "mprpc.test.StreamService")
    assert seen == [SERVING]
    memory.advance(100)  # no change, no message (and no deadline: a stream has none)
    assert seen == [SERVING]
    memory.health.set("mprpc.test.EchoService", NOT_SERVING)  # another service
    memory.flush()
    assert seen == [SERVING]
    memory.health.set_all(NOT_SERVING)  # a drain
    memory.flush()
    memory.health.set("mprpc.test.StreamService", SERVING)
    memory.flush()
    assert seen == [SERVING, NOT_SERVING, SERVING]
    assert stream.code is None
    stream.cancel()
    memory.flush()


def test_watch_stream_of_an_unknown_service_says_so():
    memory, _, _ = served(builtins=True)
    stream, seen = watch_stream(memory, "no.Such")
    memory.health.set("no.Such", SERVING)
    memory.flush()
    assert seen == [SERVICE_UNKNOWN, SERVING]
    stream.cancel()
    memory.flush()


def test_watch_stream_handler_ends_when_the_consumer_cancels():
    memory, _, _ = served(builtins=True)
    health = memory.dispatcher.services[HEALTH.full_name]
    streams = [watch_stream(memory)[0] for _ in range(3)]
    assert (health.watch_streams, memory.health.watching) == (3, 3)
    for stream in streams:
        stream.cancel()
    memory.flush()
    assert (health.watch_streams, memory.health.watching) == (0, 0)  # each finally ran
    assert memory.factory.streams_in_flight == 0
    assert all(s.code == StatusCode.CANCELLED for s in streams)


def test_watch_stream_handler_ends_when_the_connection_is_lost():
    memory, _, _ = served(builtins=True)
    health = memory.dispatcher.services[HEALTH.full_name]
    stream, _ = watch_stream(memory)
    (connection,) = memory.factory.connections
    connection.transport.loseConnection()
    memory.flush()
    assert (health.watch_streams, memory.health.watching) == (0, 0)
    assert stream.code == StatusCode.UNAVAILABLE


def test_a_slow_watch_stream_reader_gets_a_window_of_changes_then_the_latest_status():
    memory, _, _ = served(builtins=True)
    # A consumer granting 1 KiB a stream: ~51 messages of 20 bytes (header included).
    client = Client(memory.reactor, providers={HEALTH.full_name: [ADDRESS]}, stream_window=1024)
    stream = client.proxy(HEALTH).WatchStream(HealthCheckRequest())
    stream.pauseProducing()
    memory.flush()
    for _ in range(1000):  # flapping while the reader is paused
        memory.health.set_all(NOT_SERVING)
        memory.health.set_all(SERVING)
        memory.flush()
    memory.health.set_all(NOT_SERVING)
    memory.flush()
    held = len(stream.inbox.messages)
    assert 1024 // 20 <= held <= 1024 // 20 + 1  # the window's worth, not one per change
    seen: list[int] = []
    stream.on_message(lambda reply: seen.append(reply.status)).addErrback(lambda f: None)
    stream.resumeProducing()
    memory.flush()
    assert seen[0] == SERVING and seen[-1] == NOT_SERVING
    assert len(seen) <= held + 1  # the changes beyond the window came as the latest status
    stream.cancel()
    memory.flush()
    assert memory.health.watching == 0


def test_watch_streams_are_bounded_by_the_stream_limits_and_the_long_poll_still_works():
    memory, _, _ = served(builtins=True, limits=ServerLimits(max_streams_per_connection=2))
    health = memory.proxy(HEALTH)
    held = [watch_stream(memory)[0] for _ in range(2)]
    third = health.WatchStream(HealthCheckRequest())
    failed = []
    third.on_message(lambda reply: None).addErrback(lambda f: failed.append(f.value))
    memory.flush()
    assert isinstance(failed[0], ResourceExhaustedError)
    # A wave-1 consumer's long poll is a unary call, beside the streams.
    poll = health.Watch(HealthWatchRequest(last_status=SERVING, max_wait=10))
    memory.flush()
    assert not poll.called
    memory.health.set_all(NOT_SERVING)
    memory.flush()
    assert memory.result(poll).status == NOT_SERVING
    for stream in held:
        stream.cancel()
    memory.flush()


# ---------------------------------------------------------------- reflection


def test_reflection_describes_stream_kinds_and_a_reflected_proxy_streams():
    memory, _, _ = served(builtins=True)
    remote = RemoteDescriptors(memory.client)

    async def reflected() -> Any:
        return await remote.service("mprpc.test.StreamService"), await remote.service(
            HEALTH.full_name
        )

    streams, health = run(memory, reflected())
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in streams.methods}
    assert kinds == {
        "Count": (False, True),
        "Sum": (True, False),
        "Chat": (True, True),
        "Ends": (False, False),
    }
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in health.methods}
    assert kinds == {
        "Check": (False, False),
        "Watch": (False, False),
        "WatchStream": (False, True),
    }
    count = streams.methods_by_name["Count"]
    request = message_class(count.input_type)(count=3)
    proxy = memory.client.proxy(streams)

    async def counted() -> list[int]:
        return [reply.call_id async for reply in proxy.Count(request)]

    assert run(memory, counted()) == [0, 1, 2]


def test_reflected_client_stream_errors_are_typed():
    memory, _, _ = served(builtins=True)

    async def summed() -> None:
        service = await RemoteDescriptors(memory.client).service("mprpc.test.StreamService")
        sum_ = service.methods_by_name["Sum"]
        request_class = message_class(sum_.input_type)
        await memory.client.proxy(service).Sum([request_class(fail_code=5, fail_message="no")])

    with pytest.raises(RpcError) as raised:
        run(memory, summed())
    assert (raised.value.code, raised.value.message) == (StatusCode.NOT_FOUND, "no")


def test_status_and_metrics_count_the_grpc_listeners_connections_too():
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from twisted_rpc.grpc import GrpcServerFactory

    memory = MemoryProvider([StreamService()])
    provider = _Provider(memory)
    provider.grpc_factory = GrpcServerFactory(memory.dispatcher, memory.reactor, None)
    peer = IPv4Address("TCP", "10.0.0.9", 4000)
    connection = provider.grpc_factory.buildProtocol(peer)
    connection.makeConnection(StringTransport(peerAddress=peer))
    metrics = ProviderMetrics()
    metrics.watch_provider(provider)
    data = status_data(provider, metrics)
    grpc_rows = [c for c in data["connections"] if c["protocol"] == "gRPC"]
    assert [c["peer"] for c in grpc_rows] == ["10.0.0.9:4000"]
    assert metrics.registry.get_sample_value("mprpc_server_connections") == 1
