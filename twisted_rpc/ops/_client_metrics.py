"""Consumer-side Prometheus metrics: :class:`ClientMetrics`.

An ``IClientInterceptor`` counting a client's calls
(``mprpc_client_calls_total{service,method,code}``,
``mprpc_client_call_duration_seconds{service,method}``,
``mprpc_client_calls_in_flight``) and, after ``watch_client(client)``, its
connections (``mprpc_client_connections``), its ejections and compression
bytes (read at each scrape), and what its resilience policies do (retries,
hedges, ejections and returns by provider, calls shed: counted as they
happen, told through the client's observers, ``twisted_rpc.client._events``).
Names in docs/resilience.md, "Metrics".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc.client._outliers import peers_of
from twisted_rpc.core._interfaces import IClientInterceptor
from twisted_rpc.core._status import RpcError, StatusCode, code_name
from twisted_rpc.ops._metrics import BUCKETS, _CompressedBytes, _compression, _split

if TYPE_CHECKING:
    from twisted_rpc.client import ClientCall

__all__ = ["ClientMetrics"]


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
        by_method = ["service", "method"]

        def counter(name: str, documentation: str, labels: list[str]) -> Counter:
            return Counter(name, documentation, labels, registry=self.registry)

        self.retries = counter(
            "mprpc_client_retries",
            "Retries sent, by the status that caused them (RESOURCE_EXHAUSTED: shed unrun)",
            [*by_method, "code"],
        )
        self.refused = counter(
            "mprpc_client_retries_refused", "Retries and hedges the retry budget refused", by_method
        )
        self.hedges = counter(
            "mprpc_client_hedges", "Hedges sent (attempts after the first)", by_method
        )
        self.won = counter(
            "mprpc_client_hedges_won", "Hedged calls answered by a later attempt", by_method
        )
        self.cancelled = counter(
            "mprpc_client_hedges_cancelled", "Losing attempts cancelled (CANCEL sent)", by_method
        )
        self.ejections = counter(
            "mprpc_client_provider_ejections", "Times a provider was ejected", ["provider"]
        )
        self.returns = counter(
            "mprpc_client_provider_returns",
            "Times a provider came back into rotation",
            ["provider"],
        )
        self.shed_calls = counter(
            "mprpc_client_calls_shed", "Calls a provider answered not run (shed)", ["provider"]
        )

    def watch_client(self, client: Any) -> None:
        """A gauge of ``client``'s open connections (ready channels)."""
        gauge = Gauge(
            "mprpc_client_connections", "Connections to providers", registry=self.registry
        )
        gauge.set_function(lambda: sum(1 for c in client.channels.values() if c.protocol))
        self.registry.register(_ClientResilience(client))
        client._retries.events.add(self)  # retries and hedges
        peers_of(client._dials).events.add(self)  # ejections, returns, shed calls

    # ------------------------------------------------- resilience events (_events.py)

    def retried(self, method: str, code: int) -> None:
        self.retries.labels(*_split(method), code_name(code)).inc()

    def retry_refused(self, method: str) -> None:
        self.refused.labels(*_split(method)).inc()

    def hedged(self, method: str) -> None:
        self.hedges.labels(*_split(method)).inc()

    def hedge_won(self, method: str) -> None:
        self.won.labels(*_split(method)).inc()

    def hedges_cancelled(self, method: str, count: int) -> None:
        self.cancelled.labels(*_split(method)).inc(count)

    def ejected(self, provider: str) -> None:
        self.ejections.labels(provider).inc()

    def returned(self, provider: str) -> None:
        self.returns.labels(provider).inc()

    def call_shed(self, provider: str) -> None:
        self.shed_calls.labels(provider).inc()

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


class _ClientResilience(Collector):
    """A client's ejections (from its channels' failure accruals) and the
    compression bytes of its connections."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.compressed = _CompressedBytes()
        self.accruals: dict[Any, tuple[float, int]] = {}
        """Accruals read at the last scrape: their ejection time and count then."""
        self.ejections = 0

    def _channels(self) -> list[Any]:
        return [*self.client.channels.values(), *getattr(self.client, "_retiring", ())]

    def _count_ejections(self, accruals: list[Any]) -> int:
        """Ejections since the last scrape. An accrual's count of ejections
        in a row only grows, but restarts at 1 on an ejection long after the
        last one (its ejection time then moved); a closed channel's accrual
        is read a last time, then let go."""
        live = {a: (a.ejected_at, a.ejections) for a in accruals}
        for accrual in self.accruals.keys() - live.keys():
            live[accrual] = (accrual.ejected_at, accrual.ejections)
        for accrual, (at, count) in live.items():
            last_at, last_count = self.accruals.get(accrual, (0.0, 0))
            if count > last_count:
                self.ejections += count - last_count
            elif at != last_at:
                self.ejections += count
        self.accruals = {a: live[a] for a in accruals}
        return self.ejections

    def collect(self) -> Iterable[Metric]:
        channels = self._channels()
        accruals = [a for a in (getattr(c, "accrual", None) for c in channels) if a is not None]
        ejections = CounterMetricFamily(
            "mprpc_client_ejections",
            "Times a provider was taken out of rotation (failed calls, or its Health check)",
            value=self._count_ejections(accruals),
        )
        ejected = GaugeMetricFamily(
            "mprpc_client_providers_ejected",
            "Providers ejected now (the balancers keep max_ejection_percent out at most)",
            value=sum(1 for a in accruals if a.ejected),
        )
        connections = [
            c
            for channel in channels
            for c in (channel.protocol, getattr(channel, "_proving", None))
            + tuple(getattr(channel, "_old", ()))
            if c is not None
        ]
        before, after = _compression("client")
        u, c = self.compressed.read(connections)
        before.add_metric([], u)
        after.add_metric([], c)
        return [ejections, ejected, before, after]
