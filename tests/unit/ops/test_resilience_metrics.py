"""Resilience metrics, read at each scrape: the adaptive limiter's shed calls
and figures, compression bytes on both sides, a consumer's ejections."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred

from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import failure_of
from tests.unit.ops.test_stream_ops import _Provider
from twisted_rpc import ClientOptions, RpcError, ServerLimits, StatusCode
from twisted_rpc.client._balancer import EJECTED
from twisted_rpc.ops import ClientMetrics, ProviderMetrics
from twisted_rpc.ops._admin import render_status, status_data
from twisted_rpc.testing import MemoryProvider

NATIVE = (("listener", "native"),)


@pytest.fixture(autouse=True)
def _no_ejections_left():
    yield
    EJECTED.clear()  # the process-wide set: ejections here never leak into other tests


BIG = b"abcdefgh" * 1024  # 8 KiB that compress well


def scraped(registry) -> dict[tuple, float]:
    """``{(sample name, sorted label items): value}`` as Prometheus would read them."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def provider_metrics(memory: MemoryProvider) -> ProviderMetrics:
    metrics = ProviderMetrics()
    metrics.watch_resilience(memory)
    return metrics


def client_metrics(memory: MemoryProvider) -> ClientMetrics:
    metrics = ClientMetrics(memory.reactor)
    metrics.watch_client(memory.client)
    return metrics


def echo(memory: MemoryProvider, method: str = "Echo", **fields: object) -> Deferred:
    d: Deferred = getattr(memory.proxy(ECHO), method)(echo_pb2.EchoRequest(**fields))  # type: ignore[arg-type]
    memory.flush()
    return d


def fail(memory: MemoryProvider, code: StatusCode) -> None:
    """A call the provider fails with ``code``, answered."""
    error = failure_of(echo(memory, fail_code=code))
    assert isinstance(error, RpcError) and error.code == code, error


# ---------------------------------------------------------------- provider


def test_shed_calls_and_the_limiters_figures_per_listener() -> None:
    limits = ServerLimits(adaptive_limit=True, adaptive_min_limit=1, adaptive_max_limit=2)
    memory = MemoryProvider([EchoService()], limits=limits)
    metrics = provider_metrics(memory)
    before = scraped(metrics.registry)
    assert before[("mprpc_server_calls_shed_total", NATIVE)] == 0
    assert before[("mprpc_server_adaptive_limit", NATIVE)] == 2
    assert before[("mprpc_server_adaptive_no_load_latency_seconds", NATIVE)] == 0
    assert before[("mprpc_server_adaptive_cpu_bound", NATIVE)] == 2  # not measured: max_limit

    slow = [echo(memory, "AsyncEcho", delay=1.0) for _ in range(2)]  # the limit's two slots
    shed = [echo(memory, "AsyncEcho", delay=1.0) for _ in range(3)]
    assert [d.called for d in slow] == [False, False]
    assert all(failure_of(d).code == StatusCode.UNAVAILABLE for d in shed)  # marked not run
    assert scraped(metrics.registry)[("mprpc_server_calls_shed_total", NATIVE)] == 3

    memory.advance(1.0)  # the slow calls finish: latency samples (a window is 50 calls)
    assert [memory.result(d).payload for d in slow] == [b"", b""]
    after = scraped(metrics.registry)
    assert after[("mprpc_server_calls_shed_total", NATIVE)] == 3
    assert after[("mprpc_server_adaptive_limit", NATIVE)] == memory.factory.limiter.limit
    assert after[("mprpc_server_adaptive_current_latency_seconds", NATIVE)] == (
        memory.factory.limiter.current
    )


def test_no_limiter_no_limiter_samples_but_compression_is_there() -> None:
    memory = MemoryProvider([EchoService()])
    samples = scraped(provider_metrics(memory).registry)
    assert not [key for key in samples if "adaptive" in key[0] or "shed" in key[0]]
    assert samples[("mprpc_server_compression_input_bytes_total", NATIVE)] == 0
    assert samples[("mprpc_server_compression_output_bytes_total", NATIVE)] == 0


def test_compression_bytes_on_both_sides_and_closed_connections_kept() -> None:
    memory = MemoryProvider([EchoService()], client_options=ClientOptions(compression="zlib"))
    server, client = provider_metrics(memory), client_metrics(memory)
    assert memory.result(echo(memory, payload=BIG)).payload == BIG
    up, down = scraped(client.registry), scraped(server.registry)
    for samples, labels in ((up, ()), (down, NATIVE)):
        raw = samples[
            (f"mprpc_{'client' if not labels else 'server'}_compression_input_bytes_total", labels)
        ]
        packed = samples[
            (f"mprpc_{'client' if not labels else 'server'}_compression_output_bytes_total", labels)
        ]
        assert raw >= len(BIG)
        assert 0 < packed < raw / 20

    memory.break_connections()  # the counts of closed connections stay
    again_up, again_down = scraped(client.registry), scraped(server.registry)
    assert (
        again_up[("mprpc_client_compression_input_bytes_total", ())]
        == (up[("mprpc_client_compression_input_bytes_total", ())])
    )
    assert (
        again_down[("mprpc_server_compression_output_bytes_total", NATIVE)]
        == (down[("mprpc_server_compression_output_bytes_total", NATIVE)])
    )

    memory.advance(5.0)  # the channel dials again; a second call adds to the totals
    assert memory.result(echo(memory, payload=BIG)).payload == BIG
    third = scraped(client.registry)
    assert third[("mprpc_client_compression_input_bytes_total", ())] >= 2 * len(BIG)


