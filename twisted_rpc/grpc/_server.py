"""One provider-side gRPC connection: :class:`GrpcServerConnection`.

HTTP/2 through ``h2`` (server side); each HTTP/2 stream is one call, its
stream id the call id, run by the same :class:`CallRunner` as the native
wire (routes, limits, interceptors, deadlines, errors, metrics, the drain):

- ``:path /package.Service/Method`` is the route ``b"package.Service/Method"``
  (none: UNIMPLEMENTED); ``content-type`` must be ``application/grpc[+...]``
  (else HTTP 415), the method POST (else 405); ``grpc-timeout`` is the
  call's timeout, the other headers its metadata (``-bin`` ones base64);
  ``grpc-encoding`` identity or gzip (else UNIMPLEMENTED);
- a unary or server-streaming call runs once its one request message and
  END_STREAM are in (none, or a second one: INTERNAL); a client-streaming or
  bidi call starts at HEADERS, its messages go to the handler as they come
  and END_STREAM ends them;
- RST_STREAM cancels the call, the connection's loss cancels them all.

The answers are written by :class:`ResponseWriter`. Graceful stop: GOAWAY
naming the last stream taken; streams opened past it are refused
(RST_STREAM REFUSED_STREAM: the client may retry them elsewhere). PINGs are
answered (by h2) within gRPC's server ping policy: more than
:data:`MAX_PING_STRIKES` PINGs closer than :data:`MIN_PING_INTERVAL` while
nothing is sent to the client end the connection (GOAWAY ENHANCE_YOUR_CALM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core._flow import Inbox, fire_woken
from twisted_rpc.core._status import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RpcError,
    UnimplementedError,
)
from twisted_rpc.grpc._server_ends import ConnectionEnds
from twisted_rpc.grpc._server_headers import RequestHead, read_request_headers
from twisted_rpc.grpc._server_wire import GrpcCall, ResponseWriter, WriteWatch
from twisted_rpc.grpc._wire import GrpcWireError, MessageReader, parse_timeout
from twisted_rpc.server._connection import IServerTransport
from twisted_rpc.server._dispatcher import clip
from twisted_rpc.server._runner import CallRunner

if TYPE_CHECKING:
    from twisted_rpc.grpc._listener import GrpcServerFactory

__all__ = ["GrpcServerConnection"]

log = Logger(namespace="twisted_rpc.grpc")

UNBOUNDED = 2**62
"""A client stream's Inbox never refuses a message: h2 enforces the window."""


