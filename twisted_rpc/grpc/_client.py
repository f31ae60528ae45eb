"""The consumer's gRPC wire: :class:`GrpcClientConnection`, one HTTP/2
connection (the ``h2`` library, client side) to any gRPC server.

It presents to :class:`twisted_rpc.client.Channel` and the
:class:`twisted_rpc.client.Client` the surface of
:class:`twisted_rpc.client.ClientConnection` (``call``, ``resume``,
``open_stream``, ``ping``, ``outstanding``, ``streams``, ``state``, the
``on_lost``/``on_goaway`` callbacks...), so proxies, balancers, failover,
deadlines and stream objects work unchanged. A call is one HTTP/2 stream
(its id is the call id); its HEADERS carry the path, ``grpc-timeout`` and
metadata, its DATA the length-prefixed messages, and the server's trailers
its status. The streaming half is :class:`GrpcStreamWire`.
Importing this module registers the ``grpc`` wire with the client's channels.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes, _error_code_from_int
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._calls import NotSentError, TakenBack
from twisted_rpc.client._channel import Channel
from twisted_rpc.client._connection import GOAWAY_CLOSE_GRACE, ClientConnection
from twisted_rpc.client._dials import register_wire
from twisted_rpc.client._options import ClientOptions
from twisted_rpc.client._states import ConnectionState
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._connection import IRpcTransport
from twisted_rpc.core._status import (
    InternalError,
    RpcError,
    UnavailableError,
)
from twisted_rpc.grpc._client_pings import MIN_KEEPALIVE, GrpcPings
from twisted_rpc.grpc._client_status import (
    header_fields,
    reset_error,
)
from twisted_rpc.grpc._client_streams import GrpcStreamWire
from twisted_rpc.grpc._client_unary import GrpcUnaryCalls, _Unary

__all__ = ["GrpcClientConnection"]

CONNECTION_WINDOW = 2**31 - 1
"""The connection's receive window: each stream's own window (and each
unary call's message limit) bounds what is held, not this."""
MAX_HEADER_LIST = 64 * 1024
"""Largest header list (or trailers) taken from a server, decoded."""

_OPEN = ConnectionState.OPEN


class _H2(H2Connection):
    """h2's client connection, except that a GOAWAY received leaves it open:
    a gRPC server sends one to drain, and the streams at or below its last
    id still finish (h2 alone would refuse every frame after it)."""

    def _receive_goaway_frame(self, frame: Frame) -> tuple[list[Frame], list[Event]]:
        event = ConnectionTerminated()
        event.error_code = _error_code_from_int(frame.error_code)  # type: ignore[attr-defined]
        event.last_stream_id = frame.last_stream_id  # type: ignore[attr-defined]
        event.additional_data = frame.additional_data or None  # type: ignore[attr-defined]
        return [], [event]


class GrpcClientConnection(GrpcUnaryCalls, GrpcStreamWire, GrpcPings, Protocol):
    """One HTTP/2 connection to a gRPC server, with ClientConnection's surface.

    ``outstanding`` maps a unary call's stream id to ``(deferred, method,
    payload, metadata, deadline)``, as on the native wire (what a GOAWAY
    hands back to be sent elsewhere); ``streams`` maps a streaming call's.
    """

    log = Logger()
    transport: IRpcTransport

    def __init__(
        self,
        clock: IReactorTime,
        options: ClientOptions | None = None,
        *,
        authority: str = "localhost",
        scheme: str = "http",
        on_lost: Callable[[Any, Failure], object] | None = None,
        on_goaway: Callable[[Any, GoawayReason, list[TakenBack]], object] | None = None,
        keepalive_interval: float | None = None,
    ) -> None:
        self.clock = clock
        self.options = options = options or ClientOptions()
        self.authority = authority
        self.scheme = scheme
        self._on_lost = on_lost
        self._on_goaway = on_goaway
        self.keepalive_interval = (
            options.keepalive_interval if keepalive_interval is None else keepalive_interval
        )
        self.keepalive_timeout = options.keepalive_timeout
        self.on_too_many_pings: Callable[[float], object] | None = None
        """Told the doubled keepalive interval after a ``too_many_pings`` GOAWAY."""
        self.outstanding: dict[int, TakenBack] = {}
        self.streams = {}
        self._calls: dict[int, _Unary] = {}
        self._init_streams()
        self._init_pings()
        self._close_timer: IDelayedCall | None = None
        self.state = ConnectionState.NEW
        self.goaway_reason: GoawayReason | None = None
        self.made_at = 0.0
        self.connected = False
        self.peer = "?"
        self.h2 = _H2(H2Configuration(client_side=True, header_encoding=None))
        self.h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: options.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST

    # ----------------------------------------------------------------- surface

    @property
    def available(self) -> bool:
        """Whether new calls may be sent here (open: connected, no GOAWAY)."""
        return self.state is _OPEN

    @property
    def goaway_received(self) -> bool:
        return self.goaway_reason is not None

    @property
    def keepalive_failed(self) -> bool:
        return self.state is ConnectionState.UNRESPONSIVE

    @property
    def streams_supported(self) -> bool | None:
        """gRPC servers always speak streams (a method that is not one
        answers UNIMPLEMENTED)."""
        return True if self.connected else None

    def _not_open(self) -> NotSentError:
        why = "server is shutting down" if self.goaway_reason is not None else "not connected"
        return NotSentError(message=f"{self.peer}: {why}")

    # ----------------------------------------------------------------- Protocol

    def connectionMade(self) -> None:
        self.connected = True
        self.made_at = self.clock.seconds()
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self.peer = f"{host}:{port}" if host is not None else str(peer)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.state = _OPEN
        self._flush()
        self._last_ping = self.made_at
        if self.keepalive_interval > 0:
            every = max(self.keepalive_interval, MIN_KEEPALIVE)
            self._keepalive = self.clock.callLater(every, self._keepalive_due)

    def dataReceived(self, data: bytes) -> None:
        self._receiving = True
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self._receiving = False
            self._broken(f"HTTP/2 error: {e}")
            return
        try:
            for event in events:
                handler = self._events.get(type(event))
                if handler is not None:
                    handler(self, event)
            self._fire_woken()
        except Exception:
            self._receiving = False
            self.log.failure("closing the connection to {peer}: error handling it", peer=self.peer)
            self._broken("error handling what the server sent")
            return
        self._receiving = False
        self._flush()

    def _flush(self) -> None:
        """Write what h2 has to send (at the end of a received chunk, if in one)."""
        if not self._receiving and self.connected:
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def _broken(self, why: str) -> None:
        """The server broke HTTP/2 (or us): every call ends UNAVAILABLE now,
        the GOAWAY h2 prepared is sent and the connection closed."""
        self.log.warn("closing the connection to {peer}: {why}", peer=self.peer, why=why)
        self.state = ConnectionState.CLOSED
        self._end_all(UnavailableError(message=f"connection to {self.peer}: {why}"))
        self._flush()
        self.transport.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.clock.callLater(GOAWAY_CLOSE_GRACE, self._close_overdue)

    def close(self) -> None:
        """Close at once (the calls in flight fail UNAVAILABLE)."""
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self.state is not ConnectionState.UNRESPONSIVE:
            self.state = ConnectionState.CLOSED
        for timer in (self._keepalive, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._keepalive = self._close_timer = None
        self._end_all(UnavailableError(message=f"connection to {self.peer} lost"))
        pings, self._pings = self._pings, {}
        for d, _ in pings.values():
            d.errback(UnavailableError(message=f"connection to {self.peer} lost"))
        if self._on_lost is not None:
            self._on_lost(self, reason)

    def _end_all(self, error: RpcError) -> None:
        for unary in self._calls.values():
            if unary.timer is not None and unary.timer.active():
                unary.timer.cancel()
        self._calls.clear()
        self._outbox.clear()
        self._outbox_bytes = 0
        outstanding = list(self.outstanding.values())
        self.outstanding.clear()
        for d, *_ in outstanding:
            d.errback(error)
        streams = list(self.streams.values())
        self.streams.clear()
        self._stream_state.clear()
        for stream in streams:
            stream.end(error)

    # ----------------------------------------------------------------- events

    def _on_response(self, event: ResponseReceived) -> None:
        sid = event.stream_id
        fields = header_fields(event.headers or ())
        ended = event.stream_ended is not None
        unary = self._calls.get(sid)
        if unary is not None:
            self._unary_headers(sid, unary, fields, ended)
        elif sid in self.streams:
            self._stream_headers(sid, fields, event.headers or (), ended)

    def _on_data(self, event: DataReceived) -> None:
        sid = event.stream_id
        data = event.data or b""
        flow = event.flow_controlled_length or 0
        unary = self._calls.get(sid)
        if unary is not None:
            self._ack(sid, flow)  # bounded by the reader's limit, not held back
            self._unary_data(sid, unary, data)
        elif sid in self.streams:
            self._stream_data(sid, data, flow)
        else:
            self._ack(sid, flow)  # a call that ended here: give the window back

    def _on_trailers(self, event: TrailersReceived) -> None:
        sid = event.stream_id
        fields = header_fields(event.headers or ())
        unary = self._calls.get(sid)
        if unary is not None:
            self._unary_trailers(sid, unary, fields)
        elif sid in self.streams:
            self._stream_trailers(sid, fields, event.headers or ())

    def _on_stream_ended(self, event: StreamEnded) -> None:
        sid = event.stream_id
        error = InternalError(message=f"{self.peer} ended the call without a grpc-status")
        if sid in self._calls:
            self._end_call(sid, error, reset=False)
        elif sid in self.streams:
            self._end_stream(sid, error, reset=False)

    def _on_reset(self, event: StreamReset) -> None:
        sid = event.stream_id
        error = reset_error(event.error_code or 0, self.peer)
        if sid in self._calls:
            self._end_call(sid, error, reset=False)
        elif sid in self.streams:
            self._end_stream(sid, error, reset=False)

    def _on_window(self, event: WindowUpdated) -> None:
        if event.stream_id:
            self._pump(event.stream_id)
        else:
            self._pump_all()

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        self._pump_all()

    def _on_ping_ack(self, event: PingAckReceived) -> None:
        entry = self._pings.pop(event.ping_data or b"", None)
        if entry is not None:
            d, sent = entry
            d.callback(self.clock.seconds() - sent)

    def _got_goaway(self, event: ConnectionTerminated) -> None:
        """No new calls here; the calls above ``last_stream_id`` were never
        run: taken back and handed to ``on_goaway`` to be sent again."""
        code = int(event.error_code or 0)
        last = event.last_stream_id or 0
        debug = event.additional_data or b""
        if self.state is _OPEN:
            self.state = ConnectionState.GOAWAY
        reason = GoawayReason.SHUTDOWN
        if code == ErrorCodes.NO_ERROR and (b"max_idle" in debug or b"max_age" in debug):
            reason = GoawayReason.IDLE
        elif code == ErrorCodes.ENHANCE_YOUR_CALM:
            reason = GoawayReason.OVERLOAD
            if b"too_many_pings" in debug and self.keepalive_interval > 0:
                self.keepalive_interval = max(self.keepalive_interval, MIN_KEEPALIVE) * 2
                self.log.warn(
                    "{peer} said too_many_pings: keepalive PINGs every {t:g}s from now on",
                    peer=self.peer,
                    t=self.keepalive_interval,
                )
                if self.on_too_many_pings is not None:
                    self.on_too_many_pings(self.keepalive_interval)
        self.goaway_reason = reason
        taken = []
        for sid in sorted(s for s in self.outstanding if s > last):
            entry = self.outstanding.pop(sid)
            unary = self._calls.pop(sid)
            if unary.timer is not None and unary.timer.active():
                unary.timer.cancel()
            self._drop_outbox(sid)
            entry[0].holder = None  # in transit
            taken.append(entry)
        for sid in [s for s in self.streams if s > last]:
            self._end_stream(sid, NotSentError(message=f"{self.peer}: server sent GOAWAY"), None)
        self.log.info(
            "{peer} sent GOAWAY (HTTP/2 error {code}, last stream {last}{debug}): "
            "{n} calls it never ran go again",
            peer=self.peer,
            code=code,
            last=last,
            debug=f", {debug[:64]!r}" if debug else "",
            n=len(taken),
        )
        if self._on_goaway is not None:
            self._on_goaway(self, reason, taken)
        else:
            for d, *_ in taken:
                d.errback(NotSentError(message=f"{self.peer}: server sent GOAWAY"))
        self._close_if_done()

    def _close_if_done(self) -> None:
        """After a GOAWAY, once no call is left: say GOAWAY too and close
        (aborted GOAWAY_CLOSE_GRACE seconds later if it has not closed)."""
        if self.outstanding or self.streams or not self.connected or self._close_timer is not None:
            return
        try:
            self.h2.close_connection()
        except H2Error:
            pass
        self._flush()
        self.transport.loseConnection()
        self._close_timer = self.clock.callLater(GOAWAY_CLOSE_GRACE, self._close_overdue)

    def _close_overdue(self) -> None:
        self._close_timer = None
        if self.connected:
            self.log.warn("aborting the connection to {peer}: not closed in time", peer=self.peer)
            self.transport.abortConnection()

    _events: dict[type, Callable[[GrpcClientConnection, Any], None]] = {
        ResponseReceived: _on_response,
        DataReceived: _on_data,
        TrailersReceived: _on_trailers,
        StreamEnded: _on_stream_ended,
        StreamReset: _on_reset,
        WindowUpdated: _on_window,
        RemoteSettingsChanged: _on_settings,
        PingAckReceived: _on_ping_ack,
        ConnectionTerminated: _got_goaway,
    }


# ----------------------------------------------------------------- the channel's wire

_KEEPALIVE: weakref.WeakKeyDictionary[Channel, float] = weakref.WeakKeyDictionary()
"""A channel's keepalive interval after a server said too_many_pings (kept
for the connections it dials next)."""


def connect_grpc(channel: Channel) -> ClientConnection:
    """The connection a channel dials a gRPC server with."""
    address = channel.address
    host = f"[{address.host}]" if ":" in address.host else address.host
    connection = GrpcClientConnection(
        channel.clock,
        channel.options,
        authority=f"{host}:{address.port}",
        scheme="https" if channel.options.tls is not None else "http",
        on_lost=channel._connection_lost,
        on_goaway=channel._goaway,
        keepalive_interval=_KEEPALIVE.get(channel),
    )
    connection.on_too_many_pings = lambda every: _KEEPALIVE.__setitem__(channel, every)
    # Not a ClientConnection, but the same surface (what channels use of it).
    return cast(ClientConnection, connection)


register_wire("grpc", connect_grpc)
