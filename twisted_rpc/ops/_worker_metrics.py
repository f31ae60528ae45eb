"""Metrics of a provider's workers (``[provider] workers`` > 1 with ``[admin]``),
in prometheus_client's multiprocess mode.

The supervisor makes a private directory (:class:`WorkersMetrics`, removed when
it stops) and gives it to its workers as ``PROMETHEUS_MULTIPROC_DIR``, so every
Counter, Histogram and Gauge a worker makes is kept in a file of that directory.
The supervisor's ``/metrics`` is a ``MultiProcessCollector`` over them (counters
and histograms summed over every worker, those that died too), plus a few
figures of its own (:class:`_SupervisorCollector`).

A worker's live state (calls and streams in flight, connections, calls served,
the adaptive limit and calls shed) is read by collectors at scrape time in a single process;
a collector cannot cross processes, so a worker sets gauges from it
(:class:`WorkerGauges`, every :data:`GAUGE_INTERVAL` seconds, never per call)
with ``multiprocess_mode = "liveall"``: one series per live worker, labelled
``pid``; the supervisor removes a dead worker's gauge files
(``mark_process_dead``). The status page's per-worker rows are read from
those same gauges.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_rpc.ops._metrics import ProviderMetrics, named_listeners

__all__ = ["GAUGE_INTERVAL", "MULTIPROC_ENV", "WorkerGauges", "WorkersMetrics", "watch_worker"]

log = Logger(namespace="twisted_rpc.ops")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The variable that puts prometheus_client in a worker in multiprocess mode."""
GAUGE_INTERVAL = 1.0
"""Seconds between two updates of a worker's gauges."""

PER_WORKER = {
    "mprpc_server_calls_in_flight": "calls_in_flight",
    "mprpc_server_streams_in_flight": "streams_in_flight",
    "mprpc_server_connections": "connections",
    "mprpc_worker_calls_served": "calls_served",
}
"""The worker gauges (``liveall``) and their key in a status row."""


