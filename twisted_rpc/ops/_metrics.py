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

Consumer side: :class:`twisted_rpc.ops._client_metrics.ClientMetrics`
(``_client_metrics``), which shares this module's buckets and compression
byte counting.

Shedding, compression and ejections (read at each scrape, nothing counted per
call; names in docs/resilience.md, "Metrics") come with ``watch_provider`` (or
``watch_resilience``) and ``watch_client``.

Each object has its own ``CollectorRegistry`` unless given one, so several
providers or clients can live in one process (and in one test).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from twisted_rpc.core._interfaces import ICallObserver
from twisted_rpc.core._status import StatusCode, code_name

__all__ = ["ProviderMetrics", "open_streams", "quantile"]

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
            multiprocess_mode="livesum",  # (workers: summed over the live ones)
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
        """Gauges of a :class:`twisted_rpc.provider.ProviderService`'s state."""
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
        self.watch_resilience(provider)
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

    def watch_resilience(self, provider: Any) -> None:
        """Adaptive shedding and compression of ``provider``'s listeners
        (anything with a ``factory``; ``cpp_factory``, ``grpc_factory`` if set)."""
        self.registry.register(_ProviderResilience(named_listeners(provider)))

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
    return [f for _, f in named_listeners(provider)]


def named_listeners(provider: Any) -> list[tuple[str, Any]]:
    """:func:`listener_factories` with the ``listener`` label of each."""
    candidates = (
        ("native", provider.factory),
        ("cpp", getattr(provider, "cpp_factory", None)),
        ("grpc", getattr(provider, "grpc_factory", None)),
    )
    return [(name, f) for name, f in candidates if f is not None]


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


class _CompressedBytes:
    """Payload bytes sent compressed, before and after, of some connections:
    those open now plus those read at an earlier scrape and closed since
    (read a last time, then let go). Connections opened and closed between
    two scrapes are not seen."""

    def __init__(self) -> None:
        self.seen: dict[Any, None] = {}
        self.closed = [0, 0]

    def read(self, connections: Iterable[Any]) -> tuple[int, int]:
        live = dict.fromkeys(connections)
        for gone in self.seen.keys() - live.keys():
            self.closed[0] += getattr(gone, "bytes_uncompressed", 0)
            self.closed[1] += getattr(gone, "bytes_compressed", 0)
        self.seen = live
        before, after = self.closed
        for c in live:
            before += getattr(c, "bytes_uncompressed", 0)
            after += getattr(c, "bytes_compressed", 0)
        return before, after


def _compression(side: str) -> tuple[CounterMetricFamily, CounterMetricFamily]:
    labels = ["listener"] if side == "server" else []
    what = "Bytes of the payloads this side sent compressed"
    return (
        CounterMetricFamily(
            f"mprpc_{side}_compression_input_bytes", f"{what}, before compression", labels=labels
        ),
        CounterMetricFamily(
            f"mprpc_{side}_compression_output_bytes", f"{what}, after compression", labels=labels
        ),
    )


class _ProviderResilience(Collector):
    """The adaptive limiter's figures and the compression bytes, per listener."""

    def __init__(self, listeners: list[tuple[str, Any]]) -> None:
        self.listeners = listeners
        self.compressed = {name: _CompressedBytes() for name, _ in listeners}

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, documentation: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=["listener"])

        shed = CounterMetricFamily(
            "mprpc_server_calls_shed",
            "Calls answered RESOURCE_EXHAUSTED unrun, over the adaptive limit",
            labels=["listener"],
        )
        limit = gauge("mprpc_server_adaptive_limit", "Calls the adaptive limiter admits at once")
        no_load = gauge(
            "mprpc_server_adaptive_no_load_latency_seconds",
            "The adaptive limiter's no-load latency (least of recent windows)",
        )
        current = gauge(
            "mprpc_server_adaptive_current_latency_seconds",
            "The adaptive limiter's current latency (mean of the last window)",
        )
        bound = gauge(
            "mprpc_server_adaptive_cpu_bound",
            "The most calls the provider's CPU runs within the tolerated latency",
        )
        before, after = _compression("server")
        for name, factory in self.listeners:
            limiter = getattr(factory, "limiter", None)
            if limiter is not None:
                shed.add_metric([name], limiter.shed)
                limit.add_metric([name], limiter.limit)
                no_load.add_metric([name], limiter.no_load)
                current.add_metric([name], limiter.current)
                bound.add_metric([name], limiter.cpu_bound)
            u, c = self.compressed[name].read(factory.connections)
            before.add_metric([name], u)
            after.add_metric([name], c)
        return [shed, limit, no_load, current, bound, before, after]