# ---------------------------------------------------------------- consumer


def test_ejections_counted_and_the_ejected_gauge_follows_the_health_probe() -> None:
    options = ClientOptions(consecutive_failures=2, base_ejection_time=1.0, max_ejection_time=10.0)
    memory = MemoryProvider([EchoService()], builtins=True, client_options=options)
    metrics = client_metrics(memory)

    fail(memory, StatusCode.UNAVAILABLE)
    samples = scraped(metrics.registry)
    assert samples[("mprpc_client_ejections_total", ())] == 0
    assert samples[("mprpc_client_providers_ejected", ())] == 0

    fail(memory, StatusCode.UNAVAILABLE)  # the second in a row: ejected
    samples = scraped(metrics.registry)
    assert samples[("mprpc_client_ejections_total", ())] == 1
    assert samples[("mprpc_client_providers_ejected", ())] == 1

    memory.advance(1.2)  # past the period: Health answers SERVING, it is back
    samples = scraped(metrics.registry)
    assert samples[("mprpc_client_ejections_total", ())] == 1
    assert samples[("mprpc_client_providers_ejected", ())] == 0

    fail(memory, StatusCode.UNAVAILABLE)
    fail(memory, StatusCode.UNAVAILABLE)  # ejected again soon after: counted, not lost
    samples = scraped(metrics.registry)
    assert samples[("mprpc_client_ejections_total", ())] == 2
    assert samples[("mprpc_client_providers_ejected", ())] == 1


def test_ejections_seen_only_between_scrapes_are_counted() -> None:
    options = ClientOptions(consecutive_failures=1, base_ejection_time=1.0, max_ejection_time=10.0)
    memory = MemoryProvider([EchoService()], builtins=True, client_options=options)
    metrics = client_metrics(memory)
    scraped(metrics.registry)
    for _ in range(2):  # ejected and back twice, nobody scraping
        fail(memory, StatusCode.INTERNAL)
        memory.advance(3.0)
    samples = scraped(metrics.registry)
    assert samples[("mprpc_client_ejections_total", ())] == 2
    assert samples[("mprpc_client_providers_ejected", ())] == 0
    # long (> max_ejection_time) in rotation: the accrual's count restarts from 1
    memory.advance(30.0)
    fail(memory, StatusCode.INTERNAL)
    samples = scraped(metrics.registry)
    assert samples[("mprpc_client_ejections_total", ())] == 3
    assert samples[("mprpc_client_providers_ejected", ())] == 1


def test_status_page_shows_the_adaptive_limit_only_when_on() -> None:
    limits = ServerLimits(adaptive_limit=True, adaptive_min_limit=1, adaptive_max_limit=1)
    memory = MemoryProvider([EchoService()], limits=limits)
    metrics = ProviderMetrics()
    memory.factory.observer = metrics
    slow = echo(memory, "AsyncEcho", delay=1.0)
    assert failure_of(echo(memory, "AsyncEcho", delay=1.0)).code == StatusCode.UNAVAILABLE
    data = status_data(_Provider(memory), metrics)
    assert data["adaptive_limit"] == {
        "native": {
            "limit": 1,
            "shed": 1,
            "no_load_ms": 0.0,
            "current_ms": 0.0,
            "cpu_bound": 1,
            "busy": 0.0,
        }
    }
    assert "adaptive limit <b>1</b>, calls shed <b>1</b>" in render_status(data, 0)
    memory.advance(1.0)
    memory.result(slow)

    plain = MemoryProvider([EchoService()])
    data = status_data(_Provider(plain), ProviderMetrics())
    assert data["adaptive_limit"] == {}
    assert "adaptive limit" not in render_status(data, 0)


def test_retries_and_ejections_by_provider_and_shed_calls_counted_as_they_happen() -> None:
    options = ClientOptions(consecutive_failures=2, base_ejection_time=1.0, max_ejection_time=10.0)
    limits = ServerLimits(adaptive_limit=True, adaptive_min_limit=1, adaptive_max_limit=1)
    memory = MemoryProvider([EchoService()], builtins=True, client_options=options, limits=limits)
    metrics = client_metrics(memory)
    idempotent = memory.proxy(ECHO, idempotent=True)  # retried once after UNAVAILABLE
    d = idempotent.Echo(echo_pb2.EchoRequest(fail_code=StatusCode.UNAVAILABLE))
    memory.flush()
    error = failure_of(d)
    assert isinstance(error, RpcError) and "2 attempts" in error.message
    (channel,) = memory.client.channels.values()
    provider = (("provider", str(channel.address)),)
    samples = scraped(metrics.registry)
    method = (("method", "Echo"), ("service", "mprpc.test.EchoService"))
    assert samples[("mprpc_client_retries_total", (("code", "UNAVAILABLE"), *method))] == 1
    assert samples[("mprpc_client_provider_ejections_total", provider)] == 1  # 2 in a row
    memory.advance(1.2)  # the Health probe: back
    assert scraped(metrics.registry)[("mprpc_client_provider_returns_total", provider)] == 1

    slow = echo(memory, "AsyncEcho", delay=1.0)  # the limit's one slot
    shed = echo(memory, "AsyncEcho", delay=1.0)
    assert failure_of(shed).code == StatusCode.UNAVAILABLE
    samples = scraped(metrics.registry)
    assert samples[("mprpc_client_calls_shed_total", provider)] == 1
    memory.advance(1.0)
    assert memory.result(slow).payload == b""
