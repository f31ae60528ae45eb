"""The streaming half of a gRPC consumer connection, and the send side every
call shares: :class:`GrpcStreamWire`, mixed into
:class:`twisted_rpc.grpc.GrpcClientConnection`.

Sending honours HTTP/2 flow control: what the server's window does not
take waits in the stream's outbox and goes as WINDOW_UPDATEs arrive; a
stream's credit (what its writes wait on) is the window left minus what
waits. Receiving, a stream's DATA is acknowledged to the server only as the
application takes its messages from the stream's Inbox (each message costs
its bytes on the wire, prefix included), so a slow reader pauses the server.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.message import Message
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, NoAvailableStreamIDError, TooManyStreamsError
from twisted.internet.interfaces import IReactorTime

from twisted_rpc.client._calls import NotSentError
from twisted_rpc.client._connection import ClientConnection
from twisted_rpc.client._options import ClientOptions
from twisted_rpc.client._states import ConnectionState
from twisted_rpc.client._streams import StreamCall
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._flow import Inbox, fire_woken
from twisted_rpc.core._status import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    RpcError,
)
from twisted_rpc.grpc._client_status import (
    request_headers,
    response_error,
    trailers_status,
)
from twisted_rpc.grpc._wire import (
    PREFIX_SIZE,
    GrpcWireError,
    MessageReader,
    metadata_from_headers,
    prefix,
)

if TYPE_CHECKING:
    from twisted_rpc.grpc._client import _H2

__all__ = ["GrpcStreamWire"]


class _Inflated(bytes):
    """A message that came gzipped: ``wire`` is its size as it came."""

    wire = 0


class _Reader(MessageReader):
    """A MessageReader whose inflated messages tell their size on the wire
    (what they cost against the window)."""

    __slots__ = ()

    def _decompress(self, payload: bytes) -> bytes:
        out = _Inflated(super()._decompress(payload))
        out.wire = len(payload)
        return out


def _cost(message: bytes) -> int:
    """Flow-controlled bytes a message took: its prefix and its payload as sent."""
    return PREFIX_SIZE + (message.wire if isinstance(message, _Inflated) else len(message))


class _Outbox:
    """What waits for the server's window on one stream."""

    __slots__ = ("chunks", "size", "end")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.end = False


class _StreamState:
    """A streaming call's receiving half."""

    __slots__ = ("reader", "unacked", "headers", "response")

    def __init__(self, reader: MessageReader) -> None:
        self.reader = reader
        self.unacked = 0
        """DATA bytes received and not acknowledged to the server yet."""
        self.headers = False
        self.response: bytes | None = None
        """A client-streaming call's one response (delivered at the trailers)."""


