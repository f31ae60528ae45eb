"""Integration: a provider restarted on a socket held for it (systemd socket
activation, ``listen = systemd:domain=INET:index=0``) loses no connection
attempt and no call.

The test holds the listening socket as a ``.socket`` unit would
(``testbed.handover``), starts ``twistd -n mprpc`` on it, and while clients
dial and call, stops that process (SIGTERM: graceful) and, once it has
exited, starts another on the same socket, as ``systemctl restart`` does.
Meanwhile connection attempts wait in the socket's backlog.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO
from testbed.handover import ActivatedProvider, HeldSocket
from testbed.processes import run_twistd
from testbed.protos import echo_pb2
from twisted_rpc import Client, NotSentError, RpcError

pytestmark = pytest.mark.integration

SERVICE = "mprpc.test.EchoService"
CALL_TIMEOUT = 30.0  # long enough to wait out a restart on a busy machine


def write_config(held: HeldSocket, listen: str = "systemd:domain=INET:index=0") -> Path:
    config = Path(tempfile.mkdtemp()) / "provider.ini"
    config.write_text(
        f"[provider]\nlisten = {listen}\nadvertise = {held.address}\n"
        "services = testbed.echo_service:EchoService\ngrace_period = 2\n"
    )
    return config


class Dialler:
    """A thread making plain TCP connection attempts (connect, close) every
    20 ms, at most ``limit``, until stopped; it counts those that fail."""

    def __init__(self, port: int, limit: int = 3000) -> None:
        self.port = port
        self.limit = limit
        self.attempts = 0
        self.failed: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set() and self.attempts < self.limit:
            self.attempts += 1
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
            except OSError as e:
                self.failed.append(repr(e))
            self.stopping.wait(0.02)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


class SystemdHandoverTests(TestCase):
    timeout = 120

    def held(self) -> HeldSocket:
        held = HeldSocket()
        self.addCleanup(held.close)
        return held

    def start(self, held: HeldSocket, config: Path) -> ActivatedProvider:
        provider = ActivatedProvider(held, config)
        self.addCleanup(provider.stop)  # stopped by pid even when the test fails
        return provider

    async def test_restart_on_the_held_socket_loses_nothing(self) -> None:
        """Counted: plain connection attempts (each must connect), calls on a
        new connection each (a new Client per call: dial, call, close) and
        calls on long-lived clients. A call that fails with NotSentError
        (UNAVAILABLE, never run: a GOAWAY crossed it) is sent again and
        counted as retried; any other error counts as failed. Expected: no
        failed attempt, no failed call, calls started while no process was
        serving answered by the new one."""
        held = self.held()
        config = write_config(held)
        first = self.start(held, config)
        await deferToThread(first.wait_ready)
        dialler = Dialler(held.port)
        self.addCleanup(dialler.stop)
        failed: list[str] = []
        answered: list[tuple[float, int]] = []  # (when the call started, the pid that answered)
        retried: list[str] = []  # why each NotSentError, its peer left out
        gap: list[float] = []  # SIGTERM to the old process, the new one serving
        done = False
        clients: list[Client] = []

        async def call(client: Client) -> None:
            started = time.monotonic()
            for _ in range(20):  # bounded: a call is sent again at most 19 times
                try:
                    echo = client.proxy(ECHO)
                    reply = await echo.Echo(
                        echo_pb2.EchoRequest(payload=b"x"), timeout=CALL_TIMEOUT
                    )
                except NotSentError as e:
                    retried.append(str(e).replace(held.address, "P"))
                    await deferLater(reactor, 0.05, lambda: None)
                    continue
                except RpcError as e:
                    failed.append(f"{type(e).__name__}: {e}")
                    return
                answered.append((started, reply.pid))
                return
            failed.append("not sent after 20 tries")

        async def long_lived() -> None:
            client = Client(reactor, providers={SERVICE: [held.address]})
            clients.append(client)
            for _ in range(2000):
                if done:
                    break
                await call(client)

        async def dial_and_call() -> None:
            for _ in range(500):
                if done:
                    break
                client = Client(reactor, providers={SERVICE: [held.address]})
                try:
                    await call(client)
                finally:
                    await client.close()
                await deferLater(reactor, 0.02, lambda: None)

        async def restart() -> ActivatedProvider:
            nonlocal done
            await deferLater(reactor, 1.0, lambda: None)
            gap.append(time.monotonic())
            first.process.send_signal(15)
            self.assertIsNotNone(await deferToThread(first.wait, 15))
            # A call started now, no process serving: it waits in the backlog
            # (the loops above may all be inside calls started earlier).
            in_the_gap = Deferred.fromCoroutine(call_once())
            second = self.start(held, config)
            await deferToThread(second.wait_ready)
            gap.append(time.monotonic())
            await in_the_gap
            await deferLater(reactor, 1.0, lambda: None)
            done = True
            return second

        async def call_once() -> None:
            client = Client(reactor, providers={SERVICE: [held.address]})
            try:
                await call(client)
            finally:
                await client.close()

        try:
            results = await gatherResults(
                [
                    Deferred.fromCoroutine(restart()),
                    *(Deferred.fromCoroutine(long_lived()) for _ in range(4)),
                    *(Deferred.fromCoroutine(dial_and_call()) for _ in range(4)),
                ]
            )
        finally:
            done = True
            for client in clients:
                await client.close()
            await deferToThread(dialler.stop)
        second = results[0]
        self.assertEqual(failed, [])
        self.assertEqual(dialler.failed, [])
        self.assertGreater(dialler.attempts, 50)
        pids = {pid for _, pid in answered}
        self.assertEqual(pids, {first.pid, second.pid})
        # Calls started after the SIGTERM, before the new process served: the
        # new process answered some (they had waited in the backlog).
        in_gap = [pid for started, pid in answered if gap[0] <= started < gap[1]]
        self.assertIn(second.pid, in_gap)
        print(
            f"\n{len(answered)} calls answered ({in_gap.count(second.pid)} of them started "
            f"in the {gap[1] - gap[0]:.2f} s from SIGTERM to the new process serving, "
            f"answered by it), {len(retried)} sent again after NotSentError "
            f"{sorted(set(retried))}, 0 failed; "
            f"{dialler.attempts} connection attempts, 0 failed"
        )

    @pytest.mark.skipif(
        shutil.which("systemd-socket-activate") is None, reason="no systemd-socket-activate"
    )
    async def test_systemd_socket_activate_hands_over_a_named_socket(self) -> None:
        """systemd's own launcher names the socket (``--fdname=rpc``,
        LISTEN_FDNAMES) and starts twistd on the first connection attempt:
        ``listen = systemd:domain=INET:name=rpc`` serves that call."""
        held = self.held()
        config = write_config(held, "systemd:domain=INET:name=rpc")
        launcher = ("systemd-socket-activate", "--fdname=rpc")
        provider = ActivatedProvider(held, config, name="outer", launcher=launcher)
        self.addCleanup(provider.stop)
        client = Client(reactor, providers={SERVICE: [held.address]})
        self.addCleanup(client.close)
        echo = client.proxy(ECHO)
        reply = None
        for _ in range(5):  # twistd starting cold may outlast the client's 5 s PING
            try:
                reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=CALL_TIMEOUT)
                break
            except NotSentError:
                continue
        assert reply is not None, provider.output
        self.assertEqual(reply.pid, provider.pid)  # (both launchers exec in place)
        self.assertIn("Execing", provider.output)


def test_a_missing_descriptor_is_one_line_at_start() -> None:
    """No socket handed over: twistd exits 1 with one line saying so."""
    held = HeldSocket()
    try:
        result = run_twistd(["mprpc", "--config", str(write_config(held))])
    finally:
        held.close()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no descriptor at index=0" in lines[0]
    assert "inherited 0 listening descriptors" in lines[0]
