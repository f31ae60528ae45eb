"""The native listener: :class:`ServerFactory` builds its connections for a
dispatcher and sweeps idle ones and stalled frames; what it shares with the
C++ listener (limits, calls in flight, the drain) is :class:`ListenerFactory`.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._connection import CLOSE_TIMEOUT
from twisted_rpc.server._connection import ServerConnection
from twisted_rpc.server._dispatcher import Dispatcher
from twisted_rpc.server._listener import SHUTTING_DOWN, ListenerFactory, ServerLimits

__all__ = ["ServerFactory", "ServerLimits"]

log = Logger(namespace="twisted_rpc.server")


class ServerFactory(ListenerFactory[ServerConnection]):
    """Builds :class:`ServerConnection` s for a dispatcher and tracks them."""

    protocol = ServerConnection

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: IReactorTime,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        limits: ServerLimits | None = None,
    ) -> None:
        super().__init__(dispatcher, clock, limits)
        self.max_frame_size = max_frame_size
        self.partial_bytes = 0
        """Bytes of partial frames held by all connections."""
        self._sweeper: IDelayedCall | None = None
        self.goaway_reason = GoawayReason.SHUTDOWN
        """The reason :meth:`goaway` gives: IDLE when a worker is replaced
        in a rolling restart (the address still serves: consumers redial)."""
        self.extra_settings: dict[str, str] = {}
        """More connection settings for every connection (a worker's
        ``workers`` and ``worker``, docs/protocol.md)."""

    def goaway(self, message: str = SHUTTING_DOWN) -> None:
        """Refuse new calls on every connection, present and future, with
        :attr:`goaway_reason`."""
        self.draining = True
        self.goaway_message = message
        for connection in list(self.connections):
            connection.goaway(message, self.goaway_reason)

    def shed_partial_frames(self) -> None:
        """Over ``max_buffered_bytes`` of partial frames and unread stream
        messages: close the connections holding the most until the total is
        back under it."""
        limit = self.limits.max_buffered_bytes
        holders = sorted(
            (c for c in self.connections if c.held or c.stream_held),
            key=lambda c: -(c.held + c.stream_held),
        )
        for connection in holders:
            if self.partial_bytes <= limit:
                break
            connection.drop(
                f"it holds the most, {connection.held} bytes of a partial frame and "
                f"{connection.stream_held} of unread stream messages, while "
                f"{self.partial_bytes} bytes are held (max_buffered_bytes {limit})"
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
