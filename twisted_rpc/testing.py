"""In-memory provider and client for unit tests (like ``treq.testing``).

The real :class:`twisted_rpc.Client` and the real provider-side
connections talk over in-memory transports on a ``MemoryReactorClock``: no
sockets, no threads, and time moves only when the test says::

    memory = MemoryProvider([UserService()])
    d = memory.proxy(UserService).Login(LoginRequest(name="zhang san"))
    memory.flush()
    response = memory.result(d)

Streams and other ``async def`` code run to their end with :meth:`MemoryProvider.run`
(flushing until the coroutine finishes, the clock standing still), and
:meth:`MemoryProvider.settle` delivers until nothing moves (a paused reader's
provider has spent its credit and waits)::

    stream = memory.proxy(WatchService).Watch(WatchRequest())
    first = memory.run(stream.read())
    stream.pauseProducing()
    memory.settle()

:func:`local_zookeeper` runs a real ZooKeeper (the installed server) for
tests against a real registry; ``twisted_rpc.pytest_plugin`` makes it a
fixture (docs/testing.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump

from twisted_rpc.client._client import Client
from twisted_rpc.client._options import ClientOptions
from twisted_rpc.client._proxy import ServiceProxy
from twisted_rpc.core._interfaces import (
    IClientInterceptor,
    IClientStreamInterceptor,
    IServerInterceptor,
    IServerStreamInterceptor,
)
from twisted_rpc.core._service import Service
from twisted_rpc.ops._health import add_builtins
from twisted_rpc.server._dispatcher import Dispatcher
from twisted_rpc.server._factory import ServerFactory, ServerLimits

__all__ = ["MemoryProvider"]


class MemoryProvider:
    """Serves ``services`` in memory and gives a client wired to them."""

    port = 4321

    def __init__(
        self,
        services: Sequence[Service],
        *,
        interceptors: Sequence[IServerInterceptor | IServerStreamInterceptor] = (),
        client_interceptors: Sequence[IClientInterceptor | IClientStreamInterceptor] = (),
        timeout: float | None = None,
        reactor: MemoryReactorClock | None = None,
        limits: ServerLimits | None = None,
        builtins: bool = False,
        client_options: ClientOptions | None = None,
        tracing: bool = False,
    ) -> None:
        """``builtins``: also serve Health and Reflection, as a real provider does
        (``self.health`` is their :class:`twisted_rpc.ops.HealthState`).
        ``client_options``: the client's settings (``stream_window``...);
        ``timeout``, if given, overrides its timeout. ``tracing``: OpenTelemetry
        spans on both sides, as ``tracing = opentelemetry`` gives (docs/tracing.md)."""
        if tracing:
            from twisted_rpc.core._tracing import ServerTracing

            interceptors = [ServerTracing(), *interceptors]
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self.dispatcher = Dispatcher(services, interceptors)  # type: ignore[arg-type]
        self.health = add_builtins(
            self.dispatcher, self.reactor, health=builtins, reflection=builtins
        )
        self.factory = ServerFactory(self.dispatcher, self.reactor, limits=limits)
        self.reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")
        address = f"127.0.0.1:{self.port}"
        options = client_options if client_options is not None else ClientOptions()
        if timeout is not None:
            options = options.replace(timeout=timeout)
        if tracing:
            options = options.replace(tracing=True)
        self.client = Client(
            self.reactor,
            options,
            providers={name: [address] for name in self.dispatcher.services},
            interceptors=client_interceptors,  # type: ignore[arg-type]
        )
        self._completer = ConnectionCompleter(self.reactor)
        self.pumps: list[IOPump] = []

    def proxy(self, service: ServiceDescriptor | str | type[Service], **kw: Any) -> ServiceProxy:
        return self.client.proxy(service, **kw)

    def flush(self) -> bool:
        """Complete pending connections and deliver every byte in both
        directions; whether anything moved (a connection made, bytes, a close)."""
        moved = self._connect()
        for pump in self.pumps:
            if pump.flush():
                moved = True
        return moved

    def _connect(self) -> bool:
        """Complete pending connections; whether there were any."""
        moved = False
        while True:
            pump = self._completer.succeedOnce(greet=False)
            if pump is None:
                return moved
            moved = True
            self.pumps.append(pump)

    def _step(self) -> bool:
        """One round: what is due now runs, pending connections complete and
        each connection's bytes go across once each way."""
        self.reactor.advance(0)
        moved = self._connect()
        for pump in self.pumps:
            if pump.pump():
                moved = True
        return moved

    def settle(self, rounds: int = 10_000) -> int:
        """Round after round, run what is due now (``callLater(0)``: a
        stream's turn), complete connections and carry each connection's
        bytes across once each way, until a round moves nothing: every
        stream waits (for credit, the clock or the test). The clock does not
        move. Returns the rounds that moved something; AssertionError if
        still moving after ``rounds`` (a reader that never waits)."""
        for n in range(rounds):
            if not self._step():
                return n
        raise AssertionError(f"still moving after {rounds} rounds")

    def run(self, work: Coroutine[Any, Any, Any] | Deferred[Any], rounds: int = 10_000) -> Any:
        """Run ``work`` (a coroutine, e.g. an ``async def`` test body, or a
        Deferred) to its end without moving the clock: as :meth:`settle`,
        stopping as soon as it has a result. Returns the result or raises
        its failure; AssertionError if it still waits once nothing moves
        (for the clock: :meth:`advance` first) or after ``rounds``."""
        d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        for _ in range(rounds):
            if d.called or not self._step():
                break
        return self.result(d)

    def break_connections(self) -> None:
        """Lose every connection as a network failure would (both ends see
        ``ConnectionLost``), then deliver what that caused."""
        for pump in self.pumps:
            for transport in (pump.clientIO, pump.serverIO):
                transport.disconnectReason = ConnectionLost("connection broken by the test")
            pump.serverIO.loseConnection()
        self.flush()
        self.pumps = [p for p in self.pumps if not p.serverIO.disconnected]

    def advance(self, seconds: float) -> None:
        """Move the clock on, then deliver what that caused."""
        self.reactor.advance(seconds)
        self.flush()

    @staticmethod
    def result(d: Deferred[Any]) -> Any:
        """The result ``d`` already has; a failure is raised (and consumed)."""
        outcome: list[Any] = []

        def grab(result: Any) -> Any:
            outcome.append(result)
            return None if isinstance(result, Failure) else result

        d.addBoth(grab)
        if not outcome:
            raise AssertionError(f"{d!r} has no result yet")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]


