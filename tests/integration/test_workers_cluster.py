"""Integration: providers with ``workers = 2`` registered in a real ZooKeeper,
called by consumers with default settings (``connections_per_provider = auto``)
that find them there, as users run them; every process is stopped by PID,
workers included."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from tests.integration.test_workers import _alive
from tests.integration.test_zookeeper import Load
from twisted_rpc import Client, UnavailableError, ZooKeeperRegistry

pytestmark = pytest.mark.integration

SESSION = 4  # seconds
_READY = re.compile(r"worker (\d+) ready")
_STARTED = re.compile(r"worker (\d+) started")


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class WorkersThroughZooKeeperTests(TestCase):
    timeout = 120

    @pytest.fixture(autouse=True)
    def _zookeeper(self, zookeeper_server):  # type: ignore[no-untyped-def]
        self.zk = zookeeper_server

    def setUp(self) -> None:
        self.channels: dict[str, object] = {}
        self.root = f"/mprpc-workers-{uuid.uuid4().hex[:8]}"

    def provider(self) -> Provider:
        """A provider with two workers (and its spare) serving, registered."""
        extra = (
            "workers = 2\ngrace_period = 3\n"
            f"[registry]\nkind = zookeeper\nhosts = {self.zk.hosts}\nroot = {self.root}\n"
            f"session_timeout = {SESSION}\n"
        )
        provider = Provider(Path(tempfile.mkdtemp()), extra, ready=" ready")
        self.addCleanup(self._stop_all, provider)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            len(self.workers(provider)) >= 2 and "loaded as the spare" in provider.output
        ):
            time.sleep(0.01)
        self.assertGreaterEqual(len(self.workers(provider)), 2, provider.output)
        return provider

    def workers(self, provider: Provider) -> list[int]:
        return [int(pid) for pid in _READY.findall(provider.output)]

    def _stop_all(self, provider: Provider) -> None:
        provider.stop()
        for pid in map(int, _STARTED.findall(provider.output)):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def consumer(self) -> tuple[Client, object]:
        """A consumer with default settings, as users build one."""
        registry = ZooKeeperRegistry(reactor, self.zk.hosts, root=self.root)
        client = Client(reactor, discovery=registry)
        self.addCleanup(client.close)
        return client, client.proxy(ECHO)

    async def until(self, check, seconds: float, what: str) -> float:  # type: ignore[no-untyped-def]
        """Seconds until ``check()`` is true (fails after ``seconds``)."""
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > seconds:
                self.fail(f"no {what} within {seconds} s: {self.channels}")
            await sleep(0.02)
        return time.monotonic() - started

    def held_workers(self, client: Client, provider: Provider) -> list[object]:
        """The worker each ready connection to ``provider`` holds."""
        self.channels = dict(client.channels)  # (for a failure's message)
        return [
            channel.protocol.peer_settings.get("worker")
            for name, channel in client.channels.items()
            if name.split("#")[0] == provider.address
            and channel.protocol is not None
            and channel.protocol.peer_settings is not None
        ]

    async def test_calls_reach_every_worker_one_connection_each(self) -> None:
        provider = self.provider()
        client, echo = self.consumer()
        await echo.Echo(echo_pb2.EchoRequest())
        await self.until(
            lambda: len(set(self.held_workers(client, provider))) == 2, 10, "two workers held"
        )
        seen = {(await echo.Echo(echo_pb2.EchoRequest())).pid for _ in range(40)}
        self.assertEqual(seen, set(self.workers(provider)))
        self.assertNotIn(provider.pid, seen)
        names = sorted(n for n in client.channels if n.split("#")[0] == provider.address)
        self.assertEqual(names, [provider.address, f"{provider.address}#2"])

    async def test_a_killed_worker_fails_only_its_calls_and_serves_again_within_2s(
        self,
    ) -> None:
        provider = self.provider()
        client, echo = self.consumer()
        await echo.Echo(echo_pb2.EchoRequest())
        await self.until(
            lambda: len(set(self.held_workers(client, provider))) == 2, 10, "two workers held"
        )
        victim, survivor = self.workers(provider)[:2]
        load = Load(echo, concurrency=8, max_seconds=60)
        load.start()
        self.addCleanup(load.stop)
        await self.until(lambda: load.by_pid.get(victim, 0) > 20, 10, "calls to the victim")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        before = len(load.log)
        fresh = {victim, survivor}

        def replacement() -> bool:
            return any(pid not in fresh for _, pid in load.log[before:])

        back = await self.until(replacement, 10, "calls to the replacement worker")
        await sleep(0.5)
        await load.stop()
        print(f"failed {len(load.failures)}, back in {back:.2f} s, {load.successes} calls")
        for failure in load.failures:
            self.assertIsInstance(failure, UnavailableError)
        self.assertLessEqual(len(load.failures), load.concurrency)  # those in flight
        self.assertLess(back, 2.0, provider.output)
        self.assertLess(time.monotonic() - killed, 20)

    async def test_sigterm_of_a_supervisor_fails_no_call_another_provider_serving(
        self,
    ) -> None:
        first, second = self.provider(), self.provider()
        client, echo = self.consumer()
        load = Load(echo, concurrency=8, max_seconds=60)
        load.start()
        self.addCleanup(load.stop)
        first_pids, second_pids = set(self.workers(first)), set(self.workers(second))
        await self.until(
            lambda: first_pids <= set(load.by_pid) and second_pids <= set(load.by_pid),
            15,
            "calls to all four workers",
        )
        first.signal(signal.SIGTERM)
        await self.until(lambda: first.process.poll() is not None, 30, "the supervisor's exit")
        mark = len(load.log)
        await self.until(lambda: len(load.log) > mark + 50, 10, "calls after the exit")
        await load.stop()
        print(f"failed {len(load.failures)} of {load.successes + len(load.failures)}")
        self.assertEqual(load.failures, [])
        self.assertTrue({pid for _, pid in load.log[mark:]} <= second_pids)

    async def test_sighup_fails_no_call(self) -> None:
        provider = self.provider()
        client, echo = self.consumer()
        old = set(self.workers(provider))
        load = Load(echo, concurrency=8, max_seconds=60)
        load.start()
        self.addCleanup(load.stop)
        await self.until(lambda: old <= set(load.by_pid), 10, "calls to both workers")
        provider.signal(signal.SIGHUP)
        await self.until(lambda: not any(map(_alive, old)), 30, "the old workers' exit")
        new = set(self.workers(provider)) - old
        await self.until(
            lambda: new <= {pid for _, pid in load.log[-200:]}, 10, "calls to both new workers"
        )
        await self.until(  # one connection per worker again
            lambda: set(map(int, self.held_workers(client, provider))) == new, 10, "both held"
        )
        await load.stop()
        print(f"failed {len(load.failures)} of {load.successes + len(load.failures)}")
        self.assertEqual(load.failures, [])
        self.assertEqual(len(new), 2)
