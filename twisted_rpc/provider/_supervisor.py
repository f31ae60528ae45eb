"""``[provider] workers = N``: a supervising process and N worker processes.

The supervisor is a :class:`ProviderService` whose listeners only bind
(:class:`BindingReactor`: each listening socket is made once and never
accepted on), so that it registers the provider once, holds the health
state and stops as a provider does; its :class:`WorkerSet` child spawns the
workers (``reactor.spawnProcess``: a fresh interpreter, nothing of this
process leaks into it) with every listening socket as an inherited
descriptor (3, 4, ...) and a control pipe (the worker's stdin and stdout,
line-delimited JSON). Workers' stderr is their log: each line, which names
the worker, is logged here.

:class:`WorkerSet` keeps a spare worker loaded, which takes over at once from a
worker that dies, and respawns (backoff), restarts them all
one by one on SIGHUP (a new worker first; the old one is told to drain once
the new one says it is ready) and, when stopped, sends SIGTERM to every
worker and waits for them (SIGKILL after the grace period and a margin).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from twisted.application.internet import StreamServerEndpointService, backoffPolicy
from twisted.application.service import Service as TwistedService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc.core._connection import CLOSE_TIMEOUT
from twisted_rpc.core._ini import ConfigError
from twisted_rpc.core._interfaces import IServiceRegistry
from twisted_rpc.ops._health import HealthState
from twisted_rpc.provider._config import ProviderConfig
from twisted_rpc.provider._service import ProviderReactor, ProviderService, _ReportingEndpoint
from twisted_rpc.provider._systemd import server_endpoint

__all__ = [
    "SPARE",
    "BindingReactor",
    "WorkerProcess",
    "WorkerSet",
    "check_worker_endpoints",
    "supervisor_service",
    "worker_args",
]

log = Logger(namespace="twisted_rpc.provider.supervisor")
worker_log = Logger(namespace="twisted_rpc.provider.worker")

MAX_LINE = 65536
"""A control or log line longer than this from a worker is cut."""
KILL_MARGIN = CLOSE_TIMEOUT + 2.0
"""Seconds past the grace period before a worker that has not exited is killed."""

SPARE = -1
"""The slot of the spare worker."""

RESPAWN_BACKOFF = backoffPolicy(
    initialDelay=0.1, maxDelay=30.0, factor=2.0, jitter=lambda: random.random() * 0.1
)
"""Seconds before a worker that died is respawned, by how many died in a row
in its slot before one got ready (0.1, 0.2, 0.4 ... 30, plus up to 0.1)."""

Spawner = Callable[..., IProcessTransport]
"""``reactor.spawnProcess``'s signature."""