class GrpcServerConnection(ConnectionEnds, ResponseWriter, CallRunner, Protocol):
    """One HTTP/2 connection of gRPC calls on a provider."""

    call_label = "gRPC call {call_id}"
    supports_streams = True
    factory: GrpcServerFactory
    transport: IServerTransport

    def __init__(self, factory: GrpcServerFactory) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.routes = factory.dispatcher.routes
        self.peer = "?"
        self.peer_host: str | None = None
        self.connected = False
        self.closing = False
        """No more is read: the connection is being closed (after an error, say)."""
        self.started = False
        """The client spoke, the server's SETTINGS went out."""
        self.write_blocked = False
        self._batch = None
        self._woken: list[Inbox] = []
        self._watch: WriteWatch | None = None
        self._close_timer: IDelayedCall | None = None
        self.calls = {}
        self.blocked = {}
        self.goaway_id: int | None = None
        """The last stream taken, once a graceful GOAWAY was sent."""
        self.last_active = 0.0
        self.ping_strikes = 0
        self.last_ping = float("-inf")
        self.h2 = factory.new_h2()
        self.init_calls(factory.clock)
        self._handlers: dict[type, Callable[[Any], None]] = {
            RequestReceived: self._request,
            DataReceived: self._data,
            StreamEnded: self._ended,
            StreamReset: self._reset,
            WindowUpdated: self._window,
            RemoteSettingsChanged: self._settings,
            PingReceived: self._ping,
            ConnectionTerminated: self._terminated,
        }

    # ----------------------------------------------------------------- the connection

    def connectionMade(self) -> None:
        self.connected = True
        self.last_active = self.clock.seconds()
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self.peer = f"{host}:{port}" if host is not None else str(peer)
        self.peer_host = host
        self._watch = WriteWatch(self)
        self.transport.registerProducer(self._watch, True)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass
        self.factory.connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.closing = True
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        self.factory.connection_lost(self)
        self.cancel_calls()
        for call in list(self.calls.values()):
            self._drop(call)
        self.calls.clear()
        self.blocked.clear()
        self.factory.partial_bytes -= self.stream_held
        self.stream_held = 0
        if self._watch is not None:
            self._watch.connection = None
        self._handlers.clear()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.started:
            # The server's preface (SETTINGS) once the client speaks: under
            # TLS, after the handshake (a write before it would pause the
            # transport, reads included, until the handshake is done).
            self.started = True
            self.factory.start_h2(self.h2)
            self._flush()
            self.send_goaway()
        self._batch = []
        try:
            try:
                events = self.h2.receive_data(data)
            except H2ProtocolError as e:
                self._close_after_error(f"HTTP/2 error: {e}")
                return
            if self._overlong():
                return
            handlers = self._handlers
            for event in events:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(event)
                    if self.closing:
                        return
            if self._woken:
                self._fire_woken()
        except Exception:
            log.failure("closing gRPC connection from {peer}: error handling it", peer=self.peer)
            self._close_after_error("", ErrorCodes.INTERNAL_ERROR)
            return
        finally:
            self._batch = None
        if events:
            self.last_active = self.clock.seconds()
        self._flush()

    def _overlong(self) -> bool:
        """h2 (4.4) checks a frame's length only once the whole frame is in:
        a frame announced longer than SETTINGS_MAX_FRAME_SIZE is refused
        here as soon as more than that is held (FRAME_SIZE_ERROR)."""
        incoming = getattr(self.h2.incoming_buffer, "_data", b"")
        limit = self.h2.max_inbound_frame_size + 9
        if len(incoming) <= limit:
            return False
        self._close_after_error(
            f"a frame longer than {limit - 9} bytes (SETTINGS_MAX_FRAME_SIZE)",
            ErrorCodes.FRAME_SIZE_ERROR,
        )
        return True

    def wake_later(self, inbox: Inbox) -> None:
        """Fire ``inbox``'s reader once the read being handled is (at once
        outside one): it takes all that read's messages in one go."""
        if self._batch is None:
            inbox.fire()
        else:
            self._woken.append(inbox)

    def _fire_woken(self) -> None:
        fire_woken(self)

    def turn_over(self) -> None:
        super().turn_over()
        if self._batch is None and self.connected:
            self._flush()

    def stream_window(self) -> int:
        """A new stream's credit: the client's send window for it (a stream's
        pump keeps it in step with h2's windows afterwards)."""
        h2 = self.h2
        window = min(h2.remote_settings.initial_window_size, h2.outbound_flow_control_window)
        return max(1, window)

    # ----------------------------------------------------------------- requests

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.goaway_id is not None and stream_id > self.goaway_id:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        now = self.clock.seconds()
        head = read_request_headers(event.headers or ())
        ended = event.stream_ended is not None
        if head.malformed is not None:
            log.info(
                "gRPC listener: malformed request on stream {stream_id} from {peer}: {why}",
                stream_id=stream_id,
                peer=self.peer,
                why=head.malformed,
            )
            self.h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        if head.method != b"POST":
            self._http_error(stream_id, b"405", f"method {head.method!r}", ended)
            return
        content_type = head.content_type
        if content_type is None or not _is_grpc(content_type):
            self._http_error(stream_id, b"415", f"content-type {content_type!r}", ended)
            return
        route = bytes(head.path or b"")[1:]
        method = self.routes.get(route)
        name = (
            method.info.full_name if method is not None else clip(route.decode("utf-8", "replace"))
        )
        limits = self.factory.limits
        gzip = head.encoding == b"gzip"
        reader = MessageReader(limits.max_message_size, "gzip" if gzip else "identity")
        call = GrpcCall(stream_id, route, name, now, reader)
        self.calls[stream_id] = call
        call.metadata = head.metadata
        error = self._check_request(call, head)
        if error is not None:
            self.fail_call(stream_id, error, name, now, unknown=method is None)
            return
        if method is None:
            self.request_received(stream_id, 0, 0, route, call.metadata, "", b"")
            return
        info = method.info
        call.single_out = not info.server_streaming
        if info.client_streaming:
            call.streaming_in = True
            call.dispatched = True
            self.request_received(stream_id, 0, call.timeout_ms, route, call.metadata, "", b"")
            stream = self.streams.get(stream_id)
            if stream is not None and stream.inbox is not None:
                stream.inbox.available = UNBOUNDED

    def _check_request(self, call: GrpcCall, head: RequestHead) -> RpcError | None:
        """Read the call's timeout; the error to answer instead of running
        it, if any (an encoding not known, metadata over the limits)."""
        encoding = head.encoding
        if encoding is not None and encoding not in (b"identity", b"gzip"):
            what = encoding.decode("ascii", "replace")
            return UnimplementedError(
                message=f"grpc-encoding {clip(what)!r} is not supported (identity, gzip)"
            )
        if head.timeout is not None:
            try:
                seconds = parse_timeout(head.timeout.decode("ascii"))
            except (GrpcWireError, UnicodeDecodeError):
                return InternalError(message=f"bad grpc-timeout {clip(repr(head.timeout))}")
            if seconds > 0:
                call.deadline = call.opened + seconds
                call.timeout_ms = max(1, int(seconds * 1000))
        limits = self.factory.limits
        if len(head.metadata) > limits.max_metadata_entries:
            return ResourceExhaustedError(
                message=f"request not read: {len(head.metadata)} metadata entries "
                f"(max_metadata_entries {limits.max_metadata_entries})"
            )
        if head.metadata_size > limits.max_metadata_size:
            return ResourceExhaustedError(
                message=f"request not read: {head.metadata_size} bytes of metadata "
                f"(max_metadata_size {limits.max_metadata_size})"
            )
        return None

    def _http_error(self, stream_id: int, status: bytes, why: str, ended: bool) -> None:
        """Not a gRPC request: an HTTP error, no call."""
        log.info(
            "gRPC listener: HTTP {status} to stream {stream_id} from {peer}: {why}",
            status=status.decode(),
            stream_id=stream_id,
            peer=self.peer,
            why=clip(why),
        )
        self.h2.send_headers(stream_id, [(b":status", status)], end_stream=True)
        if not ended:
            try:
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
            except H2Error:
                pass  # (its END_STREAM came in the same read)

    def _data(self, event: DataReceived) -> None:
        stream_id = event.stream_id
        size = event.flow_controlled_length or 0
        call = self.calls.get(stream_id)
        if call is None or call.trailers is not None:
            if size:  # ended here already: nobody reads it
                self.h2.acknowledge_received_data(size, stream_id)
            return
        data = event.data or b""
        call.unacked += size
        if size > len(data):
            self._ack(call, size - len(data))  # padding
        reader = call.reader
        before = reader.buffered
        try:
            messages = reader.feed(data)
        except GrpcWireError as e:
            self._request_failed(call, RpcError(e.code, str(e)))
            return
        if not call.streaming_in:
            # One message: taken whole (max_message_size bounds it).
            self._ack(call, call.unacked)
            if messages:
                if call.request is not None or len(messages) > 1:
                    self._request_failed(
                        call,
                        InternalError(message="more than one request message for a unary call"),
                    )
                    return
                call.request = messages[0]
            self._hold(call, reader.buffered + len(call.request or b""))
            return
        if messages:
            consumed = before + len(data) - reader.buffered - call.prepaid
            call.prepaid = 0
            share, extra = divmod(consumed, len(messages))
            last = len(messages) - 1
            for i, payload in enumerate(messages):
                self._message(call, payload, share + extra if i == last else share)
                if call.trailers is not None:
                    return
        # A partial message is acknowledged ahead past a quarter of the window
        # (a message larger than the window must still get in).
        partial = reader.buffered
        if partial - call.prepaid >= self.factory.limits.stream_window // 4:
            self._ack(call, partial - call.prepaid)
            call.prepaid = partial
        self._hold(call, partial)

    def _message(self, call: GrpcCall, payload: bytes, cost: int) -> None:
        """One request message of a client stream, for its handler (``cost``:
        its flow-controlled bytes, acknowledged as the handler takes it)."""
        stream = self.streams.get(call.stream_id)
        inbox = stream.inbox if stream is not None else None
        if stream is None or inbox is None:
            self._ack(call, cost)
            return
        request = stream.method.request_class()
        try:
            request.ParseFromString(payload)
        except Exception as e:
            full_name = stream.method.request_class.DESCRIPTOR.full_name
            self._end_stream(stream, InvalidArgumentError(message=f"cannot parse {full_name}: {e}"))
            return
        stream.last_active = self.clock.seconds()
        inbox.put(request, cost)
        self.hold_stream_bytes(cost)

    def _ended(self, event: StreamEnded) -> None:
        call = self.calls.get(event.stream_id)
        if call is None:
            return
        call.remote_ended = True
        if call.trailers is not None:
            return
        if call.reader.buffered:
            self._request_failed(call, InternalError(message="the request ended inside a message"))
            return
        if call.streaming_in:
            self.end_stream_received(call.stream_id)
            return
        request = call.request
        if request is None:
            self._request_failed(call, InternalError(message="no request message"))
            return
        self._dispatch(call, request)

    def _dispatch(self, call: GrpcCall, request: bytes) -> None:
        """A unary or server-streaming call's request is whole: run it."""
        call.dispatched = True
        call.request = None
        self._hold(call, 0)
        timeout_ms = call.timeout_ms
        if call.deadline is not None:
            left = call.deadline - self.clock.seconds()
            if left <= 0:
                self._request_failed(
                    call, DeadlineExceededError(message="deadline exceeded at the provider")
                )
                return
            timeout_ms = max(1, int(left * 1000))
        self.request_received(call.stream_id, 0, timeout_ms, call.route, call.metadata, "", request)

    def _request_failed(self, call: GrpcCall, error: RpcError) -> None:
        """End ``call`` with ``error`` for what its client sent."""
        stream = self.streams.get(call.stream_id)
        if stream is not None:
            self._end_stream(stream, error)
        elif call.trailers is None:
            self.fail_call(call.stream_id, error, call.name, call.opened)

    def _reset(self, event: StreamReset) -> None:
        stream_id = event.stream_id
        call = self.calls.get(stream_id)
        if call is not None:
            call.trailers = []  # nothing more is sent on it
            self._drop(call)
        self.cancel_call(stream_id)

    def _window(self, event: WindowUpdated) -> None:
        self.window_opened(event.stream_id or 0)

    def _settings(self, event: RemoteSettingsChanged) -> None:
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self.window_opened(0)

    def _terminated(self, event: ConnectionTerminated) -> None:
        if event.error_code:
            self._close_after_error(
                f"it sent GOAWAY {event.error_code!r} {clip(repr(event.additional_data or b''))}"
            )

    # ----------------------------------------------------------------- the call runner

    def _unknown_route(self, call_id: int, route: bytes, started: float) -> None:
        message = self.factory.dispatcher.not_found(route).message
        text = clip(route.decode("utf-8", "replace"))
        self.fail_call(call_id, UnimplementedError(message=message), text, started, unknown=True)


def _is_grpc(content_type: bytes) -> bool:
    """``application/grpc``, or with a ``+format`` or ``;parameters``."""
    if not content_type.startswith(b"application/grpc"):
        return False
    rest = content_type[16:17]
    return rest in (b"", b"+", b";")
