"""The provider's connections: :class:`ServerFactory` builds them for a
dispatcher, enforces :class:`ServerLimits` across them, sweeps idle ones and
stalled frames, and drains them (GOAWAY, wait for calls, close).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._connection import CLOSE_TIMEOUT, RefusedConnection
from twisted_rpc.core._interfaces import ICallObserver
from twisted_rpc.server._connection import ServerConnection
from twisted_rpc.server._dispatcher import Dispatcher

log = Logger(namespace="twisted_rpc.server")


@dataclass(frozen=True)
class ServerLimits:
    """What one provider accepts at most (see docs/config.md, ``[provider]``)."""

    max_calls_per_connection: int = 1000
    """Calls in flight (answered through a Deferred) on one connection."""
    max_calls: int = 10000
    """Calls in flight on all connections together."""
    max_connections: int = 1000
    idle_timeout: float = 0.0
    """Close a connection with no call in flight and no frame for this long (0: never)."""
    max_long_lived_calls_per_connection: int = 100
    """Long-lived calls (``Service.long_lived_methods``) in flight on one
    connection; they do not count against ``max_calls_per_connection``."""
    max_long_lived_calls: int = 5000
    """Long-lived calls in flight on all connections; not counted in ``max_calls``."""
    max_metadata_size: int = wire.DEFAULT_MAX_EXT_SIZE
    """Bytes of a request's extension (its metadata) read at most; a larger
    request is answered RESOURCE_EXHAUSTED unread."""
    max_metadata_entries: int = wire.DEFAULT_MAX_EXT_ENTRIES
    """Metadata pairs in one request at most; more: RESOURCE_EXHAUSTED, unread."""
    frame_timeout: float = 30.0
    """Seconds a frame, once started, has to arrive whole; then the connection
    is closed (0: no limit)."""
    max_connections_per_peer: int = 256
    """Connections open at once from one peer address (host)."""
    max_buffered_bytes: int = 256 * 1024 * 1024
    """Bytes of partial frames held across all connections; past it, the
    connections holding the largest partial frames are closed."""

    def __post_init__(self) -> None:
        for name in (
            "max_calls_per_connection",
            "max_calls",
            "max_connections",
            "max_long_lived_calls_per_connection",
            "max_long_lived_calls",
            "max_metadata_size",
            "max_metadata_entries",
            "max_connections_per_peer",
            "max_buffered_bytes",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive int, not {value!r}")
        for name in ("idle_timeout", "frame_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"ServerLimits.{name} must be seconds >= 0, not {value!r}")


class ServerFactory(Factory):
    """Builds :class:`ServerConnection` s for a dispatcher and tracks them."""

    noisy = False

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: IReactorTime,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        limits: ServerLimits | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.max_frame_size = max_frame_size
        self.limits = limits or ServerLimits()
        self.connections: set[ServerConnection] = set()
        self.per_peer: dict[str, int] = {}
        """Connections open by peer host."""
        self.draining = False
        self.in_flight = 0
        """Ordinary calls in flight (see ``calls_in_flight`` for all)."""
        self.long_lived_in_flight = 0
        self.partial_bytes = 0
        """Bytes of partial frames held by all connections."""
        self.idle_waiters: list[Deferred] = []
        self.closed_waiters: list[Deferred] = []
        self._sweeper: Any = None
        self._observer: ICallObserver | None = None
        self._slow_call_threshold = 0.0
        self.timing = False
        """Whether successful calls are timed (for the observer or the slow-call log)."""

    @property
    def observer(self) -> ICallObserver | None:
        """Told of every call's end (metrics); see :mod:`twisted_rpc.ops._metrics`."""
        return self._observer

    @observer.setter
    def observer(self, observer: ICallObserver | None) -> None:
        self._observer = observer
        self.timing = observer is not None or self._slow_call_threshold > 0

    @property
    def slow_call_threshold(self) -> float:
        """Seconds from which a successful call is logged as slow (0: never)."""
        return self._slow_call_threshold

    @slow_call_threshold.setter
    def slow_call_threshold(self, seconds: float) -> None:
        self._slow_call_threshold = seconds
        self.timing = self._observer is not None or seconds > 0

    def buildProtocol(self, addr: object) -> ServerConnection | RefusedConnection:
        limits = self.limits
        if len(self.connections) >= limits.max_connections:
            log.warn(
                "refusing connection from {addr}: {n} connections open",
                addr=addr,
                n=len(self.connections),
            )
            return RefusedConnection()
        host = getattr(addr, "host", None)
        if host is not None and self.per_peer.get(host, 0) >= limits.max_connections_per_peer:
            log.warn(
                "refusing connection from {addr}: {n} connections open from {host} "
                "(max_connections_per_peer)",
                addr=addr,
                n=self.per_peer[host],
                host=host,
            )
            return RefusedConnection()
        return ServerConnection(self)

    def connection_made(self, connection: ServerConnection) -> None:
        self.connections.add(connection)
        host = connection.peer_host
        if host is not None:
            self.per_peer[host] = self.per_peer.get(host, 0) + 1

    def connection_lost(self, connection: ServerConnection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        if not self.connections and self.closed_waiters:
            waiters, self.closed_waiters = self.closed_waiters, []
            fire_waiters(waiters)
        host = connection.peer_host
        if host is not None:
            left = self.per_peer.get(host, 1) - 1
            if left > 0:
                self.per_peer[host] = left
            else:
                self.per_peer.pop(host, None)

    @property
    def calls_in_flight(self) -> int:
        """Calls in flight, long-lived ones included."""
        return self.in_flight + self.long_lived_in_flight

    def when_idle(self) -> Deferred[None]:
        """Fires once no call is in flight (at once if none is)."""
        if not self.calls_in_flight:
            return defer.succeed(None)
        d: Deferred[None] = Deferred(self._forget_waiter)
        self.idle_waiters.append(d)
        return d

    def _forget_waiter(self, d: Deferred[None]) -> None:
        if d in self.idle_waiters:
            self.idle_waiters.remove(d)

    def check_idle(self) -> None:
        """Tell the waiters of :meth:`when_idle` if no call is in flight now
        (on the next turn: the last call's answer is sent first)."""
        if self.idle_waiters and not self.calls_in_flight:
            waiters, self.idle_waiters = self.idle_waiters, []
            self.clock.callLater(0, fire_waiters, waiters)

    def shed_partial_frames(self) -> None:
        """Over ``max_buffered_bytes`` of partial frames: close the connections
        holding the largest ones until the total is back under it."""
        limit = self.limits.max_buffered_bytes
        holders = sorted((c for c in self.connections if c.held), key=lambda c: -c.held)
        for connection in holders:
            if self.partial_bytes <= limit:
                break
            connection.drop(
                f"its partial frame of {connection.held} bytes is the largest while "
                f"partial frames hold {self.partial_bytes} bytes (max_buffered_bytes "
                f"{limit})"
            )

    def startFactory(self) -> None:
        if self._sweeper is None and self._sweep_interval():
            self._sweeper = self.clock.callLater(self._sweep_interval(), self._sweep)

    def stopFactory(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None

    def _sweep_interval(self) -> float:
        """How often connections are checked for idleness and stalled frames
        (0: never): half the idle timeout, a third of the frame timeout."""
        limits = self.limits
        intervals = []
        if limits.idle_timeout > 0:
            intervals.append(limits.idle_timeout / 2)
        if limits.frame_timeout > 0:
            intervals.append(limits.frame_timeout / 3)
        return min(intervals, default=0.0)

    def _sweep(self) -> None:
        limits = self.limits
        now = self.clock.seconds()
        for connection in list(self.connections):
            if connection.closing:
                continue  # closed as idle already, or after an error: aborted in time
            started = connection.partial_since
            if started is not None and limits.frame_timeout:
                if now - started >= limits.frame_timeout:
                    connection.drop(
                        f"a frame started {now - started:.0f}s ago is still not whole "
                        f"({connection.decoder.buffered} bytes in; frame_timeout "
                        f"{limits.frame_timeout:g}s)"
                    )
                continue
            # Without a frame timeout, a partial frame is no activity either.
            if (
                limits.idle_timeout
                and not connection.pending
                and connection.last_active <= now - limits.idle_timeout
            ):
                log.info("closing idle connection from {peer}", peer=connection.peer)
                connection.goaway("connection closed as idle", GoawayReason.IDLE)
                connection.close_within(CLOSE_TIMEOUT, "GOAWAY (idle) unread")
        self._sweeper = self.clock.callLater(self._sweep_interval(), self._sweep)

    def goaway(self, message: str = "provider is shutting down") -> None:
        """Refuse new calls on every connection, present and future (GOAWAY
        SHUTDOWN on each)."""
        self.draining = True
        for connection in list(self.connections):
            connection.goaway(message, GoawayReason.SHUTDOWN)

    def close_connections(self) -> Deferred[None]:
        """Close every connection once what was written to it is sent; the
        Deferred fires when all are closed (cancel it to stop waiting)."""
        for connection in list(self.connections):
            connection.close()
        return when_empty(self.connections, self.closed_waiters)

    def abort_connections(self) -> None:
        for connection in list(self.connections):
            connection.transport.abortConnection()


def fire_waiters(waiters: list[Deferred]) -> None:
    """Fire each Deferred of ``waiters`` not fired (or cancelled) yet with None."""
    for d in waiters:
        if not d.called:
            d.callback(None)


def when_empty(connections: set[Any], waiters: list[Deferred]) -> Deferred[None]:
    """A Deferred firing once ``connections`` is empty (kept in ``waiters``)."""
    if not connections:
        return defer.succeed(None)
    d: Deferred[None] = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
    waiters.append(d)
    return d