@implementer(IListeningPort)
class _HeldPort:
    """A bound, listening socket the supervisor holds for its workers."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.socket.close()

    def getHost(self) -> IPv4Address | IPv6Address:
        host, port = self.socket.getsockname()[:2]
        if self.socket.family == socket.AF_INET6:
            return IPv6Address("TCP", host, port)
        return IPv4Address("TCP", host, port)


class BindingReactor:
    """A reactor whose ``listenTCP`` and ``listenSSL`` only bind a listening
    socket (kept in :attr:`sockets`, in the order asked); the rest is the
    wrapped reactor's."""

    def __init__(self, reactor: object, reuseport: bool = False) -> None:
        self._reactor = reactor
        self.reuseport = reuseport
        """Bind with SO_REUSEPORT and do not listen: each worker binds its own
        socket to the same address (``worker_sockets = reuseport``)."""
        self.sockets: list[socket.socket] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: object, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
            if not self.reuseport:
                sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sockets.append(sock)
        return _HeldPort(sock)

    def listenSSL(
        self,
        port: int,
        factory: object,
        contextFactory: object,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        return self.listenTCP(port, factory, backlog, interface)


class WorkerProcess(ProcessProtocol):
    """One worker as the supervisor sees it: its control lines (stdout) and
    its log lines (stderr)."""

    def __init__(self, workers: WorkerSet, slot: int) -> None:
        self.workers = workers
        self.slot = slot
        self.pid: int | None = None
        self.started_at = workers.clock.seconds()
        self.loaded = False
        """Said it has built its services (and waits for ``serve``)."""
        self.ready = False
        self.retiring = False
        """Sent SIGTERM on purpose (a restart or the stop): not respawned."""
        self.replaces: WorkerProcess | None = None
        self.ended: Deferred[None] = Deferred()
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def send(self, message: Mapping[str, Any]) -> None:
        if self.transport is not None and not self.ended.called:
            self.transport.writeToChild(0, json.dumps(message).encode() + b"\n")

    def kill(self, sig: str) -> None:
        if self.transport is None:
            return
        try:
            self.transport.signalProcess(sig)
        except ProcessExitedAlready:
            pass

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self._buffers:
            return
        *lines, rest = (self._buffers[childFD] + data).split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip()
            if childFD == 2:
                worker_log.info("{line}", line=text)
            elif text:
                self._control(text)

    def _control(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if isinstance(message, dict) and "ready" in message:
            self.ready = True
            self.workers.worker_ready(self)
        elif isinstance(message, dict) and "loaded" in message:
            self.loaded = True
            self.workers.worker_loaded(self)
        else:
            worker_log.info("[worker {pid}] {line}", pid=self.pid, line=text[:200])

    def processEnded(self, reason: Failure) -> None:
        self.workers.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSet(TwistedService):
    """Keeps ``count`` workers running (see the module's docstring).

    ``spawner`` is ``reactor.spawnProcess``; ``listening`` gives the
    descriptors to hand down once the listeners are bound; ``health`` is
    the provider's state, told to every worker as it changes."""

    name = "workers"

    def __init__(
        self,
        spawner: Spawner,
        clock: ProviderReactor,
        count: int,
        args: Sequence[str],
        listening: Callable[[], Sequence[int]],
        health: HealthState,
        grace_period: float,
        backoff: Callable[[int], float] | None = None,
        spare: bool = True,
    ) -> None:
        self.spawner = spawner
        self.clock = clock
        self.count = count
        self.args = list(args)
        self.listening = listening
        self.health = health
        self.grace_period = grace_period
        self.backoff = backoff if backoff is not None else RESPAWN_BACKOFF
        self.spare = spare
        """Keep a spare worker loaded, not serving (slot ``SPARE``): it takes
        over at once from one that dies, a fresh interpreter taking seconds
        to import everything on a busy machine."""
        self.current: dict[int, WorkerProcess] = {}
        """The worker serving each slot (0..count-1), or starting to; the
        spare's slot is ``SPARE``."""
        self.live: list[WorkerProcess] = []
        self.failures: dict[int, int] = {}
        self.respawns: dict[int, int] = {}
        """Workers of each slot that died and were replaced, since start."""
        self.env: dict[str, str] = {}
        """Added to the workers' environment (``PROMETHEUS_MULTIPROC_DIR``)."""
        self.ended_hooks: list[Callable[[int], None]] = []
        """Called with the pid of every worker that exits."""
        self._respawns: dict[int, IDelayedCall] = {}
        self._health_watch: Deferred[int] | None = None
        self.install_signals = False
        """Restart on SIGHUP (the real supervisor; not in tests)."""

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # (Twisted's is not annotated)
        for slot in range(self.count):
            self._spawn(slot)
        if self.spare:
            self._spawn(SPARE)
        self._watch_health(self.health.check(""))
        if self.install_signals:
            signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum: int, frame: object) -> None:
        cast(Any, self.clock).callFromThread(self.restart)

    def _spawn(self, slot: int) -> WorkerProcess:
        worker = WorkerProcess(self, slot)
        fds = self.listening()
        child_fds: dict[int, str | int] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({3 + i: fd for i, fd in enumerate(fds)})
        transport = self.spawner(
            worker,
            sys.executable,
            self.args,
            env={**os.environ, **self.env},
            path=None,
            childFDs=child_fds,
        )
        worker.pid = transport.pid
        self.current[slot] = worker
        self.live.append(worker)
        log.info("worker {pid} started (slot {slot})", pid=worker.pid, slot=slot)
        return worker

    def restart(self) -> None:
        """A rolling restart: a new worker per slot; each old one is sent
        SIGTERM once its replacement is ready."""
        if not self.running:
            return
        log.info("restarting the {n} workers", n=self.count)
        for slot in range(self.count):
            old = self.current.get(slot)
            new = self._spawn(slot)
            new.replaces = old
        spare = self.current.get(SPARE)
        if spare is not None:  # (of the old code too)
            self._retire(spare)
            self._spawn(SPARE)

    def worker_loaded(self, worker: WorkerProcess) -> None:
        """A worker has built its services: serve, unless it is the spare."""
        if worker.slot == SPARE:
            log.info("worker {pid} loaded as the spare", pid=worker.pid)
        else:
            worker.send({"serve": True})

    def worker_ready(self, worker: WorkerProcess) -> None:
        log.info("worker {pid} ready", pid=worker.pid)
        self.failures[worker.slot] = 0
        worker.send({"health": dict(self.health.statuses)})
        old, worker.replaces = worker.replaces, None
        if old is not None:
            self._retire(old, restart=True)

    def _retire(self, worker: WorkerProcess, restart: bool = False) -> None:
        """Stop ``worker`` on purpose (it is not respawned): SIGTERM, or with
        ``restart`` (another worker serves its slot) ``{"restart": true}`` on
        its pipe, on which it drains with a GOAWAY that tells consumers to
        redial (a message, not a signal, so that it cannot overtake it).
        Killed if it has not exited after the grace period and a margin."""
        worker.retiring = True
        if restart:
            worker.send({"restart": True})
            timer = self.clock.callLater(self.grace_period + KILL_MARGIN, self._kill, [worker])
            worker.ended.addCallback(lambda _: timer.cancel() if timer.active() else None)
        else:
            worker.kill("TERM")

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if worker in self.live:
            self.live.remove(worker)
        for hook in self.ended_hooks:
            hook(worker.pid or 0)
        status = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if worker.retiring or not self.running or self.current.get(worker.slot) is not worker:
            log.info("worker {pid} exited (status {status})", pid=worker.pid, status=status)
            return
        failures = self.failures.get(worker.slot, 0)
        self.respawns[worker.slot] = self.respawns.get(worker.slot, 0) + 1
        self.failures[worker.slot] = failures + 1
        delay = self.backoff(failures)
        spare = self.current.get(SPARE)
        if worker.slot != SPARE and spare is not None and spare.loaded:
            log.warn(
                "worker {pid} died (status {status}, signal {sig}): spare {spare} serves, "
                "a new spare in {delay:.2f} s",
                pid=worker.pid,
                status=status,
                sig=sig,
                spare=spare.pid,
                delay=delay,
            )
            del self.current[SPARE]
            spare.slot, spare.replaces = worker.slot, worker.replaces
            self.current[worker.slot] = spare
            spare.send({"serve": True})
            self._respawns[SPARE] = self.clock.callLater(delay, self._respawn, SPARE, None)
            return
        log.warn(
            "worker {pid} died (status {status}, signal {sig}): respawned in {delay:.2f} s",
            pid=worker.pid,
            status=status,
            sig=sig,
            delay=delay,
        )
        # The slot stays this worker's until the new one is spawned, which
        # takes over what it was to replace (a restart goes on).
        self._respawns[worker.slot] = self.clock.callLater(
            delay, self._respawn, worker.slot, worker.replaces
        )

    def _respawn(self, slot: int, replaces: WorkerProcess | None) -> None:
        self._respawns.pop(slot, None)
        if any(fd < 0 for fd in self.listening()):
            return  # (the listeners are closed: the provider is stopping)
        self._spawn(slot).replaces = replaces

    def _watch_health(self, last: int) -> None:
        d = self._health_watch = self.health.changed("", last)
        d.addCallback(self._health_changed)
        d.addErrback(lambda f: None)  # (cancelled when stopped)

    def _health_changed(self, status: int) -> None:
        for worker in self.live:
            worker.send({"health": dict(self.health.statuses)})
        self._watch_health(status)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # (Twisted's is not annotated)
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        if self._health_watch is not None:
            self._health_watch.cancel()
        workers = list(self.live)
        if not workers:
            return succeed(None)
        log.info("stopping {n} workers", n=len(workers))
        for worker in workers:
            self._retire(worker)
        ended = DeferredList([w.ended for w in workers])
        timer = self.clock.callLater(self.grace_period + KILL_MARGIN, self._kill, workers)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        return ended.addCallback(done)

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("worker {pid} did not exit: SIGKILL", pid=worker.pid)
                worker.kill("KILL")


WORKER_ENDPOINTS = ("tcp", "tcp6", "ssl")
"""The endpoint types workers can share (``[provider] workers`` > 1)."""


def check_worker_endpoints(config: ProviderConfig) -> None:
    """Raise ConfigError unless every listener is one workers can share."""
    listens = [("[provider] listen", config.listen)]
    if config.cpp is not None:
        listens.append(("[cpp] listen", config.cpp.listen))
    if config.grpc is not None:
        listens += [("[grpc] listen", each) for each in config.grpc.listen]
    for where, listen in listens:
        if listen is None:
            continue
        kind = listen.split(":", 1)[0].strip().lower()
        if kind not in WORKER_ENDPOINTS and not kind.isdigit():
            raise ConfigError(
                f"{config.path}: {where} = {listen!r}: with workers > 1 a listener must be "
                f"one of {', '.join(WORKER_ENDPOINTS)}"
            )


def worker_args(options: Mapping[str, Any], config: ProviderConfig, listeners: int) -> list[str]:
    """The worker's command line: the same ``twistd mprpc`` options."""
    args: list[str] = []
    if options.get("config"):
        args += ["--config", options["config"]]
    if options.get("cpp-config"):
        args += ["--cpp-config", options["cpp-config"]]
    for spec in options.get("service", []):
        args += ["--service", spec]
    spec = {
        "args": args,
        "workers": config.workers,
        "listeners": listeners,
        "reuseport": config.worker_sockets == "reuseport",
    }
    return [sys.executable, "-m", "twisted_rpc.provider._worker", json.dumps(spec)]


def supervisor_service(
    options: Mapping[str, Any],
    config: ProviderConfig,
    reactor: ProviderReactor,
    registries: tuple[IServiceRegistry, Any],
) -> ProviderService:
    """The supervisor: a provider that only binds, registers once (with
    ``"workers": N``) and runs a :class:`WorkerSet`; with ``[admin]``, it
    serves the admin site over every worker's metrics (:func:`_admin`)."""
    from twisted_rpc.provider._tap import registration_data, with_registries

    registry, cpp_registry = registries
    binding = BindingReactor(reactor, reuseport=config.worker_sockets == "reuseport")
    data = {**registration_data(config), "workers": config.workers}
    provider_options = config.options(registration_data=data, admin_listen=None)
    provider = ProviderService(
        cast(ProviderReactor, binding),
        options["service_instances"],
        provider_options,
        registry=registry,
        cpp_registry=cpp_registry,
    )
    listeners = len(provider.listeners)
    workers = WorkerSet(
        lambda *args, **kwargs: cast(Any, reactor).spawnProcess(*args, **kwargs),
        reactor,
        config.workers,
        worker_args(options, config, listeners),
        lambda: [s.fileno() for s in binding.sockets],
        provider.health,
        config.grace_period,
    )
    workers.install_signals = True
    with_registries(provider, config, registry, cpp_registry)
    if config.admin is not None:
        _admin(provider, workers, config, reactor)
    workers.setServiceParent(provider)  # type: ignore[no-untyped-call]  # (not annotated)
    return provider


def _admin(
    provider: ProviderService, workers: WorkerSet, config: ProviderConfig, reactor: ProviderReactor
) -> None:
    """The supervisor's admin site (on the real reactor): ``/metrics`` over
    every worker's (``twisted_rpc.ops._worker_metrics``), a row per worker."""
    from twisted_rpc.ops._admin import admin_site
    from twisted_rpc.ops._worker_metrics import WorkersMetrics

    assert config.admin is not None
    metrics = WorkersMetrics(cast(Any, reactor), workers, provider)  # (sets MULTIPROC_ENV)
    workers.ended_hooks.append(metrics.mark_dead)
    site = admin_site(
        provider, cast(Any, metrics), max_connections=config.admin.max_connections, workers=metrics
    )
    endpoint = _ReportingEndpoint(
        server_endpoint(reactor, config.admin.listen), provider._admin_listening
    )
    admin = StreamServerEndpointService(endpoint, site)  # type: ignore[no-untyped-call]
    admin._raiseSynchronously = True
    admin.setName("admin")  # type: ignore[no-untyped-call]  # (not annotated)
    # Stopped after the workers (children stop in reverse): the directory goes last.
    metrics.setServiceParent(provider)  # type: ignore[no-untyped-call]  # (not annotated)
    admin.setServiceParent(provider)  # type: ignore[no-untyped-call]  # (not annotated)
