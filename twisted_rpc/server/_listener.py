"""What every listener's factory shares: :class:`ListenerFactory`.

The native :class:`ServerFactory` and the C++ listener's factory both hold
their connections (capped in all and per peer), count the calls in flight
that their connections' :class:`CallRunner` s run, tell an observer of each
call's end, and drain (:class:`IDrainable`: GOAWAY, wait for the calls,
close). Each subclass adds its wire's settings and its connection class
(``protocol``, built with the factory as its one argument).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar
from typing import Protocol as Structural

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._compress import DEFAULT_COMPRESS_THRESHOLD, check_encoding
from twisted_rpc.core._connection import RefusedConnection
from twisted_rpc.core._flow import check_window
from twisted_rpc.core._interfaces import ICallObserver, IDrainable
from twisted_rpc.core._log_throttle import LogThrottle
from twisted_rpc.core._status import UnavailableError
from twisted_rpc.server._dispatcher import Dispatcher
from twisted_rpc.server._limiter import AdaptiveLimiter

REFUSED_LOG_INTERVAL = 10.0
"""Seconds between the lines that log calls refused unrun (shed, late)."""

log = Logger(namespace="twisted_rpc.server")

SHUTTING_DOWN = "provider is shutting down"
"""The message of the calls refused once a listener drains."""


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
    max_streams_per_connection: int = 256
    """Streams open at once on one connection (more: RESOURCE_EXHAUSTED);
    open streams also count as calls in flight (``max_calls_per_connection``,
    ``max_calls``)."""
    max_streams: int = 10000
    """Streams open at once on all connections together."""
    stream_window: int = 256 * 1024
    """Bytes of request messages each stream may send ahead of its handler
    (its receive window; see docs/protocol.md, "Flow control")."""
    max_message_size: int = 4 * 1024 * 1024
    """Largest request message a stream takes, told to consumers in the
    settings (their ``write()`` refuses a larger one); a consumer that sends
    one anyway is cut off as soon as its frame's header is in."""
    stream_idle_timeout: float = 0.0
    """End a stream (DEADLINE_EXCEEDED) after this long without a message
    either way (0: never)."""
    adaptive_limit: bool = False
    """Shed ordinary calls over an adaptive concurrency limit that falls as
    their latency rises (:class:`AdaptiveLimiter`; docs/resilience.md)."""
    adaptive_min_limit: int = 4
    """The adaptive limit never falls below this many calls in flight."""
    adaptive_max_limit: int = 1000
    """Nor rises above this many (``max_calls`` still applies too)."""
    compression_threshold: int = DEFAULT_COMPRESS_THRESHOLD
    """Smallest answer (or stream message) compressed, in bytes, on a
    connection whose consumer compresses (0: every one)."""
    compression: str | None = None
    """The encoding answers are compressed with: None follows the consumer
    (its first listed encoding), ``"zlib"``/``"zstd"`` is preferred when the
    consumer lists it, ``"identity"`` never compresses (requests still read)."""

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
            "max_streams_per_connection",
            "max_streams",
            "max_message_size",
            "adaptive_min_limit",
            "adaptive_max_limit",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive int, not {value!r}")
        if type(self.adaptive_limit) is not bool:
            raise ValueError(
                f"ServerLimits.adaptive_limit must be a bool, not {self.adaptive_limit!r}"
            )
        if self.adaptive_min_limit > self.adaptive_max_limit:
            raise ValueError(
                f"ServerLimits.adaptive_min_limit ({self.adaptive_min_limit}) exceeds "
                f"adaptive_max_limit ({self.adaptive_max_limit})"
            )
        check_window(self.stream_window, "ServerLimits.stream_window")
        threshold = self.compression_threshold
        if type(threshold) is not int or threshold < 0:
            raise ValueError(
                f"ServerLimits.compression_threshold must be an int >= 0, not {threshold!r}"
            )
        if self.compression != "identity":
            try:
                check_encoding(self.compression, "ServerLimits.compression")
            except (TypeError, ValueError) as e:
                raise ValueError(f"{e} (identity: answers never compressed)") from None
        for name in ("idle_timeout", "frame_timeout", "stream_idle_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"ServerLimits.{name} must be seconds >= 0, not {value!r}")


class ListenerConnection(Structural):
    """What a listener's factory uses of its connections (the native
    :class:`ServerConnection`, the C++ listener's protocol)."""

    peer_host: str | None
    """The peer's host, known once the connection is made (None if it has none)."""

    @property
    def transport(self) -> ITCPTransport: ...

    def goaway(self, message: str) -> None:
        """Refuse new calls from now on, with ``message``."""

    def close(self) -> None:
        """Close once what was written is sent."""


C = TypeVar("C", bound=ListenerConnection)
"""A listener's connection class."""


@implementer(IDrainable)
class ListenerFactory(Factory, Generic[C]):
    """Connections of one listener, their calls in flight, and their drain."""

    noisy = False
    name: ClassVar[str] = "native"
    """Names the listener in its log lines."""

    def __init__(
        self, dispatcher: Dispatcher, clock: IReactorTime, limits: ServerLimits | None
    ) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.limits = limits or ServerLimits()
        self.connections: set[C] = set()
        self.per_peer: dict[str, int] = {}
        """Connections open by peer host."""
        self.draining = False
        self.goaway_message = SHUTTING_DOWN
        self.in_flight = 0
        """Ordinary calls and streams in flight (see ``calls_in_flight`` for all)."""
        self.long_lived_in_flight = 0
        self.streams_in_flight = 0
        """Streams open (counted in ``in_flight`` too)."""
        self.idle_waiters: list[Deferred[None]] = []
        self.closed_waiters: list[Deferred[None]] = []
        self._observer: ICallObserver | None = None
        self._slow_call_threshold = 0.0
        self.timing = False
        """Whether successful calls are timed (for the observer or the slow-call log)."""
        limits = self.limits
        self.limiter: AdaptiveLimiter | None = None
        """The adaptive concurrency limit, when ``limits.adaptive_limit``."""
        self.admit_limit = limits.max_calls
        """Ordinary calls in flight from which one more is refused: ``max_calls``,
        or less while the adaptive limit is lower (see :meth:`limit_changed`)."""
        self.refusals = LogThrottle(REFUSED_LOG_INTERVAL)
        """Calls refused unrun (shed, late), logged together."""
        self.inline_of: object | None = None
        self.inline_ran = 0
        """Calls answered inline by the read being handled on the connection
        ``inline_of`` (adaptive limit only): their answers leave with that
        read's batch, so they count as in flight until it ends (see
        ``ServerConnection.limited_request_received``)."""
        if limits.adaptive_limit:
            self.limiter = AdaptiveLimiter(
                limits.adaptive_min_limit,
                limits.adaptive_max_limit,
                cpu_clock=time.process_time,
                wall_clock=clock.seconds,
            )
            self.limit_changed()

    def limit_changed(self) -> None:
        """The limiter moved its limit: admit calls up to it (and ``max_calls``)."""
        limiter = self.limiter
        cap = self.limits.max_calls
        self.admit_limit = cap if limiter is None else min(cap, limiter.limit)

    # ----------------------------------------------------------------- observing calls

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

    @property
    def calls_in_flight(self) -> int:
        """Calls in flight, long-lived ones included."""
        return self.in_flight + self.long_lived_in_flight

    # ----------------------------------------------------------------- connections

    protocol: Callable[[Any], Protocol]
    """The listener's connection class, built with the factory as its argument."""

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        limits = self.limits
        if len(self.connections) >= limits.max_connections:
            log.warn(
                "refusing connection from {addr} to the {listener} listener: {n} connections open",
                addr=addr,
                listener=self.name,
                n=len(self.connections),
            )
            return RefusedConnection()
        host = getattr(addr, "host", None)
        if host is not None and self.per_peer.get(host, 0) >= limits.max_connections_per_peer:
            log.warn(
                "refusing connection from {addr} to the {listener} listener: {n} connections "
                "open from {host} (max_connections_per_peer)",
                addr=addr,
                listener=self.name,
                n=self.per_peer[host],
                host=host,
            )
            return RefusedConnection()
        return self.protocol(self)

    def connection_made(self, connection: C) -> None:
        """``connection`` is open (its ``peer_host`` known): count it, and
        refuse its calls if the listener drains."""
        self.connections.add(connection)
        host = connection.peer_host
        if host is not None:
            self.per_peer[host] = self.per_peer.get(host, 0) + 1
        if self.draining:
            connection.goaway(self.goaway_message)

    def connection_lost(self, connection: C) -> None:
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

    # ----------------------------------------------------------------- draining

    def goaway(self, message: str = SHUTTING_DOWN) -> None:
        """Refuse new calls on every connection, present and future."""
        self.draining = True
        self.goaway_message = message
        for connection in list(self.connections):
            connection.goaway(message)

    def whenDrained(self) -> Deferred[None]:
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
        """Tell the waiters of :meth:`whenDrained` if no call is in flight now
        (on the next turn: the last call's answer is sent first)."""
        if self.idle_waiters and not self.calls_in_flight:
            waiters, self.idle_waiters = self.idle_waiters, []
            self.clock.callLater(0, fire_waiters, waiters)

    def closeConnections(self) -> Deferred[None]:
        """Close every connection once what was written to it is sent; the
        Deferred fires when all are closed (cancel it to stop waiting).
        Streams still open end first with UNAVAILABLE (their handlers closed)."""
        for connection in list(self.connections):
            end_streams = getattr(connection, "end_streams", None)
            if end_streams is not None and getattr(connection, "streams", None):
                end_streams(UnavailableError(message=f"{self.goaway_message}: grace period over"))
            connection.close()
        if not self.connections:
            return defer.succeed(None)
        waiters = self.closed_waiters
        d: Deferred[None] = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(d)
        return d

    def abortConnections(self) -> None:
        """Close every connection at once."""
        for connection in list(self.connections):
            connection.transport.abortConnection()


def fire_waiters(waiters: list[Deferred[None]]) -> None:
    """Fire each Deferred of ``waiters`` not fired (or cancelled) yet with None."""
    for d in waiters:
        if not d.called:
            d.callback(None)
