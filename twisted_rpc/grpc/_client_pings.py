"""PINGs on a gRPC consumer connection: :class:`GrpcPings`, mixed into
:class:`twisted_rpc.grpc.GrpcClientConnection`. A channel proves a new connection
with one; keepalive PINGs follow gRPC's ping policy: never more often than
every MIN_KEEPALIVE seconds (doubled each time a server says
``too_many_pings``), nor than every IDLE_KEEPALIVE seconds while no call is
in flight.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._states import ConnectionState
from twisted_rpc.core._connection import IRpcTransport
from twisted_rpc.core._status import UnavailableError

__all__ = ["IDLE_KEEPALIVE", "MIN_KEEPALIVE", "GrpcPings"]

MIN_KEEPALIVE = 10.0
"""Seconds at least between keepalive PINGs (gRPC's client floor)."""
IDLE_KEEPALIVE = 300.0
"""Seconds at least between PINGs while no call is in flight (what gRPC
servers allow by default: more often is a strike, and strikes a GOAWAY)."""

_PING = struct.Struct("!Q")


class GrpcPings:
    """HTTP/2 PINGs: ``ping()`` and the keepalive timer."""

    log: Logger
    clock: IReactorTime
    transport: IRpcTransport
    connected: int
    state: ConnectionState
    peer: str
    keepalive_interval: float
    keepalive_timeout: float
    outstanding: dict[int, Any]
    streams: dict[int, Any]
    h2: Any
    _flush: Callable[[], None]

    def _init_pings(self) -> None:
        self._pings: dict[bytes, tuple[Deferred[float], float]] = {}
        self._next_ping = 0
        self._last_ping = float("-inf")
        self._keepalive: IDelayedCall | None = None

    def ping(self, payload: bytes = b"") -> Deferred[float]:
        """Send an HTTP/2 PING; the Deferred fires with the round-trip time."""
        if not self.connected or self.state is ConnectionState.CLOSED:
            return fail(UnavailableError(message="not connected"))
        self._next_ping += 1
        opaque = _PING.pack(self._next_ping & 0xFFFFFFFFFFFFFFFF)
        d: Deferred[float] = Deferred(lambda _: self._forget_ping(opaque))
        now = self.clock.seconds()
        self._pings[opaque] = (d, now)
        self._last_ping = now
        self.h2.ping(opaque)
        self._flush()
        return d

    def _forget_ping(self, opaque: bytes) -> None:
        self._pings.pop(opaque, None)

    def _ping_every(self) -> float:
        """Seconds between keepalive PINGs now: gRPC's policy (never below
        MIN_KEEPALIVE; IDLE_KEEPALIVE at least while no call is in flight)."""
        every = max(self.keepalive_interval, MIN_KEEPALIVE)
        if not self.outstanding and not self.streams:
            every = max(every, IDLE_KEEPALIVE)
        return every

    def _keepalive_due(self) -> None:
        self._keepalive = None
        if not self.connected:
            return
        every = max(self.keepalive_interval, MIN_KEEPALIVE)
        wait = self._last_ping + self._ping_every() - self.clock.seconds()
        if wait > 0:  # pinged lately, or idle: look again (a call may start meanwhile)
            self._keepalive = self.clock.callLater(min(wait, every), self._keepalive_due)
            return
        d = self.ping()
        d.addTimeout(self.keepalive_timeout, self.clock)
        d.addCallbacks(self._keepalive_answered, self._keepalive_missed)

    def _keepalive_answered(self, rtt: float) -> None:
        if self.connected:
            every = max(self.keepalive_interval, MIN_KEEPALIVE)
            self._keepalive = self.clock.callLater(every, self._keepalive_due)

    def _keepalive_missed(self, failure: Failure) -> None:
        if self.connected:
            self.state = ConnectionState.UNRESPONSIVE
            self.log.warn(
                "no answer to a keepalive PING from {peer} in {t:g}s: closing the connection",
                peer=self.peer,
                t=self.keepalive_timeout,
            )
            self.transport.abortConnection()
