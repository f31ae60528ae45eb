"""Integration: a provider's admin endpoint — Prometheus metrics parsed by prometheus_client's
parser, the JSON status, and the status page read in a real headless Chromium."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from examples.protos import user_pb2
from testbed.echo_service import ECHO, STREAMS
from testbed.processes import SERVICES, Provider
from testbed.protos import echo_pb2
from twisted_rpc import Client, NotFoundError
from twisted_rpc.core._connection import RefusedConnection
from twisted_rpc.ops import ClientMetrics, ProviderMetrics, admin_site
from twisted_rpc.ops._admin import MAX_REFRESH, REFUSAL_LOG_INTERVAL

pytestmark = pytest.mark.integration

USER = user_pb2.DESCRIPTOR.services_by_name["UserService"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def samples(text: str, name: str) -> dict[tuple, float]:
    """``{sorted label items: value}`` of the samples called ``name``."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def read_status_page(url: str, screenshot: str) -> dict[str, str]:
    """Load the page in headless Chromium; the texts the test checks, by CSS selector."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    assert os.access(CHROMIUM, os.X_OK), "Chromium missing: make browser installs it"
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tempfile.mkdtemp()}",
        "--window-size=1200,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        texts = {}
        for selector in (
            'tr[data-method="example.UserService/Login"] td.calls',
            'tr[data-method="example.UserService/Login"] td.p50',
            'tr[data-method="example.UserService/Login"] td.errors',
            'tr[data-method="mprpc.test.EchoService/Echo"] td.calls',
            'tr[data-method="mprpc.test.EchoService/Echo"] td.errors',
            'tr[data-method="mprpc.test.EchoService/AsyncEcho"] td.p99',
            'tr[data-method="example.UserService/Login"] td.health',
            "#connection-count",
            "#connections td.peer",
            "#unknown",
            "#registry-kind",
            "#health",
            "#pid",
        ):
            texts[selector] = driver.find_element(By.CSS_SELECTOR, selector).text
        driver.save_screenshot(screenshot)
        return texts
    finally:
        driver.quit()


class AdminTests(TestCase):
    timeout = 120

    async def _calls(self):
        provider = Provider(
            Path(tempfile.mkdtemp()),
            "slow_call_threshold = 0.2\n[admin]\nlisten = tcp:0:interface=127.0.0.1\n",
        )
        self.addCleanup(provider.stop)
        match = await deferToThread(
            provider.wait_for_output, r"admin endpoint on (http://127\.0\.0\.1:\d+)/"
        )
        base = match[1]
        metrics = ClientMetrics(reactor)
        client = Client(
            reactor,
            providers={name: [provider.address] for name in (USER.full_name, ECHO.full_name)},
            interceptors=[metrics],
            timeout=10,
        )
        self.addCleanup(client.close)
        users, echo = client.proxy(USER), client.proxy(ECHO)
        login = user_pb2.LoginRequest(name="zhang san", pwd="123456")
        await gatherResults([users.Login(login) for _ in range(7)])
        await gatherResults([echo.Echo(echo_pb2.EchoRequest()) for _ in range(2)])
        for _ in range(3):
            with self.assertRaises(NotFoundError):
                await echo.Echo(echo_pb2.EchoRequest(fail_code=5))
        await echo.AsyncEcho(echo_pb2.EchoRequest(delay=0.3))
        return provider, base, client, metrics

    async def test_metrics_and_json_match_the_calls_made(self) -> None:
        provider, base, client, client_metrics = await self._calls()
        text = await deferToThread(fetch, base + "/metrics")
        calls = samples(text, "mprpc_server_calls_total")
        login = (("code", "OK"), ("method", "Login"), ("service", "example.UserService"))
        echo_ok = (("code", "OK"), ("method", "Echo"), ("service", "mprpc.test.EchoService"))
        echo_nf = (
            ("code", "NOT_FOUND"),
            ("method", "Echo"),
            ("service", "mprpc.test.EchoService"),
        )
        self.assertEqual(calls[login], 7)
        self.assertEqual(calls[echo_ok], 2)
        self.assertEqual(calls[echo_nf], 3)
        counts = samples(text, "mprpc_server_call_duration_seconds_count")
        self.assertEqual(counts[(("method", "Echo"), ("service", "mprpc.test.EchoService"))], 5)
        self.assertEqual(samples(text, "mprpc_server_connections")[()], 1)
        self.assertEqual(samples(text, "mprpc_server_calls_in_flight")[()], 0)
        self.assertEqual(samples(text, "mprpc_registry_zookeeper_connected")[()], -1)
        # The consumer's own counters agree.
        mine = {
            tuple(sorted(s.labels.items())): s.value
            for family in client_metrics.registry.collect()
            for s in family.samples
            if s.name == "mprpc_client_calls_total"
        }
        self.assertEqual((mine[login], mine[echo_ok], mine[echo_nf]), (7, 2, 3))
        client_metrics.watch_client(client)
        gauges = {
            s.name: s.value for family in client_metrics.registry.collect() for s in family.samples
        }
        self.assertEqual(gauges["mprpc_client_calls_in_flight"], 0)
        self.assertEqual(gauges["mprpc_client_connections"], 1)
        status = json.loads(await deferToThread(fetch, base + "/status.json"))
        by_method = {
            f"{s['name']}/{m['name']}": m for s in status["services"] for m in s["methods"]
        }
        self.assertEqual(by_method["mprpc.test.EchoService/Echo"]["errors"], {"NOT_FOUND": 3})
        self.assertGreaterEqual(by_method["mprpc.test.EchoService/AsyncEcho"]["p50_ms"], 250)
        self.assertGreater(by_method["example.UserService/Login"]["calls_per_second"], 0)
        self.assertEqual(status["provider"]["pid"], provider.pid)
        slow = await deferToThread(
            provider.wait_for_output, r"slow call \d+ mprpc.test.EchoService/AsyncEcho"
        )
        self.assertIsNotNone(slow)
        self.assertRegex(provider.output, r"failed: NOT_FOUND .*\(\d+\.\d ms\)")

    async def test_status_page_in_a_browser_shows_the_calls_made(self) -> None:
        provider, base, client, _ = await self._calls()
        (channel,) = client.channels.values()
        local = channel.protocol.transport.getHost()
        screenshot = os.environ.get("STATUS_SCREENSHOT") or str(
            Path(tempfile.mkdtemp()) / "status.png"
        )
        texts = await deferToThread(read_status_page, base + "/status?refresh=0", screenshot)
        self.assertEqual(texts['tr[data-method="example.UserService/Login"] td.calls'], "7")
        self.assertEqual(texts['tr[data-method="example.UserService/Login"] td.errors'], "–")
        self.assertGreater(float(texts['tr[data-method="example.UserService/Login"] td.p50']), 0)
        self.assertEqual(texts['tr[data-method="mprpc.test.EchoService/Echo"] td.calls'], "5")
        self.assertEqual(
            texts['tr[data-method="mprpc.test.EchoService/Echo"] td.errors'], "NOT_FOUND 3"
        )
        self.assertGreaterEqual(
            float(texts['tr[data-method="mprpc.test.EchoService/AsyncEcho"] td.p99']), 250
        )
        self.assertEqual(texts['tr[data-method="example.UserService/Login"] td.health'], "SERVING")
        self.assertEqual(texts["#connection-count"], "1")
        self.assertEqual(texts["#connections td.peer"], f"127.0.0.1:{local.port}")
        self.assertEqual(texts["#unknown"], "0")
        self.assertEqual(texts["#registry-kind"], "static")
        self.assertEqual(texts["#health"], "SERVING")
        self.assertEqual(texts["#pid"], str(provider.pid))
        with open(screenshot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


class StreamAdminTests(TestCase):
    timeout = 120

    async def test_metrics_and_status_show_open_streams_and_their_ends(self) -> None:
        provider = Provider(
            Path(tempfile.mkdtemp()),
            "[admin]\nlisten = tcp:0:interface=127.0.0.1\n",
            services=f"{SERVICES} testbed.echo_service:StreamService",
        )
        self.addCleanup(provider.stop)
        match = await deferToThread(
            provider.wait_for_output, r"admin endpoint on (http://127\.0\.0\.1:\d+)/"
        )
        base = match[1]
        client = Client(reactor, providers={STREAMS.full_name: [provider.address]})
        self.addCleanup(client.close)
        proxy = client.proxy(STREAMS)
        held = proxy.Count(echo_pb2.CountRequest(forever=True))
        for _ in range(10):
            await held.read()
        total = await proxy.Sum([echo_pb2.EchoRequest(payload=b"ab")] * 5)
        self.assertEqual(total.call_id, 5)
        text = await deferToThread(fetch, base + "/metrics")
        count = (("method", "Count"), ("service", STREAMS.full_name))
        self.assertEqual(samples(text, "mprpc_server_streams_open")[count], 1)
        self.assertEqual(samples(text, "mprpc_server_streams_in_flight")[()], 1)
        self.assertEqual(samples(text, "mprpc_server_calls_in_flight")[()], 1)
        self.assertGreaterEqual(samples(text, "mprpc_server_stream_messages_sent_total")[count], 10)
        received = samples(text, "mprpc_server_stream_messages_received_total")
        self.assertEqual(received[(("method", "Sum"), ("service", STREAMS.full_name))], 5)
        status = json.loads(await deferToThread(fetch, base + "/status.json"))
        self.assertEqual(status["provider"]["streams_in_flight"], 1)
        (connection,) = status["connections"]
        self.assertEqual(connection["streams"], 1)
        by_method = {
            f"{s['name']}/{m['name']}": m for s in status["services"] for m in s["methods"]
        }
        self.assertEqual(by_method[f"{STREAMS.full_name}/Count"]["open_streams"], 1)
        self.assertEqual(by_method[f"{STREAMS.full_name}/Count"]["kind"], "server stream")
        page = await deferToThread(fetch, base + "/status?refresh=0")
        self.assertIn('<b id="streams-in-flight">1</b>', page)
        held.cancel()
        text = await deferToThread(_when, base + "/metrics", "mprpc_server_streams_open", count, 0)
        finished = samples(text, "mprpc_server_streams_finished_total")
        self.assertEqual(finished[(("code", "CANCELLED"), *count)], 1)
        self.assertEqual(finished[(("code", "OK"), ("method", "Sum"), count[1])], 1)


def _when(url: str, name: str, labels: tuple, value: float, within: float = 10.0) -> str:
    """The metrics text once sample ``name{labels}`` is ``value`` (the provider
    learns of a cancel a moment after the consumer sends it)."""
    deadline = time.monotonic() + within
    while True:
        text = fetch(url)
        if samples(text, name).get(labels) == value or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


class JsonLogTests(TestCase):
    timeout = 60

    async def test_json_log_lines_carry_the_call_fields(self) -> None:
        provider = Provider(Path(tempfile.mkdtemp()), "log_format = json\n")
        self.addCleanup(provider.stop)
        client = Client(reactor, providers={ECHO.full_name: [provider.address]}, timeout=10)
        self.addCleanup(client.close)
        with self.assertRaises(NotFoundError):
            await client.proxy(ECHO).Echo(echo_pb2.EchoRequest(fail_code=5, fail_message="gone"))
        await deferToThread(provider.wait_for_output, "failed: NOT_FOUND gone")
        records = [json.loads(line) for line in provider.lines if line.startswith("{")]
        self.assertTrue(records)
        self.assertEqual(len(records), len(provider.lines))  # every line is JSON
        (failed,) = [r for r in records if r.get("code") == "NOT_FOUND"]
        self.assertEqual(failed["method"], "mprpc.test.EchoService/Echo")
        self.assertEqual(failed["service"], "mprpc.test.EchoService")
        self.assertRegex(failed["peer"], r"^127\.0\.0\.1:\d+$")
        self.assertIsInstance(failed["call_id"], int)
        self.assertGreaterEqual(failed["duration_ms"], 0)
        self.assertEqual(failed["level"], "info")


class _Provider:
    """What admin_site needs of a provider to build (not to render)."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor


