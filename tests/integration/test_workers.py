"""Integration: ``twistd -n mprpc`` with ``workers = 2`` (a supervisor and two
worker processes on one socket), called by clients of this process; every
process is stopped by PID, workers included."""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from tests.integration.test_tls import issue, make_ca
from twisted_rpc import Client, ClientTLS, UnavailableError

pytestmark = pytest.mark.integration

_READY = re.compile(r"worker (\d+) ready")
_STARTED = re.compile(r"worker (\d+) started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of the supervisor counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class WorkersTests(TestCase):
    """``worker_sockets = reuseport`` (the default)."""

    timeout = 90
    sockets = "reuseport"

    def start(self, sections: str = "", directory: Path | None = None) -> Provider:
        extra = f"workers = 2\ngrace_period = 3\nworker_sockets = {self.sockets}\n{sections}"
        directory = directory or Path(tempfile.mkdtemp())
        provider = Provider(directory, extra, ready=" ready")
        self.addCleanup(self._stop_all, provider)
        self.wait_ready(provider, 2)
        deadline = time.monotonic() + 20
        while "loaded as the spare" not in provider.output and time.monotonic() < deadline:
            time.sleep(0.01)
        return provider

    def workers(self, provider: Provider) -> list[int]:
        return [int(pid) for pid in _READY.findall(provider.output)]

    def started(self, provider: Provider) -> list[int]:
        """Every worker spawned, the spare included."""
        return [int(pid) for pid in _STARTED.findall(provider.output)]

    def wait_ready(self, provider: Provider, count: int, timeout: float = 20) -> float:
        """Seconds until ``count`` workers have said they are ready in all."""
        started = time.monotonic()
        while len(self.workers(provider)) < count:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{count} workers not ready:\n{provider.output}")
            time.sleep(0.01)
        return time.monotonic() - started

    def _stop_all(self, provider: Provider) -> None:
        provider.stop()
        for pid in self.started(provider):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def client(self, provider: Provider) -> Client:
        """A client of one connection, so of one worker (consumers' pools of a
        connection per worker: test_workers_cluster.py)."""
        client = Client(
            reactor,
            providers={"mprpc.test.EchoService": [provider.address]},
            connections_per_provider=1,
        )
        self.addCleanup(client.close)
        return client

    async def pids_seen(self, provider: Provider, clients: int = 16) -> set[int]:
        """The workers that answered, one new connection per client."""
        seen: set[int] = set()
        for _ in range(clients):
            reply = await self.client(provider).proxy(ECHO).Echo(echo_pb2.EchoRequest())
            seen.add(reply.pid)
            if len(seen) == 2:
                break
        return seen

    async def test_calls_reach_both_workers_and_not_the_supervisor(self) -> None:
        provider = self.start()
        seen = await self.pids_seen(provider)
        self.assertEqual(seen, set(self.workers(provider)))
        self.assertNotIn(provider.pid, seen)
        await self.output_has(provider, r"\[worker \d+\] .*provider listening on")

    async def output_has(self, provider: Provider, pattern: str) -> None:
        """``pattern`` in the output within 5 s (a worker's log and its
        ready line come by two pipes, in either order)."""
        for _ in range(100):
            if re.search(pattern, provider.output):
                return
            await sleep(0.05)
        self.fail(f"no {pattern!r} in:\n{provider.output}")

    async def test_workers_stop_when_the_supervisor_is_killed(self) -> None:
        provider = self.start()
        workers = self.started(provider)
        provider.signal(signal.SIGKILL)
        for _ in range(100):  # (they drain: no call in flight, at once)
            if not any(_alive(pid) for pid in workers):
                break
            await sleep(0.1)
        self.assertFalse(any(_alive(pid) for pid in workers))

    async def test_tls_and_the_cpp_listener_are_served_by_every_worker(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="tls-"))
        ca = make_ca(directory, "test-ca")
        cert, key = issue(directory, ca, "provider", ip="127.0.0.1")
        provider = self.start(
            f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
            "[cpp]\nlisten = tcp:0:interface=127.0.0.1\n",
            directory,
        )
        seen = set()
        for _ in range(64):
            client = Client(
                reactor,
                providers={"mprpc.test.EchoService": [provider.address]},
                tls=ClientTLS(ca=ca[2]),
                timeout=5,
            )
            self.addCleanup(client.close)
            seen.add((await client.proxy(ECHO).Echo(echo_pb2.EchoRequest())).pid)
            if len(seen) == 2:
                break
        self.assertEqual(seen, set(self.workers(provider)))
        pattern = r"mprpc-compatible listener on 127\.0\.0\.1:(\d+)"
        for _ in range(100):  # (a worker's log and its ready line come by two pipes)
            cpp = re.findall(pattern, provider.output)
            if len(cpp) >= 3:
                break
            await sleep(0.05)
        self.assertEqual(len(cpp), 3, provider.output)  # the supervisor's and each worker's
        self.assertEqual(len(set(cpp)), 1)

    async def test_a_killed_worker_fails_only_its_calls_and_is_back_within_2s(self) -> None:
        provider = self.start()
        by_worker: dict[int, list] = {}
        for _ in range(64):  # a connection each, until each worker has two
            echo = self.client(provider).proxy(ECHO)
            pid = (await echo.Echo(echo_pb2.EchoRequest())).pid
            by_worker.setdefault(pid, []).append(echo)
            if len(by_worker) == 2 and min(len(v) for v in by_worker.values()) >= 2:
                break
        victim, survivor = sorted(by_worker)
        calls = {
            pid: [e.AsyncEcho(echo_pb2.EchoRequest(delay=2)) for e in echoes]
            for pid, echoes in by_worker.items()
        }
        await sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while len(self.workers(provider)) < 3 and time.monotonic() - killed < 10:
            await sleep(0.02)
        back = time.monotonic() - killed
        for call in calls[victim]:
            with self.assertRaises(UnavailableError):
                await call
        for call in calls[survivor]:
            self.assertEqual((await call).pid, survivor)
        self.assertLess(back, 2.0, provider.output)
        self.assertFalse(_alive(victim))
        self.assertIn(f"worker {victim} died", provider.output)
        self.assertEqual(len(await self.pids_seen(provider, 64)), 2)

    async def test_sighup_restarts_the_workers_with_no_failed_call(self) -> None:
        provider = self.start()
        old = set(self.workers(provider))
        clients = [self.client(provider).proxy(ECHO) for _ in range(4)]
        failures: list[Exception] = []
        done = 0
        stop = False

        async def loop(echo) -> None:
            nonlocal done
            for _ in range(5000):  # bounded
                if stop:
                    return
                try:
                    await echo.AsyncEcho(echo_pb2.EchoRequest(delay=0.01), timeout=5)
                    done += 1
                except Exception as e:
                    failures.append(e)

        loops = [Deferred.fromCoroutine(loop(c)) for c in clients]
        await sleep(0.5)
        provider.signal(signal.SIGHUP)
        started = time.monotonic()
        while any(_alive(pid) for pid in old) and time.monotonic() - started < 30:
            await sleep(0.05)
        await sleep(0.5)
        stop = True
        for each in loops:
            await each
        self.assertEqual(failures, [])
        self.assertFalse(any(_alive(pid) for pid in old), provider.output)
        new = set(self.workers(provider)) - old
        self.assertEqual(len(new), 2)
        self.assertGreater(done, 20)
        self.assertTrue(await self.pids_seen(provider) <= new)

    async def test_sigterm_stops_every_worker_then_the_supervisor(self) -> None:
        provider = self.start()
        echo = self.client(provider).proxy(ECHO)
        call = echo.AsyncEcho(echo_pb2.EchoRequest(delay=1))
        await sleep(0.3)
        provider.signal(signal.SIGTERM)
        self.assertEqual((await call).payload, b"")
        code = None
        for _ in range(150):
            code = provider.process.poll()
            if code is not None:
                break
            await sleep(0.1)
        self.assertIn(code, (0, -signal.SIGTERM))
        self.assertEqual(len(self.started(provider)), 3)  # (two and the spare)
        self.assertFalse(any(_alive(pid) for pid in self.started(provider)))
        self.assertIn("stopping 3 workers", provider.output)


