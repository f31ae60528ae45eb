"""Prometheus metrics (``prometheus_client``) for providers and consumers.

Provider side, :class:`ProviderMetrics` (an ``ICallObserver`` on the server
factory, plus gauges read when scraped):

- ``mprpc_server_calls_total{service,method,code}``
- ``mprpc_server_call_duration_seconds{service,method}`` (histogram)
- ``mprpc_server_calls_in_flight``, ``mprpc_server_connections``
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc.core._interfaces import ICallObserver, IClientInterceptor
from twisted_rpc.core._status import RpcError, StatusCode, code_name

if TYPE_CHECKING:
    from twisted_rpc.client import ClientCall

__all__ = ["ClientMetrics", "ProviderMetrics", "quantile"]

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

    def call_finished(self, method: str, code: int, duration: float) -> None:
        service, name = _split(method)
        code_text = code_name(code)
        self.calls.labels(service, name, code_text).inc()
        self.latency.labels(service, name).observe(duration)
        by_code = self.totals.setdefault(method, {})
        by_code[code_text] = by_code.get(code_text, 0) + 1

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> Gauge:
        """A gauge whose value is ``read()`` at each scrape."""
        gauge = Gauge(name, documentation, registry=self.registry)
        gauge.set_function(read)
        return gauge

    def watch_provider(self, provider: Any) -> None:
        """Gauges of a :class:`~twisted_rpc.provider.ProviderService`'s state."""
        self.gauge(
            "mprpc_server_calls_in_flight",
            "Calls being handled",
            lambda: provider.calls_in_flight,
        )
        self.gauge(
            "mprpc_server_connections",
            "Open connections (native protocol)",
            lambda: len(provider.factory.connections),
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