class WorkerGauges:
    """A worker's live state as multiprocess gauges, set every ``interval``
    seconds from ``provider`` and ``metrics`` (its call counts)."""

    def __init__(
        self,
        provider: Any,
        metrics: ProviderMetrics,
        clock: IReactorTime,
        interval: float = GAUGE_INTERVAL,
    ) -> None:
        self.provider = provider
        self.metrics = metrics
        self.interval = interval
        registry = metrics.registry
        self.gauges = {
            name: Gauge(name, _HELP[name], registry=registry, multiprocess_mode="liveall")
            for name in PER_WORKER
        }
        self.limit = Gauge(
            "mprpc_server_adaptive_limit",
            "Calls the adaptive limiter admits at once",
            ["listener"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.shed = Gauge(
            "mprpc_worker_calls_shed",
            "Calls this worker's adaptive limiter shed since it started",
            ["listener"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.loop = LoopingCall(self.update)
        self.loop.clock = clock

    def start(self) -> None:
        d = self.loop.start(self.interval, now=True)
        d.addErrback(lambda f: log.failure("worker gauges stopped", f))

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def update(self) -> None:
        listeners = named_listeners(self.provider)
        factories = [f for _, f in listeners]
        served = sum(sum(codes.values()) for codes in self.metrics.totals.values())
        values = {
            "mprpc_server_calls_in_flight": self.provider.calls_in_flight,
            "mprpc_server_streams_in_flight": sum(f.streams_in_flight for f in factories),
            "mprpc_server_connections": sum(len(f.connections) for f in factories),
            "mprpc_worker_calls_served": served,
        }
        for name, value in values.items():
            self.gauges[name].set(value)
        for name, factory in listeners:
            limiter = getattr(factory, "limiter", None)
            if limiter is not None:
                self.limit.labels(name).set(limiter.limit)
                self.shed.labels(name).set(limiter.shed)


_HELP = {
    "mprpc_server_calls_in_flight": "Calls being handled by this worker (open streams included)",
    "mprpc_server_streams_in_flight": "Streams open on this worker",
    "mprpc_server_connections": "Open connections of this worker (every protocol)",
    "mprpc_worker_calls_served": "Calls this worker finished, every code, since it started",
}


def watch_worker(
    provider: Any, clock: IReactorTime, interval: float = GAUGE_INTERVAL
) -> WorkerGauges:
    """Count a worker's calls (its listeners' observer) and keep its gauges;
    the caller starts and stops the gauges. Call it with ``MULTIPROC_ENV`` set
    before prometheus_client was imported (the supervisor sets it)."""
    metrics = ProviderMetrics()
    for _, factory in named_listeners(provider):
        factory.observer = metrics
    return WorkerGauges(provider, metrics, clock, interval)


class WorkersMetrics(Service):
    """The supervisor's side: the directory (``path``, or a new one in the
    temp directory; made and given to ``workers`` as ``MULTIPROC_ENV`` when
    the service starts, removed when it stops), ``/metrics`` over it
    (:attr:`registry`) and what the status page needs (``totals``, ``rate``,
    ``latency_buckets``, ``messages`` as :class:`twisted_rpc.ops.ProviderMetrics`
    has them, and :meth:`status`).

    ``workers`` is the supervisor's worker set (``count``, ``live``,
    ``respawns``; each worker's ``pid``, ``slot``, ``started_at``, ``ready``,
    ``retiring``), ``provider`` the supervisor's provider (its registry)."""

    name = "worker-metrics"

    def __init__(
        self, clock: IReactorTime, workers: Any, provider: Any, path: str | None = None
    ) -> None:
        self.path = path
        self.clock = clock
        self.workers = workers
        self.registry = CollectorRegistry()
        self.collector: MultiProcessCollector | None = None
        """Over :attr:`path`, once started."""
        self.registry.register(_Files(self))
        self.registry.register(_SupervisorCollector(workers, provider))
        self.totals: dict[str, dict[str, int]] = {}
        self.history: deque[tuple[float, dict[str, int]]] = deque(maxlen=11)
        self.per_worker: dict[int, dict[str, float]] = {}
        self._latency: dict[str, list[tuple[float, float]]] = {}
        self._sampler = LoopingCall(self.sample)
        self._sampler.clock = clock

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # (not annotated)
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix="mprpc-metrics-")
        os.makedirs(self.path, exist_ok=True)
        self.workers.env[MULTIPROC_ENV] = self.path
        self.collector = MultiProcessCollector(None, path=self.path)  # type: ignore[no-untyped-call]
        d = self._sampler.start(1.0, now=True)
        d.addErrback(lambda f: log.failure("sampling the workers' metrics stopped", f))

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # (not annotated)
        if self._sampler.running:
            self._sampler.stop()
        self.collector = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def mark_dead(self, pid: int) -> None:
        """A worker exited: its live gauges go (its counts stay in the sums)."""
        if self.path is None:
            return
        try:
            mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]
        except OSError:
            log.failure("removing the files of worker {pid}", pid=pid)

    def refresh(self) -> None:
        """Read every worker's file once."""
        totals: dict[str, dict[str, int]] = {}
        latency: dict[str, list[tuple[float, float]]] = {}
        per_worker: dict[int, dict[str, float]] = {}
        for family in _Files(self).collect():
            for s in family.samples:
                labels = s.labels
                if s.name == "mprpc_server_calls_total":
                    by_code = totals.setdefault(f"{labels['service']}/{labels['method']}", {})
                    by_code[labels["code"]] = by_code.get(labels["code"], 0) + int(s.value)
                elif s.name == "mprpc_server_call_duration_seconds_bucket":
                    key = f"{labels['service']}/{labels['method']}"
                    latency.setdefault(key, []).append((float(labels["le"]), s.value))
                elif s.name in PER_WORKER and "pid" in labels:
                    row = per_worker.setdefault(int(labels["pid"]), {})
                    row[PER_WORKER[s.name]] = s.value
        for buckets in latency.values():
            buckets.sort()
        self.totals, self._latency, self.per_worker = totals, latency, per_worker

    def sample(self) -> None:
        self.refresh()
        counts = {method: sum(by_code.values()) for method, by_code in self.totals.items()}
        self.history.append((self.clock.seconds(), counts))

    def rate(self, method: str) -> float:
        """Calls per second of ``method`` over the last 10 s (every worker)."""
        if not self.history:
            return 0.0
        t0, first = self.history[0]
        now = sum(self.totals.get(method, {}).values())
        return (now - first.get(method, 0)) / max(self.clock.seconds() - t0, 1.0)

    def latency_buckets(self) -> dict[str, list[tuple[float, float]]]:
        return self._latency

    def messages(self) -> dict[str, tuple[int, int]]:
        """Stream messages are not kept across workers: none."""
        return {}

    def status(self) -> dict[str, Any]:
        """The status page's ``supervisor`` and ``workers`` (read afresh)."""
        self.refresh()
        now = self.clock.seconds()
        rows = []
        for worker in sorted(self.workers.live, key=lambda w: (w.slot < 0, w.slot, w.pid or 0)):
            figures = self.per_worker.get(worker.pid or 0, {})
            rows.append(
                {
                    "pid": worker.pid,
                    "slot": "spare" if worker.slot < 0 else worker.slot,
                    "started_at": worker.started_at,
                    "uptime_seconds": round(now - worker.started_at, 1),
                    "ready": worker.ready,
                    "retiring": worker.retiring,
                    "restarts": self.workers.respawns.get(worker.slot, 0),
                    **{key: int(figures.get(key, 0)) for key in PER_WORKER.values()},
                }
            )
        supervisor = {
            "pid": os.getpid(),
            "workers": self.workers.count,
            "ready": sum(1 for w in self.workers.live if w.ready and w.slot >= 0),
            "metrics_dir": self.path,
        }
        return {"supervisor": supervisor, "workers": rows}


class _Files(Collector):
    """The workers' files (nothing before the service starts)."""

    def __init__(self, metrics: WorkersMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        collector = self.metrics.collector
        if collector is None:
            return []
        return collector.collect()  # type: ignore[no-untyped-call,no-any-return]


class _SupervisorCollector(Collector):
    """The supervisor's own figures: workers ready, respawns by slot, registry."""

    def __init__(self, workers: Any, provider: Any) -> None:
        self.workers = workers
        self.provider = provider

    def collect(self) -> Iterable[Metric]:
        ready = GaugeMetricFamily("mprpc_workers_ready", "Workers serving (the spare not counted)")
        ready.add_metric([], sum(1 for w in self.workers.live if w.ready and w.slot >= 0))
        respawns = CounterMetricFamily(
            "mprpc_worker_respawns", "Workers respawned after dying, by slot", labels=["slot"]
        )
        for slot, n in sorted(self.workers.respawns.items()):
            respawns.add_metric(["spare" if slot < 0 else str(slot)], n)
        registry = self.provider.registry
        zk = getattr(registry, "zk", None)
        connected = GaugeMetricFamily(
            "mprpc_registry_zookeeper_connected",
            "1 while the ZooKeeper session is connected (-1: no ZooKeeper registry)",
        )
        connected.add_metric([], -1 if zk is None else int(zk.connected))
        nodes = GaugeMetricFamily(
            "mprpc_registry_nodes", "Registrations this provider keeps in its registry"
        )
        nodes.add_metric([], len(registry.registrations))
        return [ready, respawns, connected, nodes]