class SharedSocketWorkersTests(WorkersTests):
    """The same with ``worker_sockets = shared`` (every worker on the supervisor's socket)."""

    sockets = "shared"

    async def test_calls_reach_both_workers_and_not_the_supervisor(self) -> None:
        # On one shared socket the worker whose accept wins takes the
        # connection, often the same one every time (docs/cluster.md:
        # 0 to 8 of 32 connections on one of two workers): the spread is
        # reuseport's (the default, tested above); here only that workers,
        # never the supervisor, answer.
        provider = self.start()
        seen = await self.pids_seen(provider)
        self.assertTrue(seen and seen <= set(self.workers(provider)), seen)
        self.assertNotIn(provider.pid, seen)


class WorkersAdminTests(TestCase):
    """``[admin]`` with ``workers = 2``: the supervisor's /metrics sums every
    worker's (prometheus_client's multiprocess mode), /status.json has a row each."""

    timeout = 90
    sockets = "reuseport"
    start = WorkersTests.start
    workers = WorkersTests.workers
    started = WorkersTests.started
    wait_ready = WorkersTests.wait_ready
    _stop_all = WorkersTests._stop_all
    client = WorkersTests.client

    async def test_metrics_sum_the_workers_and_status_lists_each(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        provider = self.start("[admin]\nlisten = tcp:0:interface=127.0.0.1\n")
        base = provider.wait_for_output(r"admin endpoint on (http://127\.0\.0\.1:\d+)/")[1]
        by_pid: dict[int, int] = {}
        for _ in range(64):  # a connection each, until each worker has had calls
            echo = self.client(provider).proxy(ECHO)
            for _ in range(3):
                pid = (await echo.Echo(echo_pb2.EchoRequest())).pid
                by_pid[pid] = by_pid.get(pid, 0) + 1
            if len(by_pid) == 2:
                break
        self.assertEqual(set(by_pid), set(self.workers(provider)))
        total = sum(by_pid.values())

        def figures() -> tuple[float, dict[int, float], dict]:
            text = fetch(base + "/metrics")
            summed, served = 0.0, {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name == "mprpc_server_calls_total" and s.labels["method"] == "Echo":
                        summed += s.value
                    elif s.name == "mprpc_worker_calls_served":
                        served[int(s.labels["pid"])] = s.value
            return summed, served, json.loads(fetch(base + "/status.json"))

        for _ in range(100):  # (the workers' gauges are set every second)
            summed, served, status = await deferToThread(figures)
            if {pid: n for pid, n in served.items() if pid in by_pid} == by_pid:
                break
            await sleep(0.1)
        self.assertEqual(summed, total)
        spare = set(served) - set(by_pid)  # (loaded, never served: 0)
        self.assertEqual(served, {**by_pid, **dict.fromkeys(spare, 0)})
        self.assertLessEqual(len(spare), 1)
        rows = {w["pid"]: w for w in status["workers"]}
        serving = {pid: w for pid, w in rows.items() if w["slot"] != "spare"}
        self.assertEqual(set(serving), set(by_pid))
        self.assertEqual(sorted(w["slot"] for w in serving.values()), [0, 1])
        for pid, row in serving.items():
            self.assertTrue(row["ready"])
            self.assertEqual(row["calls_served"], by_pid[pid])
            self.assertEqual(row["restarts"], 0)
        self.assertEqual(status["supervisor"]["pid"], provider.pid)
        self.assertEqual(status["supervisor"]["ready"], 2)
        self.assertEqual(status["provider"]["health"], "SERVING")
        echo_calls = [
            m["calls"]
            for s in status["services"]
            for m in s["methods"]
            if s["name"] == "mprpc.test.EchoService" and m["name"] == "Echo"
        ]
        self.assertEqual(echo_calls, [total])
        page = await deferToThread(fetch, base + "/status?refresh=0")
        for pid in by_pid:
            self.assertIn(f'<td class="pid">{pid}</td>', page)
        directory = status["supervisor"]["metrics_dir"]
        self.assertTrue(os.path.isdir(directory))

        victim = min(by_pid)  # killed: its gauges go, its calls stay in the sums
        os.kill(victim, signal.SIGKILL)
        for _ in range(100):
            summed, served, status = await deferToThread(figures)
            if victim not in served:
                break
            await sleep(0.1)
        self.assertNotIn(victim, served)
        self.assertEqual(summed, total)
        slot = serving[victim]["slot"]
        rows = [w for w in status["workers"] if w["slot"] == slot]
        self.assertEqual([w["restarts"] for w in rows], [1], status["workers"])
        self._stop_all(provider)
        self.assertFalse(os.path.exists(directory), provider.output)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