# ----------------------------------------------------------------- ZooKeeper

JAVA_DIR = Path("/usr/share/java")
"""Where Debian's ``zookeeper`` package puts its jars."""
ZOOKEEPER_JAR = JAVA_DIR / "zookeeper.jar"
CLASSPATH_JARS = ["zookeeper.jar", "slf4j-log4j12.jar", "log4j-1.2.jar"]
MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
HOST = "127.0.0.1"

LOG4J = """\
log4j.rootLogger=INFO, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File={log}
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=%d{{ISO8601}} %-5p [%t:%C{{1}}@%L] %m%n
"""


class ZooKeeperNotInstalled(RuntimeError):
    """No ZooKeeper server (or no ``java``) to run here."""


def zookeeper_missing() -> str | None:
    """Why no ZooKeeper can be started here (None: it can)."""
    if not ZOOKEEPER_JAR.exists():
        return (
            f"ZooKeeper is not installed ({ZOOKEEPER_JAR} is missing): on Debian or "
            "Ubuntu, apt-get install zookeeper default-jre-headless"
        )
    if shutil.which("java") is None:
        return (
            "ZooKeeper needs a Java runtime and no java is on PATH: "
            "apt-get install default-jre-headless"
        )
    return None


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports free on 127.0.0.1 just now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def four_letter(port: int, command: str, timeout: float = 1.0) -> str:
    """Send a ZooKeeper four-letter command; '' if the server does not answer."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(command.encode())
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")
    except OSError:
        return ""


def zookeeper_mode(port: int) -> str | None:
    """'standalone', 'leader' or 'follower' once serving, else None."""
    for line in four_letter(port, "srvr").splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


@dataclass
class ZooKeeperServer:
    """One ZooKeeper JVM on 127.0.0.1 with its data under ``dir``;
    ``start()`` returns once it serves (or raises), ``stop()`` ends it by PID."""

    myid: int
    port: int
    dir: Path
    tick_ms: int = 500
    peers: list[tuple[int, int, int]] = field(default_factory=list)  # (myid, quorum, election)
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def write_config(self) -> Path:
        data = self.dir / "data"
        conf = self.dir / "conf"
        data.mkdir(parents=True, exist_ok=True)
        conf.mkdir(parents=True, exist_ok=True)
        lines = [
            f"tickTime={self.tick_ms}",
            f"dataDir={data}",
            f"clientPort={self.port}",
            f"clientPortAddress={HOST}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=srvr,ruok,mntr,stat,cons",
            "minSessionTimeout=" + str(2 * self.tick_ms),
            "maxSessionTimeout=60000",
            "maxClientCnxns=0",
        ]
        if self.peers:
            lines += ["initLimit=10", "syncLimit=5", "quorumListenOnAllIPs=false"]
            for myid, quorum, election in self.peers:
                lines.append(f"server.{myid}={HOST}:{quorum}:{election}")
            (data / "myid").write_text(f"{self.myid}\n")
        cfg = conf / "zoo.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        (conf / "log4j.properties").write_text(LOG4J.format(log=self.dir / "zookeeper.log"))
        return cfg

    def launch(self) -> None:
        missing = zookeeper_missing()
        if missing is not None:
            raise ZooKeeperNotInstalled(missing)
        cfg = self.write_config()
        classpath = ":".join([str(cfg.parent)] + [str(JAVA_DIR / j) for j in CLASSPATH_JARS])
        with open(self.dir / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                ["java", "-Xmx256m", "-Dzookeeper.admin.enableServer=false", "-cp", classpath]
                + [MAIN, str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Wait (blocking, polling every 0.1 s) until ``srvr`` reports a mode."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"zookeeper {self.myid} exited: {self.log_tail()}")
            m = zookeeper_mode(self.port)
            if m:
                return m
            time.sleep(0.1)
        raise RuntimeError(f"zookeeper {self.myid} not serving after {timeout}s: {self.log_tail()}")

    def start(self, timeout: float = 60.0) -> str:
        self.launch()
        return self.wait_ready(timeout)

    def log_tail(self) -> str:
        for name in ("zookeeper.log", "stdout.log"):
            path = self.dir / name
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        return "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the JVM by its PID (SIGKILL after 10 s); idempotent."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, sig)
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            except ProcessLookupError:
                pass
        self.process = None


@contextmanager
def local_zookeeper(timeout: float = 60.0, tick_ms: int = 500) -> Iterator[str]:
    """A real standalone ZooKeeper for the ``with`` block: yields its
    ``"127.0.0.1:PORT"`` (a free port), data in a temporary directory; on
    exit the server is stopped by its PID and the directory removed.
    Blocking (it waits up to ``timeout`` seconds for the server to serve):
    for test setup, not for a running reactor. Needs Debian's ``zookeeper``
    package and a Java runtime (:class:`ZooKeeperNotInstalled` otherwise)."""
    missing = zookeeper_missing()
    if missing is not None:
        raise ZooKeeperNotInstalled(missing)
    directory = Path(tempfile.mkdtemp(prefix="twisted_rpc-zk-"))
    server = ZooKeeperServer(1, free_ports(1)[0], directory, tick_ms)
    try:
        for attempt in range(3):  # the free port may be taken before the JVM binds it
            try:
                server.start(timeout)
                break
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in server.log_tail():
                    raise
                server.stop()
                server.port = free_ports(1)[0]
        yield server.address
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