def _closed(sock) -> bytes:
    """What a refused connection reads: nothing (closed, by FIN or by RST)."""
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""


def test_admin_connections_over_the_cap_are_closed_and_logged(logged):
    clock = MemoryReactorClock()
    factory = admin_site(_Provider(clock), ProviderMetrics(), max_connections=2)
    factory.doStart()
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    first, second = factory.buildProtocol(peer), factory.buildProtocol(peer)
    transports = [StringTransport(), StringTransport()]
    first.makeConnection(transports[0])
    second.makeConnection(transports[1])
    assert factory.open_connections == 2
    for _ in range(50):
        assert isinstance(factory.buildProtocol(peer), RefusedConnection)  # closed at once
    assert factory.refused == 50
    refusals = [e for e in logged if "max_connections" in e.get("log_format", "")]
    assert len(refusals) == 1  # one line per REFUSAL_LOG_INTERVAL, not one per connection
    clock.advance(REFUSAL_LOG_INTERVAL)
    assert isinstance(factory.buildProtocol(peer), RefusedConnection)
    refusals = [e for e in logged if "max_connections" in e.get("log_format", "")]
    assert len(refusals) == 2 and refusals[-1]["count"] == 50  # refused since the last line
    first.connectionLost(Failure(ConnectionDone()))
    assert factory.open_connections == 1
    assert not isinstance(factory.buildProtocol(peer), RefusedConnection)


