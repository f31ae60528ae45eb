"""The provider's gRPC listener: :class:`GrpcServerFactory` builds a
:class:`GrpcServerConnection` per connection, tells each its HTTP/2
settings, offers ``h2`` in TLS's ALPN, bounds the request bytes its
connections hold, and now and then sweeps stalled requests and idle
connections. What it shares with the other listeners (limits, calls in
flight, the drain) is :class:`ListenerFactory`.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings
from twisted.internet.interfaces import IDelayedCall, IProtocolNegotiationFactory, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twisted_rpc.grpc._server import GrpcServerConnection
from twisted_rpc.server._dispatcher import Dispatcher
from twisted_rpc.server._listener import ListenerFactory, ServerLimits

__all__ = ["GrpcServerFactory"]

log = Logger(namespace="twisted_rpc.grpc")

DEFAULT_WINDOW = 65535
"""HTTP/2's initial connection window, before any WINDOW_UPDATE."""
CONNECTION_WINDOWS = 16
"""A connection's receive window, in stream windows (``stream_window``): a
few slow client streams do not stall the others, and what one connection's
unread requests hold is bounded by it."""
MIN_HEADER_LIST_SIZE = 16 * 1024


@implementer(IProtocolNegotiationFactory)
class GrpcServerFactory(ListenerFactory[GrpcServerConnection]):
    """Connections speaking gRPC (HTTP/2) to ``dispatcher``'s services.

    HTTP/2 settings from ``limits``: MAX_CONCURRENT_STREAMS is
    ``max_streams_per_connection`` (every gRPC call is a stream),
    INITIAL_WINDOW_SIZE ``stream_window``, MAX_HEADER_LIST_SIZE twice
    ``max_metadata_size`` (at least 16 KiB; a request whose metadata is over
    ``max_metadata_size`` is answered RESOURCE_EXHAUSTED). Messages are
    ``max_message_size`` at most.
    """

    protocol = GrpcServerConnection
    name = "gRPC"

    def __init__(
        self, dispatcher: Dispatcher, clock: IReactorTime, limits: ServerLimits | None = None
    ) -> None:
        super().__init__(dispatcher, clock, limits)
        limits = self.limits
        self.partial_bytes = 0
        """Bytes of requests held by all connections (partial or not taken yet)."""
        self.header_list_size = max(MIN_HEADER_LIST_SIZE, 2 * limits.max_metadata_size)
        self.connection_window = min(2**31 - 1, limits.stream_window * CONNECTION_WINDOWS)
        # h2's checks of every header, sent or received, cost more than the
        # rest of a call: what is sent is built valid here (metadata checked
        # on its way out), what is received is checked in one pass by the
        # connection (see _server.malformed).
        self.h2_config = H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self._sweeper: IDelayedCall | None = None

    # ----------------------------------------------------------------- HTTP/2

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN under TLS: HTTP/2 only (gRPC clients ask for it)."""
        return [b"h2"]

    def new_h2(self) -> H2Connection:
        """A server-side H2Connection with this listener's settings (in
        force at once, before the client acknowledges them: they only allow
        more than HTTP/2's defaults, or bound what it may send)."""
        limits = self.limits
        h2 = H2Connection(self.h2_config)
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_streams_per_connection,
                SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.header_list_size,
            },
        )
        h2.decoder.max_header_list_size = self.header_list_size
        return h2

    def start_h2(self, h2: H2Connection) -> None:
        """The server's first frames: its SETTINGS, its connection window."""
        h2.initiate_connection()
        if self.connection_window > DEFAULT_WINDOW:
            h2.increment_flow_control_window(self.connection_window - DEFAULT_WINDOW)

    # ----------------------------------------------------------------- bounds

    def shed_partial_frames(self) -> None:
        """Over ``max_buffered_bytes`` of requests held: close the
        connections holding the most until the total is back under it."""
        limit = self.limits.max_buffered_bytes
        holders = sorted(
            (c for c in self.connections if c.stream_held), key=lambda c: -c.stream_held
        )
        for connection in holders:
            if self.partial_bytes <= limit:
                break
            connection.drop(
                f"it holds the most, {connection.stream_held} bytes of requests, while "
                f"{self.partial_bytes} bytes are held (max_buffered_bytes {limit})"
            )

    def startFactory(self) -> None:
        interval = self._sweep_interval()
        if self._sweeper is None and interval:
            self._sweeper = self.clock.callLater(interval, self._sweep)

    def stopFactory(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None

    def _sweep_interval(self) -> float:
        """How often connections are swept (0: never): half the idle
        timeout, a third of the frame timeout."""
        limits = self.limits
        intervals = []
        if limits.idle_timeout > 0:
            intervals.append(limits.idle_timeout / 2)
        if limits.frame_timeout > 0:
            intervals.append(limits.frame_timeout / 3)
        return min(intervals, default=0.0)

    def _sweep(self) -> None:
        now = self.clock.seconds()
        for connection in list(self.connections):
            try:
                connection.sweep(now)
            except Exception:
                log.failure("sweeping gRPC connection from {peer}", peer=connection.peer)
        self._sweeper = self.clock.callLater(self._sweep_interval(), self._sweep)
