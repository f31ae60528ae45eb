"""The workers' metrics (``workers`` > 1 with ``[admin]``): fake workers
writing prometheus_client multiprocess files in a temp directory (a value
class bound to a fake pid, as prometheus_client's own tests do), read by
the supervisor's :class:`WorkersMetrics`."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest, values
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.values import MultiProcessValue
from twisted.internet.task import Clock

from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from tests.helpers import failure_of
from tests.unit.ops.test_stream_ops import _Provider
from twisted_rpc import ServerLimits, StatusCode
from twisted_rpc.ops._admin import render_status, status_data
from twisted_rpc.ops._worker_metrics import MULTIPROC_ENV, WorkersMetrics, watch_worker
from twisted_rpc.testing import MemoryProvider

OK = (("code", "OK"), ("method", "Echo"), ("service", "mprpc.test.EchoService"))


@pytest.fixture
def directory(tmp_path, monkeypatch):
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    original = values.ValueClass
    yield tmp_path
    values.ValueClass = original


class FakeWorker:
    """A worker's provider and gauges, its values in ``pid``'s files."""

    def __init__(self, pid: int, clock: Clock, limits: ServerLimits | None = None) -> None:
        values.ValueClass = MultiProcessValue(lambda: pid)
        self.memory = MemoryProvider([EchoService()], limits=limits)
        self.gauges = watch_worker(_Provider(self.memory), clock)

    def calls(self, n: int) -> None:
        echo = self.memory.proxy(EchoService)
        for _ in range(n):
            self.memory.run(echo.Echo(echo_pb2.EchoRequest()))


def worker_set():
    def worker(pid, slot, ready=True):
        return SimpleNamespace(pid=pid, slot=slot, started_at=0.0, ready=ready, retiring=False)

    return SimpleNamespace(
        count=2,
        live=[worker(1001, 0), worker(1002, 1), worker(1003, -1, ready=False)],
        respawns={1: 1},
        env={},
    )


def scraped(metrics: WorkersMetrics) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def two_workers(directory, clock):
    first, second = FakeWorker(1001, clock), FakeWorker(1002, clock)
    first.calls(3)
    second.calls(5)
    for worker in (first, second):
        worker.gauges.start()  # (set at once, then every second)
    provider = _Provider(first.memory)
    metrics = WorkersMetrics(clock, worker_set(), provider, str(directory))
    metrics.startService()
    return first, second, provider, metrics


def test_calls_are_summed_over_the_workers_and_live_figures_kept_per_worker(directory):
    clock = Clock()
    _, second, _, metrics = two_workers(directory, clock)
    samples = scraped(metrics)
    assert samples[("mprpc_server_calls_total", OK)] == 8
    assert samples[("mprpc_server_call_duration_seconds_count", OK[1:])] == 8
    served = {k[1]: v for k, v in samples.items() if k[0] == "mprpc_worker_calls_served"}
    assert served == {(("pid", "1001"),): 3, (("pid", "1002"),): 5}
    assert samples[("mprpc_server_connections", (("pid", "1002"),))] == 1
    assert samples[("mprpc_workers_ready", ())] == 2
    assert samples[("mprpc_worker_respawns_total", (("slot", "1"),))] == 1
    assert samples[("mprpc_registry_zookeeper_connected", ())] == -1

    second.calls(2)  # the gauge follows on the next tick, not per call
    assert scraped(metrics)[("mprpc_worker_calls_served", (("pid", "1002"),))] == 5
    clock.advance(1.0)
    samples = scraped(metrics)
    assert samples[("mprpc_worker_calls_served", (("pid", "1002"),))] == 7
    assert samples[("mprpc_server_calls_total", OK)] == 10


def test_a_dead_workers_gauges_go_and_its_calls_stay_counted(directory):
    _, _, _, metrics = two_workers(directory, Clock())
    metrics.mark_dead(1001)
    metrics.mark_dead(1001)  # (twice: nothing left to remove)
    samples = scraped(metrics)
    served = {k[1]: v for k, v in samples.items() if k[0] == "mprpc_worker_calls_served"}
    assert served == {(("pid", "1002"),): 5}
    assert samples[("mprpc_server_calls_total", OK)] == 8


def test_status_has_a_row_per_worker_and_the_calls_of_all(directory):
    clock = Clock()
    _, second, provider, metrics = two_workers(directory, clock)
    clock.advance(5.0)
    second.calls(10)
    clock.advance(5.0)
    data = status_data(provider, metrics, metrics)  # type: ignore[arg-type]
    rows = {w["pid"]: w for w in data["workers"]}
    assert [w["pid"] for w in data["workers"]] == [1001, 1002, 1003]
    assert (rows[1001]["slot"], rows[1001]["calls_served"], rows[1001]["restarts"]) == (0, 3, 0)
    assert (rows[1002]["slot"], rows[1002]["calls_served"], rows[1002]["restarts"]) == (1, 15, 1)
    assert (rows[1003]["slot"], rows[1003]["ready"], rows[1003]["calls_served"]) == (
        "spare",
        False,
        0,
    )
    assert rows[1002]["connections"] == 1 and rows[1002]["uptime_seconds"] == 10.0
    assert data["supervisor"]["ready"] == 2 and data["supervisor"]["workers"] == 2
    echo = next(
        m
        for s in data["services"]
        if s["name"] == "mprpc.test.EchoService"
        for m in s["methods"]
        if m["name"] == "Echo"
    )
    assert echo["calls"] == 18
    assert echo["calls_per_second"] == 1.0  # (10 calls in the last 10 s)
    assert echo["p50_ms"] is not None
    page = render_status(data, 0)
    assert '<td class="pid">1002</td><td class="slot">1</td>' in page
    assert '<span id="workers-ready">2</span> of 2 ready' in page
    metrics.stopService()
    assert not directory.exists()


def test_the_directory_is_made_when_started_given_to_the_workers_and_removed_on_stop():
    workers = worker_set()
    metrics = WorkersMetrics(Clock(), workers, _Provider(MemoryProvider([EchoService()])))
    assert metrics.path is None and workers.env == {}
    assert b"mprpc_server_calls_total" not in generate_latest(metrics.registry)
    metrics.startService()
    assert metrics.path is not None and os.path.isdir(metrics.path)
    assert os.path.basename(metrics.path).startswith("mprpc-metrics-")
    assert workers.env == {MULTIPROC_ENV: metrics.path}
    assert scraped(metrics)[("mprpc_workers_ready", ())] == 2
    metrics.mark_dead(1001)  # (no files: nothing to remove)
    metrics.stopService()
    assert not os.path.exists(metrics.path)


def test_the_adaptive_limit_and_calls_shed_are_kept_per_worker(directory):
    clock = Clock()
    limits = ServerLimits(adaptive_limit=True, adaptive_min_limit=1, adaptive_max_limit=1)
    worker = FakeWorker(1001, clock, limits)
    echo = worker.memory.proxy(EchoService)
    slow = echo.AsyncEcho(echo_pb2.EchoRequest(delay=1.0))
    worker.memory.flush()
    shed = echo.AsyncEcho(echo_pb2.EchoRequest(delay=1.0))
    worker.memory.flush()
    assert failure_of(shed).code == StatusCode.UNAVAILABLE
    worker.gauges.start()
    metrics = WorkersMetrics(clock, worker_set(), _Provider(worker.memory), str(directory))
    metrics.startService()
    samples = scraped(metrics)
    labels = (("listener", "native"), ("pid", "1001"))
    assert samples[("mprpc_server_adaptive_limit", labels)] == 1
    assert samples[("mprpc_worker_calls_shed", labels)] == 1
    assert samples[("mprpc_server_calls_in_flight", labels[1:])] == 1
    worker.memory.advance(1.0)
    worker.memory.result(slow)
    metrics.stopService()