def test_idle_admin_connections_are_closed():
    clock = MemoryReactorClock()
    factory = admin_site(_Provider(clock), ProviderMetrics(), idle_timeout=7)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /sta")  # a request that never ends
    clock.advance(6.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_admin_max_connections_must_be_positive():
    with pytest.raises(ValueError, match="max_connections"):
        admin_site(_Provider(MemoryReactorClock()), ProviderMetrics(), max_connections=0)


class AdminLimitTests(TestCase):
    timeout = 60

    async def test_bad_refresh_is_a_400_and_connections_are_capped(self) -> None:
        provider = Provider(
            Path(tempfile.mkdtemp()),
            "[admin]\nlisten = tcp:0:interface=127.0.0.1\nmax_connections = 3\n",
        )
        self.addCleanup(provider.stop)
        match = await deferToThread(
            provider.wait_for_output, r"admin endpoint on (http://127\.0\.0\.1:(\d+))/"
        )
        base, port = match[1], int(match[2])
        for refresh in ("inf", "-inf", "nan", "-1", "abc"):
            code = await deferToThread(status_code, f"{base}/status?refresh={refresh}")
            self.assertEqual(code, 400, refresh)
        page = await deferToThread(fetch, f"{base}/status?refresh=1e308")
        self.assertIn(f"{int(MAX_REFRESH * 1000)});", page)  # cut to an hour
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            await deferToThread(_wait_open, base, held)
            extra = socket.create_connection(("127.0.0.1", port), timeout=5)
            with extra:
                self.assertEqual(await deferToThread(_closed, extra), b"")  # closed at once
            await deferToThread(provider.wait_for_output, r"refused 1 connection\(s\)")
        finally:
            for s in held:
                s.close()
        # Served again once the provider has seen the held connections close.
        status = json.loads(await deferToThread(_fetch_when_served, base + "/status.json"))
        self.assertEqual(status["provider"]["pid"], provider.pid)


def _fetch_when_served(url: str, within: float = 10.0) -> str:
    """``fetch(url)``, tried again while the admin endpoint still refuses
    connections (it counts closed ones as open until it has read their close)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return fetch(url)
        except (ConnectionResetError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def status_code(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_open(base: str, held: list[socket.socket]) -> None:
    """The held connections are accepted (a request on each is answered)."""
    for s in held[:-1]:
        s.sendall(b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(12).startswith(b"HTTP/1.1 200")
