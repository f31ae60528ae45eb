"""A worker process of a provider with ``workers = N`` (``python -m
twisted_rpc.provider._worker SPEC``, spawned by the supervisor).

It serves the same services as the supervisor's ini says on the listening
sockets it inherits (descriptors 3, 4, ... in the order the provider's
listeners are made: native, C++, gRPC), adopting each
(:class:`AdoptingReactor`) instead of binding. Its stdin and stdout are the
control pipe, line-delimited JSON: it says ``{"loaded": pid}`` once its
services are built, serves on ``{"serve": true}`` (at once, or later for the
supervisor's spare) and then says ``{"ready": pid}``; it takes
``{"health": {service: status}}`` and ``{"restart": true}``, sent when a new
worker replaces it: it then drains as on SIGTERM, but its GOAWAY says IDLE,
not SHUTDOWN, so that consumers redial the same address. Its stderr is its
log, every line prefixed with ``[worker <pid>]``. With ``PROMETHEUS_MULTIPROC_DIR``
set (the supervisor serves ``[admin]``), it counts its calls in that directory
(``twisted_rpc.ops._worker_metrics``). SIGTERM drains it as a
provider drains; the end of its stdin (the supervisor is gone) does too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, TextIO, cast

from twisted.internet import tcp
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.provider._service import ProviderReactor, ProviderService

__all__ = [
    "AdoptingReactor",
    "ControlProtocol",
    "OneAcceptPort",
    "main",
    "worker_observer",
    "worker_settings",
]

log = Logger(namespace="twisted_rpc.provider.worker")

MAX_CONTROL_LINE = 65536


class OneAcceptPort(tcp.Port):
    """A listening port that accepts one connection each time it is readable.

    Every worker waits on the same socket; Twisted's port accepts up to 100
    connections per wake-up, so the first worker awake would take a whole
    burst (a consumer opening one connection per worker at once). One at a
    time, every waiting worker gets its turn, and a busy worker (slower to
    wake) takes fewer."""

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass


class AdoptingReactor:
    """A reactor whose ``listenTCP`` and ``listenSSL`` adopt the next
    inherited listening descriptor (``fds``, in order) instead of binding;
    the rest is the wrapped reactor's."""

    def __init__(self, reactor: Any, fds: Sequence[int], reuseport: bool = False) -> None:
        self._reactor = reactor
        self.fds = list(fds)
        self.reuseport = reuseport
        """Bind a socket of our own with SO_REUSEPORT to the inherited
        socket's address instead of adopting it (``worker_sockets = reuseport``)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        if not self.fds:
            raise RuntimeError("no inherited socket left for a listener")
        fd = self.fds.pop(0)
        sock = socket.socket(fileno=fd)
        family = sock.family
        bound = sock.getsockname()[1]
        sock.detach()
        if port and port != bound:
            raise RuntimeError(f"the inherited socket is on port {bound}, not {port}")
        if self.reuseport:
            fd = _reuseport_socket(fd, family, backlog)
        adopted: IListeningPort = self._reactor.adoptStreamPort(fd, family, factory)
        os.close(fd)  # (adoptStreamPort keeps a duplicate)
        if type(adopted) is tcp.Port:
            adopted.__class__ = OneAcceptPort
        return adopted

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        return self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory))


def _reuseport_socket(inherited: int, family: int, backlog: int) -> int:
    """A new listening socket with SO_REUSEPORT on ``inherited``'s address
    (which is closed); its descriptor."""
    held = socket.socket(fileno=inherited)
    address = held.getsockname()
    held.close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock.detach()


def worker_settings(workers: int, pid: int) -> dict[str, str]:
    """The connection settings that say which worker a connection reached."""
    return {"workers": str(workers), "worker": str(pid)}


def worker_observer(stream: TextIO, pid: int) -> FileLogObserver:
    """Log lines with the worker's id first (the supervisor adds the time)."""

    def format(event: Any) -> str | None:
        text = eventAsText(event, includeTimestamp=False)
        return f"[worker {pid}] {text}\n" if text else None

    return FileLogObserver(stream, format)


class ControlProtocol(Protocol):
    """The control pipe on stdin/stdout (see the module's docstring)."""

    def __init__(self, provider: ProviderService, stop: Any, serve: Any = None) -> None:
        self.provider = provider
        self.stop = stop
        self.serve = serve
        """Called on ``{"serve": true}`` (once)."""
        self.stopping = False
        """Set when the worker stops: the pipe's end then says nothing."""
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(message).encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if len(self._buffer) > MAX_CONTROL_LINE:
            log.warn("a control line over {n} bytes: dropped", n=MAX_CONTROL_LINE)
            self._buffer = b""
        for line in lines:
            self.line_received(line)

    def line_received(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            if message == {"serve": True}:
                serve, self.serve = self.serve, None
                if serve is not None:
                    serve()
                return
            if message == {"restart": True}:
                # Replaced: the address still serves, consumers redial it.
                log.info("replaced by a new worker: draining")
                self.provider.factory.goaway_reason = GoawayReason.IDLE
                self.stopping = True
                self.stop()
                return
            statuses = message["health"]
            for service, status in statuses.items():
                if not isinstance(service, str) or type(status) is not int:
                    raise ValueError(service)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warn("unknown control line {line!r}", line=line[:200])
            return
        for service, status in statuses.items():
            self.provider.health.set(service, status)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("the supervisor is gone: stopping")
            self.stop()


def main(argv: list[str]) -> None:
    """Run a worker (``argv[1]``: the supervisor's JSON spec)."""
    from twisted.internet import reactor, stdio

    from twisted_rpc.provider._tap import Options

    spec = json.loads(argv[1])
    pid = os.getpid()
    globalLogBeginner.beginLoggingTo([worker_observer(sys.stderr, pid)], redirectStandardIO=False)
    options = Options()
    options.parseOptions(spec["args"])  # type: ignore[no-untyped-call]  # (not annotated)
    config = options["provider_config"]
    fds = range(3, 3 + int(spec["listeners"]))
    adopting = AdoptingReactor(reactor, fds, reuseport=bool(spec.get("reuseport")))
    provider = ProviderService(
        cast(ProviderReactor, adopting),
        options["service_instances"],
        config.options(admin_listen=None),
    )
    provider.factory.extra_settings = worker_settings(int(spec["workers"]), pid)
    gauges = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # (the supervisor serves [admin])
        from twisted_rpc.ops._worker_metrics import watch_worker

        gauges = watch_worker(provider, reactor)
        reactor.addSystemEventTrigger("before", "shutdown", gauges.stop)

    def start() -> None:
        try:
            provider.startService()
        except Exception:
            log.failure("the worker could not start")
            reactor.stop()
            return
        if gauges is not None:
            gauges.start()
        control.send({"ready": pid})

    control = ControlProtocol(provider, reactor.stop, start)
    stdio.StandardIO(control)  # type: ignore[no-untyped-call]  # (not annotated)
    reactor.callWhenRunning(control.send, {"loaded": pid})
    reactor.addSystemEventTrigger("before", "shutdown", setattr, control, "stopping", True)
    reactor.addSystemEventTrigger("before", "shutdown", provider.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