class GrpcStreamWire:
    """Streams on a gRPC connection, and the flow-controlled send path."""

    streams: dict[int, StreamCall[Any, Any]]
    options: ClientOptions
    clock: IReactorTime
    state: ConnectionState
    goaway_reason: GoawayReason | None
    peer: str
    authority: str
    scheme: str
    h2: _H2
    _receiving: bool

    if TYPE_CHECKING:

        def _not_open(self) -> RpcError: ...
        def _flush(self) -> None: ...
        def _close_if_done(self) -> None: ...

    def _init_streams(self) -> None:
        self._stream_state: dict[int, _StreamState] = {}
        self._outbox: dict[int, _Outbox] = {}
        self._outbox_bytes = 0
        self._receiving = False
        self._woken: list[Inbox] = []

    # ----------------------------------------------------------------- sending

    def _open_h2_stream(self, headers: list[tuple[str, str]]) -> int | RpcError:
        """A new HTTP/2 stream with ``headers`` sent: its id, or why not."""
        h2 = self.h2
        try:
            sid = h2.get_next_available_stream_id()
            h2.send_headers(sid, headers)
        except NoAvailableStreamIDError:
            # Every stream id is used: this connection takes no more calls.
            self.state = ConnectionState.GOAWAY
            self.goaway_reason = GoawayReason.IDLE
            return NotSentError(message=f"{self.peer}: the connection's stream ids are used up")
        except TooManyStreamsError:
            limit = h2.remote_settings.max_concurrent_streams
            return NotSentError(message=f"{self.peer}: its limit of {limit} calls in flight")
        except H2Error as e:
            return InvalidArgumentError(message=f"cannot send the call's headers: {e}")
        return sid

    def _send_data(self, sid: int, chunks: Iterable[bytes], end: bool) -> None:
        box = self._outbox.get(sid)
        if box is None:
            box = self._outbox[sid] = _Outbox()
        for chunk in chunks:
            if chunk:
                box.chunks.append(chunk)
                box.size += len(chunk)
                self._outbox_bytes += len(chunk)
        box.end = box.end or end
        self._pump(sid)

    def _pump(self, sid: int) -> None:
        """Send what waits on ``sid`` as far as the windows allow."""
        box = self._outbox.get(sid)
        if box is not None:
            h2 = self.h2
            chunks = box.chunks
            try:
                while chunks:
                    room = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                    if room <= 0:
                        break
                    chunk = chunks[0]
                    if len(chunk) <= room:
                        chunks.popleft()
                        piece = chunk
                    else:
                        piece, chunks[0] = chunk[:room], chunk[room:]
                    box.size -= len(piece)
                    self._outbox_bytes -= len(piece)
                    h2.send_data(sid, piece, end_stream=box.end and not chunks)
                    if box.end and not chunks:
                        box.end = False  # sent with the last piece
                if not chunks:
                    del self._outbox[sid]
                    if box.end:
                        h2.end_stream(sid)
            except H2Error:  # the stream was reset meanwhile
                self._drop_outbox(sid)
        self._refresh_credit(sid)

    def _pump_all(self) -> None:
        for sid in {*self._outbox, *self.streams}:
            self._pump(sid)

    def _refresh_credit(self, sid: int) -> None:
        """A stream's credit: the window left, minus what waits to be sent."""
        stream = self.streams.get(sid)
        credit = stream.credit if stream is not None else None
        if credit is None:
            return
        try:
            window = self.h2.local_flow_control_window(sid)
        except H2Error:
            window = 0
        box = self._outbox.get(sid)
        credit.credit = window - (box.size if box is not None else 0)
        if credit.credit > 0 and credit.waiter is not None:
            waiter, credit.waiter = credit.waiter, None
            waiter.callback(None)

    def _drop_outbox(self, sid: int) -> None:
        box = self._outbox.pop(sid, None)
        if box is not None:
            self._outbox_bytes -= box.size

    def _reset(self, sid: int, gave_up: bool = True) -> None:
        """RST_STREAM ``sid`` unless it is closed: CANCEL when this side gives
        up, NO_ERROR when the server ended the call before the requests did
        (they stop, and the stream is let go of)."""
        stream = self.h2.streams.get(sid)
        if stream is None or stream.closed:
            return
        try:
            self.h2.reset_stream(sid, ErrorCodes.CANCEL if gave_up else ErrorCodes.NO_ERROR)
        except H2Error:
            pass  # closed already

    def _ack(self, sid: int, size: int) -> None:
        """Give ``size`` received bytes of window back to the server."""
        if size > 0:
            try:
                self.h2.acknowledge_received_data(size, sid)
            except (H2Error, ValueError):
                pass

    def wake_later(self, inbox: Inbox) -> None:
        """Fire ``inbox``'s reader once the chunk being handled is (at once outside one)."""
        if self._receiving:
            self._woken.append(inbox)
        else:
            inbox.fire()

    def _fire_woken(self) -> None:
        fire_woken(self)

    # ----------------------------------------------------------------- streams

    def open_stream(self, stream: StreamCall[Any, Any], request: Message | None) -> RpcError | None:
        """Start ``stream`` here: HEADERS (with ``request`` and END_STREAM for a
        server-streaming method). Returns why it could not start, or None."""
        if self.state is not ConnectionState.OPEN:
            return self._not_open()
        payload = b""
        if request is not None:
            try:
                payload = request.SerializeToString()
            except Exception as e:
                return InvalidArgumentError(message=f"cannot serialize request: {e}")
        left = 0.0
        if stream.timeout:
            left = stream.timeout - (self.clock.seconds() - stream.created)
            if left <= 0:
                return DeadlineExceededError(message="deadline exceeded")
        try:
            headers = request_headers(
                f"/{stream.method.full_name}", self.scheme, self.authority, left, stream.metadata
            )
        except ValueError as e:
            return InvalidArgumentError(message=f"cannot encode the call: {e}")
        sid = self._open_h2_stream(headers)
        if isinstance(sid, RpcError):
            return sid
        self.streams[sid] = stream
        self._stream_state[sid] = _StreamState(_Reader(self.options.max_frame_size))
        if request is not None:
            self._send_data(sid, [prefix(len(payload)), payload], end=True)
        stream.attached(cast(ClientConnection, self), sid, self.h2.local_flow_control_window(sid))
        self._flush()
        return None

    def send_stream_message(self, call_id: int, payload: bytes) -> None:
        """A stream's request (its credit was checked by the stream)."""
        self._send_data(call_id, [prefix(len(payload)), payload], end=False)
        self._flush()

    def send_end_stream(self, call_id: int) -> None:
        """A stream's requests are over: END_STREAM once they are sent."""
        self._send_data(call_id, (), end=True)
        self._flush()

    def send_window(self, call_id: int, increment: int) -> None:
        """The application took ``increment`` bytes of replies: tell the server."""
        state = self._stream_state.get(call_id)
        if state is not None:
            increment = min(increment, state.unacked)
            state.unacked -= increment
            self._ack(call_id, increment)
            self._flush()

    def stream_cancelled(self, stream: StreamCall[Any, Any]) -> None:
        """The caller ended ``stream`` (cancel, deadline): RST_STREAM (CANCEL)."""
        if self.streams.get(stream.call_id) is stream:
            self._forget_stream(stream.call_id)
            self._reset(stream.call_id)
            self._flush()
            if self.goaway_reason is not None:
                self._close_if_done()

    def _forget_stream(self, sid: int) -> StreamCall[Any, Any] | None:
        """Take ``sid`` out; the window its unread bytes held goes back."""
        stream = self.streams.pop(sid, None)
        state = self._stream_state.pop(sid, None)
        if state is not None and state.unacked:
            self._ack(sid, state.unacked)
        self._drop_outbox(sid)
        return stream

    def _end_stream(
        self,
        sid: int,
        error: RpcError | None,
        reset: bool | None = True,
        trailers: Mapping[str, str] | None = None,
        response: bytes = b"",
    ) -> None:
        stream = self._forget_stream(sid)
        if reset is not None:  # None: never seen by the server (above its GOAWAY)
            self._reset(sid, reset)
        if stream is not None:
            if error is None:
                stream.response_received(0, "", trailers, response)
            else:
                stream.end(error, trailers)
        self._flush()
        if self.goaway_reason is not None:
            self._close_if_done()

    def _stream_headers(
        self, sid: int, fields: dict[str, str], raw: Iterable[Any], ended: bool
    ) -> None:
        state = self._stream_state[sid]
        error = response_error(fields)
        if error is None and "grpc-status" in fields:  # trailers-only
            self._stream_trailers(sid, fields, raw, reset=not ended)
            return
        if error is not None:
            self._end_stream(sid, error, reset=not ended)
            return
        state.headers = True
        state.reader.encoding = fields.get("grpc-encoding", "identity")
        self.streams[sid].headers_received(metadata_from_headers(raw))

    def _stream_data(self, sid: int, data: bytes, flow: int) -> None:
        state = self._stream_state[sid]
        stream = self.streams[sid]
        server_streaming = stream.method.server_streaming
        self._ack(sid, flow - len(data) if server_streaming else flow)  # padding: held by none
        if server_streaming:
            state.unacked += len(data)
        if not state.headers:
            self._end_stream(sid, InternalError(message="the server sent DATA before its headers"))
            return
        try:
            messages = state.reader.feed(data)
        except GrpcWireError as e:
            self._end_stream(sid, RpcError.from_status(e.code, f"from {self.peer}: {e}"))
            return
        if not server_streaming:
            if messages and (state.response is not None or len(messages) > 1):
                self._end_stream(sid, InternalError(message="the server sent two responses"))
            elif messages:
                state.response = messages[0]
            return
        for message in messages:
            stream.message_received(message, _cost(message))
            if stream.ended:  # a reply it could not parse: cancelled
                return

    def _stream_trailers(
        self, sid: int, fields: dict[str, str], raw: Iterable[Any], reset: bool = False
    ) -> None:
        state = self._stream_state[sid]
        stream = self.streams[sid]
        error = trailers_status(fields)
        if error is None and (
            state.reader.buffered or (not stream.method.server_streaming and state.response is None)
        ):
            error = InternalError(message="the server ended the call without a whole response")
        self._end_stream(sid, error, reset, metadata_from_headers(raw), state.response or b"")
