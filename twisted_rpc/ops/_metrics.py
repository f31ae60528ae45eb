"""Prometheus metrics (``prometheus_client``) for providers and consumers.

Provider side, :class:`ProviderMetrics` (an ``ICallObserver`` on the server
factory, plus gauges read when scraped):

- ``mprpc_server_calls_total{service,method,code}``
- ``mprpc_server_call_duration_seconds{service,method}`` (histogram)
- ``mprpc_server_streams_started_total{service,method}``,
  ``mprpc_server_streams_finished_total{service,method,code}``,
  ``mprpc_server_streams_open{service,method}``
- ``mprpc_server_stream_messages_received_total{service,method}`` and
  ``..._sent_total`` (finished streams' counts, plus the open streams' so far
  once :meth:`ProviderMetrics.watch_streams` names their factory)
- ``mprpc_server_calls_in_flight``, ``mprpc_server_streams_in_flight``,
  ``mprpc_server_connections``
- ``mprpc_registry_zookeeper_connected``, ``mprpc_registry_nodes``,
  ``mprpc_registry_reregistrations``

Consumer side, :class:`ClientMetrics` (an ``IClientInterceptor``):
``mprpc_client_calls_total{service,method,code}``,
``mprpc_client_call_duration_seconds{service,method}``,
``mprpc_client_calls_in_flight`` and, after ``watch_client(client)``,
``mprpc_client_connections``.

Each object has its own ``CollectorRegistry`` unless given one, so several
providers or clients can live in one process (and in one test).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc.core._interfaces import ICallObserver, IClientInterceptor
from twisted_rpc.core._status import RpcError, StatusCode, code_name

if TYPE_CHECKING:
    from twisted_rpc.client import ClientCall

__all__ = ["ClientMetrics", "ProviderMetrics", "open_streams", "quantile"]

BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    math.inf,
)


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.rpartition("/")
    return service or "?", name or "?"


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``q``-quantile from cumulative ``(upper bound, count)`` pairs, interpolated
    within a bucket as Prometheus's ``histogram_quantile`` does."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


@implementer(ICallObserver)
class ProviderMetrics:
    """Counts a provider's calls and exposes its state; also keeps a short
    history of totals for calls-per-second figures (``sample``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.calls = Counter(
            "mprpc_server_calls",
            "Calls finished by this provider",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mprpc_server_call_duration_seconds",
            "Time from request received to answer sent",
            ["service", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.totals: dict[str, dict[str, int]] = {}  # method -> code name -> calls
        self.history: deque[tuple[float, dict[str, int]]] = deque(maxlen=11)
        self._sampler: LoopingCall | None = None
        self._clock: IReactorTime | None = None
        self.streams_started = Counter(
            "mprpc_server_streams_started",
            "Streams started by this provider",
            ["service", "method"],
            registry=self.registry,
        )
        self.streams_finished = Counter(
            "mprpc_server_streams_finished",
            "Streams ended, by final status",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.streams_open = Gauge(
            "mprpc_server_streams_open",
            "Streams in flight",
            ["service", "method"],
            registry=self.registry,
        )
        self.stream_messages: dict[str, list[int]] = {}
        """``{method: [received, sent]}`` of the streams that ended."""
        self.stream_factories: list[Any] = []
        """Listener factories whose open streams' messages count too (:meth:`watch_streams`)."""
        self._last_end: tuple[str, int] | None = None
        self.registry.register(_StreamMessages(self))

    def call_finished(self, method: str, code: int, duration: float) -> None:
        service, name = _split(method)
        code_text = code_name(code)
        self.calls.labels(service, name, code_text).inc()
        self.latency.labels(service, name).observe(duration)
        by_code = self.totals.setdefault(method, {})
        by_code[code_text] = by_code.get(code_text, 0) + 1
        self._last_end = (method, code)

    # ---------------------------------------------------------------- streams

    def stream_started(self, method: str) -> None:
        service, name = _split(method)
        self.streams_started.labels(service, name).inc()
        self.streams_open.labels(service, name).inc()

    def stream_finished(
        self, method: str, received: int, sent: int, code: int | None = None
    ) -> None:
        """A stream of ``method`` ended; its status is ``code`` or, when the
        caller gives none, the one of the ``call_finished`` that the provider
        reports just before (for the same stream, in the same turn)."""
        if code is None:
            last = self._last_end
            code = last[1] if last is not None and last[0] == method else StatusCode.UNKNOWN
        self._last_end = None
        service, name = _split(method)
        self.streams_finished.labels(service, name, code_name(code)).inc()
        self.streams_open.labels(service, name).dec()
        counts = self.stream_messages.setdefault(method, [0, 0])
        counts[0] += received
        counts[1] += sent

    def watch_streams(self, factory: Any) -> None:
        """Count the messages of ``factory``'s open streams too (read at each
        scrape), not only those of the streams that ended."""
        if factory not in self.stream_factories:
            self.stream_factories.append(factory)

    def messages(self) -> dict[str, tuple[int, int]]:
        """``{method: (received, sent)}``: the ended streams' messages plus,
        for the watched factories, the open ones' so far."""
        totals = {method: (r, s) for method, (r, s) in self.stream_messages.items()}
        for stream in open_streams(self.stream_factories):
            method = stream.method.info.full_name
            r, s = totals.get(method, (0, 0))
            totals[method] = (r + stream.received, s + stream.sent)
        return totals

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> Gauge:
        """A gauge whose value is ``read()`` at each scrape."""
        gauge = Gauge(name, documentation, registry=self.registry)
        gauge.set_function(read)
        return gauge

    def watch_provider(self, provider: Any) -> None:
        """Gauges of a :class:`~twisted_rpc.provider.ProviderService`'s state."""
        self.gauge(
            "mprpc_server_calls_in_flight",
            "Calls being handled (open streams included)",
            lambda: provider.calls_in_flight,
        )
        factories = listener_factories(provider)
        for factory in factories:
            self.watch_streams(factory)
        self.gauge(
            "mprpc_server_streams_in_flight",
            "Streams open (max_streams bounds them)",
            lambda: sum(f.streams_in_flight for f in factories),
        )
        self.gauge(
            "mprpc_server_connections",
            "Open connections (every protocol: native, C++, gRPC)",
            lambda: sum(len(f.connections) for f in factories),
        )
        registry = provider.registry
        zk = getattr(registry, "zk", None)
        self.gauge(
            "mprpc_registry_zookeeper_connected",
            "1 while the ZooKeeper session is connected (-1: no ZooKeeper registry)",
            lambda: -1 if zk is None else int(zk.connected),
        )
        self.gauge(
            "mprpc_registry_nodes",
            "Registrations this provider keeps in its registry",
            lambda: len(registry.registrations),
        )
        self.gauge(
            "mprpc_registry_reregistrations",
            "Nodes re-created after a new session or a deletion, since start",
            lambda: getattr(registry, "reregistrations", 0),
        )

    # ---------------------------------------------------------------- rates

    def start_sampling(self, clock: IReactorTime, interval: float = 1.0) -> None:
        """Record the totals every ``interval`` s (the last 10 s give calls/s)."""
        self._clock = clock
        self._sampler = LoopingCall(self.sample)
        self._sampler.clock = clock
        self._sampler.start(interval, now=True).addErrback(lambda f: None)

    def stop_sampling(self) -> None:
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()

    def sample(self) -> None:
        counts = {method: sum(by_code.values()) for method, by_code in self.totals.items()}
        assert self._clock is not None, "sampled before start_sampling"
        self.history.append((self._clock.seconds(), counts))

    def rate(self, method: str) -> float:
        """Calls per second of ``method`` from the oldest sample (at most 10 s ago) to now."""
        if not self.history:
            return 0.0
        t0, first = self.history[0]
        assert self._clock is not None, "samples come after start_sampling"
        now = sum(self.totals.get(method, {}).values())
        return (now - first.get(method, 0)) / max(self._clock.seconds() - t0, 1.0)

    def latency_buckets(self) -> dict[str, list[tuple[float, float]]]:
        """Cumulative latency buckets by ``"service/method"``: ``[(upper bound, count), ...]``
        (one pass over the histogram, for a whole status page)."""
        out: dict[str, list[tuple[float, float]]] = {}
        for family in self.latency.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    labels = sample.labels
                    key = f"{labels['service']}/{labels['method']}"
                    out.setdefault(key, []).append((float(labels["le"]), sample.value))
        for buckets in out.values():
            buckets.sort()
        return out


def listener_factories(provider: Any) -> list[Any]:
    """A provider's listener factories: native, C++ and gRPC (those it has)."""
    candidates = (
        provider.factory,
        getattr(provider, "cpp_factory", None),
        getattr(provider, "grpc_factory", None),
    )
    return [f for f in candidates if f is not None]


def open_streams(factories: Iterable[Any]) -> Iterator[Any]:
    """The streams in flight on the connections of ``factories`` (listener
    factories; a connection without streams has none)."""
    for factory in factories:
        for connection in factory.connections:
            yield from getattr(connection, "streams", {}).values()


class _StreamMessages(Collector):
    """``mprpc_server_stream_messages_{received,sent}_total``, made at each
    scrape from :meth:`ProviderMetrics.messages` (monotonic: a stream's count
    moves from the open ones to the ended ones unchanged)."""

    def __init__(self, metrics: ProviderMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        received = CounterMetricFamily(
            "mprpc_server_stream_messages_received",
            "Request messages stream handlers took",
            labels=["service", "method"],
        )
        sent = CounterMetricFamily(
            "mprpc_server_stream_messages_sent",
            "Response messages streams sent",
            labels=["service", "method"],
        )
        for method, (r, s) in sorted(self.metrics.messages().items()):
            labels = list(_split(method))
            received.add_metric(labels, r)
            sent.add_metric(labels, s)
        return [received, sent]


@implementer(IClientInterceptor)
class ClientMetrics:
    """Counts a client's calls by service, method and status (an interceptor)."""

    def __init__(self, clock: IReactorTime, registry: CollectorRegistry | None = None) -> None:
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self.calls = Counter(
            "mprpc_client_calls",
            "Calls made by this client",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mprpc_client_call_duration_seconds",
            "Time from call to answer, as the caller saw it",
            ["service", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mprpc_client_calls_in_flight", "Calls sent and not answered", registry=self.registry
        )

    def watch_client(self, client: Any) -> None:
        """A gauge of ``client``'s open connections (ready channels)."""
        gauge = Gauge(
            "mprpc_client_connections", "Connections to providers", registry=self.registry
        )
        gauge.set_function(lambda: sum(1 for c in client.channels.values() if c.protocol))

    def intercept(
        self,
        call: ClientCall,
        request: Message,
        proceed: Callable[[ClientCall, Message], Deferred[Message]],
    ) -> Deferred[Message]:
        started = self.clock.seconds()
        service, method = call.method.service, call.method.name
        self.in_flight.inc()

        def done(result: Message | Failure) -> Message | Failure:
            if isinstance(result, Failure):
                error = result.value
                code = error.code if isinstance(error, RpcError) else StatusCode.UNKNOWN
            else:
                code = StatusCode.OK
            self.in_flight.dec()
            self.calls.labels(service, method, code_name(code)).inc()
            self.latency.labels(service, method).observe(self.clock.seconds() - started)
            return result

        return proceed(call, request).addBoth(done)
