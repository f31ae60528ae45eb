"""Integration: GOAWAY between real processes loses no call.

A provider closing idle connections (reason IDLE) and a provider stopping
(reason SHUTDOWN) both send GOAWAY; calls that cross it on the wire were never
run, and the consumer sends them again instead of failing them.
"""

from __future__ import annotations

import random
import signal
import tempfile
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from twisted_rpc import Client, RpcError

pytestmark = pytest.mark.integration

SERVICE = "mprpc.test.EchoService"


class GoawayLiveTests(TestCase):
    timeout = 60

    def start(self, extra: str = "") -> Provider:
        provider = Provider(Path(tempfile.mkdtemp()), extra)
        self.addCleanup(provider.stop)
        return provider

    def client(self, *providers: Provider) -> Client:
        client = Client(reactor, providers={SERVICE: [p.address for p in providers]})
        self.addCleanup(client.close)
        return client

    async def test_idle_closes_fail_no_call(self) -> None:
        """Clients calling about as often as the idle timeout: connections are
        closed as idle again and again, and every call is answered."""
        provider = self.start("idle_timeout = 1")
        rng = random.Random(13)
        failures: list[str] = []
        answered = 0

        async def caller(client: Client) -> None:
            nonlocal answered
            echo = client.proxy(ECHO)
            for _ in range(5):
                await deferLater(reactor, rng.uniform(0.9, 1.2), lambda: None)
                try:
                    await echo.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
                    answered += 1
                except RpcError as e:
                    failures.append(str(e))

        clients = [self.client(provider) for _ in range(16)]
        await gatherResults([Deferred.fromCoroutine(caller(c)) for c in clients])
        self.assertEqual(failures, [])
        self.assertEqual(answered, 16 * 5)
        # The provider did close connections as idle while they were used.
        self.assertIn("closing idle connection", provider.output)

    async def test_stopping_provider_fails_no_call(self) -> None:
        """Calls kept in flight to two providers while one is stopped (SIGTERM):
        those it had not accepted go to the other one, and none fails."""
        first, second = self.start(), self.start()
        client = self.client(first, second)
        echo = client.proxy(ECHO)
        failures: list[str] = []
        pids: set[int] = set()
        stop_at = reactor.seconds() + 2.0

        async def loop() -> None:
            while reactor.seconds() < stop_at:
                try:
                    reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"y"), timeout=5)
                    pids.add(reply.pid)
                except RpcError as e:
                    failures.append(str(e))

        async def stop_first() -> None:
            await deferLater(reactor, 0.7, lambda: None)
            first.signal(signal.SIGTERM)

        await gatherResults(
            [
                *(Deferred.fromCoroutine(loop()) for _ in range(8)),
                Deferred.fromCoroutine(stop_first()),
            ]
        )
        self.assertEqual(failures, [])
        self.assertEqual(pids, {first.pid, second.pid})  # both served before the stop
        self.assertIsNotNone(await deferToThread(first.wait, 10))  # and the first one stopped
