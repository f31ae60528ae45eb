"""How a provider's gRPC connection ends, and what it does not take:
:class:`ConnectionEnds`, mixed into
:class:`twisted_rpc.grpc._server.GrpcServerConnection`.

Graceful stop: a GOAWAY naming the last stream taken (sent beside h2, whose
own GOAWAY would stop it reading the frames of the calls still running);
streams opened past it are refused. gRPC's server ping policy: more than
:data:`MAX_PING_STRIKES` PINGs closer than :data:`MIN_PING_INTERVAL` while
nothing is sent to the client end the connection with GOAWAY
ENHANCE_YOUR_CALM (``too_many_pings``). Now and then (the listener's sweep)
requests still not whole after ``frame_timeout`` or past their deadline
are ended, and a connection idle for ``idle_timeout`` closed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import PingReceived
from h2.exceptions import H2Error
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_rpc.core._connection import CLOSE_TIMEOUT
from twisted_rpc.core._status import DeadlineExceededError, RpcError
from twisted_rpc.server._connection import IServerTransport
from twisted_rpc.server._dispatcher import MAX_ERROR_MESSAGE, clip
from twisted_rpc.server._listener import SHUTTING_DOWN

if TYPE_CHECKING:
    from twisted_rpc.grpc._listener import GrpcServerFactory
    from twisted_rpc.grpc._server_wire import GrpcCall, WriteWatch

__all__ = ["IDLE_PING_INTERVAL", "MAX_PING_STRIKES", "MIN_PING_INTERVAL", "ConnectionEnds"]

log = Logger(namespace="twisted_rpc.grpc")

MIN_PING_INTERVAL = 300.0
"""Seconds a client should leave between PINGs while calls are open and
nothing is sent to it (gRPC's ``min_recv_ping_interval_without_data``)."""
IDLE_PING_INTERVAL = 7200.0
"""The same with no call open (gRPC allows one PING in two hours then)."""
MAX_PING_STRIKES = 2
"""PINGs closer than that tolerated; the next one ends the connection."""


class ConnectionEnds:
    """Draining, closing, the ping policy and the sweep of one connection."""

    h2: H2Connection
    transport: IServerTransport
    factory: GrpcServerFactory
    clock: IReactorTime
    peer: str
    connected: int
    started: bool
    closing: bool
    goaway_id: int | None
    goaway_message: str
    calls: dict[int, GrpcCall]
    pending: dict[int, Any]
    streams: dict[int, Any]
    last_active: float
    ping_strikes: int
    last_ping: float
    _batch: list[bytes] | None
    _watch: WriteWatch | None
    _close_timer: IDelayedCall | None

    if TYPE_CHECKING:

        def _flush(self) -> None: ...
        def _request_failed(self, call: GrpcCall, error: RpcError) -> None: ...

    def _ping(self, event: PingReceived) -> None:
        now = self.clock.seconds()
        busy = self.calls or self.pending or self.streams
        if now - self.last_ping < (MIN_PING_INTERVAL if busy else IDLE_PING_INTERVAL):
            self.ping_strikes += 1
        self.last_ping = now
        if self.ping_strikes > MAX_PING_STRIKES:
            self._close_after_error(
                f"{self.ping_strikes} PINGs within gRPC's ping policy's interval "
                "while nothing was sent (too_many_pings)",
                ErrorCodes.ENHANCE_YOUR_CALM,
                b"too_many_pings",
            )

    def goaway(self, message: str = "") -> None:
        """Tell the client to open no more calls here (GOAWAY naming the last
        stream taken); the calls taken still finish."""
        if self.goaway_id is not None:
            return
        self.goaway_id = self.h2.highest_inbound_stream_id
        self.goaway_message = message or SHUTTING_DOWN
        self.send_goaway()

    def send_goaway(self) -> None:
        """Write the graceful GOAWAY, once the connection has started (after
        the server's SETTINGS). It is sent beside h2, whose own GOAWAY would
        stop it reading the frames of the calls still running."""
        if self.goaway_id is None or not self.started or not self.connected or self.closing:
            return
        self._flush()
        frame = GoAwayFrame(
            0,
            last_stream_id=self.goaway_id,
            error_code=ErrorCodes.NO_ERROR,
            additional_data=clip(self.goaway_message).encode("utf-8")[:MAX_ERROR_MESSAGE],
        )
        self.transport.write(frame.serialize())

    def close(self) -> None:
        """Close once what was written is sent (a last GOAWAY first)."""
        if not self.closing:
            self.closing = True
            try:
                self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self.goaway_id)
            except H2Error:
                pass
            self._flush()
        self._lose()

    def drop(self, why: str) -> None:
        """Close at once for ``why`` (logged)."""
        log.warn("closing gRPC connection from {peer}: {why}", peer=self.peer, why=why)
        self.closing = True
        self.transport.abortConnection()

    def _close_after_error(
        self, why: str, code: ErrorCodes = ErrorCodes.PROTOCOL_ERROR, data: bytes = b""
    ) -> None:
        """Stop reading and close: a GOAWAY with ``code`` (h2 queued it if it
        found the error), then what was written is flushed, or the
        connection aborted after CLOSE_TIMEOUT."""
        if why:
            log.warn(
                "closing gRPC connection from {peer}: {why}", peer=self.peer, why=clip(why, 300)
            )
        self.closing = True
        self._batch = None
        try:
            self.h2.close_connection(code, data or None)
        except H2Error:
            pass  # (h2 sent its own GOAWAY)
        self._flush()
        self._lose()
        if self._close_timer is None and self.connected:
            self._close_timer = self.clock.callLater(CLOSE_TIMEOUT, self._close_timed_out)

    def _lose(self) -> None:
        if self._watch is not None and self._watch.connection is not None:
            self._watch.connection = None
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self.connected:
            log.warn("aborting gRPC connection from {peer}: not reading", peer=self.peer)
            self.transport.abortConnection()

    def sweep(self, now: float) -> None:
        """Called now and then by the listener: end the requests still not
        whole after ``frame_timeout`` or past their deadline; close the
        connection after ``idle_timeout`` without a call."""
        limits = self.factory.limits
        for call in list(self.calls.values()):
            if call.dispatched or call.trailers is not None:
                continue
            if call.deadline is not None and now >= call.deadline:
                error = DeadlineExceededError(message="deadline exceeded at the provider")
            elif limits.frame_timeout and now - call.opened >= limits.frame_timeout:
                error = DeadlineExceededError(
                    message=f"request not whole within {limits.frame_timeout:g}s (frame_timeout)"
                )
            else:
                continue
            self._request_failed(call, error)
        if (
            limits.idle_timeout
            and not self.closing
            and not self.calls
            and not self.pending
            and not self.streams
            and now - self.last_active >= limits.idle_timeout
        ):
            log.info("closing idle gRPC connection from {peer}", peer=self.peer)
            self.goaway("connection closed as idle")
            self.close()
        elif self.connected and not self.closing:
            self._flush()
