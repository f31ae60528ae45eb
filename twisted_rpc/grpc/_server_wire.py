"""The writing half of a provider's gRPC connection: :class:`ResponseWriter`
(mixed into :class:`twisted_rpc.grpc._server.GrpcServerConnection`) and the
state of one call's HTTP/2 stream, :class:`GrpcCall`.

The call runner's wire hooks become HTTP/2 frames through ``h2``: an answer
is HEADERS (``:status 200``, ``content-type``, the initial metadata), DATA
(the length-prefixed messages) and trailers (``grpc-status``,
``grpc-message``, the trailing metadata); an error before any HEADERS is
one trailers-only HEADERS frame.

Flow control: h2 is never handed more DATA than its send window (the
smaller of the stream's and the connection's). What does not fit waits in
the call's ``out`` queue (a stream's pump stops producing as soon as its
credit, kept equal to that window less what waits, is spent: at most one
message per stream waits beyond the window) and goes when a WINDOW_UPDATE
opens the window; the trailers go after it. Received DATA is acknowledged
(``acknowledge_received_data``) as a client-streaming handler *takes* its
requests (the Inbox's grants), so a slow handler slows its client.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from twisted_rpc.grpc._server_headers import response_metadata
from twisted_rpc.grpc._wire import MessageReader, prefix, status_headers
from twisted_rpc.server._connection import IServerTransport

if TYPE_CHECKING:
    from twisted_rpc.core._flow import SendCredit
    from twisted_rpc.grpc._listener import GrpcServerFactory
    from twisted_rpc.server._stream_state import _Stream

log = Logger(namespace="twisted_rpc.grpc")

Header = tuple[bytes | str, bytes | str]

RESPONSE_HEADERS: list[Header] = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity,gzip"),
]
"""The HEADERS that start every answer (and a trailers-only one)."""
OK_TRAILERS: list[Header] = [(b"grpc-status", b"0")]


class GrpcCall:
    """One call's HTTP/2 stream on a provider connection."""

    __slots__ = (
        "stream_id",
        "route",
        "name",
        "opened",
        "deadline",
        "timeout_ms",
        "metadata",
        "reader",
        "request",
        "streaming_in",
        "single_out",
        "dispatched",
        "remote_ended",
        "headers_sent",
        "out",
        "out_bytes",
        "trailers",
        "unacked",
        "prepaid",
        "held",
    )

    def __init__(
        self, stream_id: int, route: bytes, name: str, opened: float, reader: MessageReader
    ) -> None:
        self.stream_id = stream_id
        self.route = route
        self.name = name
        """The method's full name (or the clipped path of an unknown one), for logs."""
        self.opened = opened
        self.deadline: float | None = None
        self.timeout_ms = 0
        self.metadata: dict[str, str] = {}
        self.reader = reader
        self.request: bytes | None = None
        """A unary or server-streaming call's one request message, once whole."""
        self.streaming_in = False
        """Client-streaming or bidi: its messages go to the runner as they come."""
        self.single_out = True
        """Unary or client-streaming: one response message, then the trailers."""
        self.dispatched = False
        """Handed to the call runner (at HEADERS for client streams, else at END_STREAM)."""
        self.remote_ended = False
        self.headers_sent = False
        self.out: deque[bytes | memoryview] = deque()
        """DATA waiting for the send window (whole messages, or what is left of one)."""
        self.out_bytes = 0
        self.trailers: list[Header] | None = None
        """Set once the call ended here: sent as soon as ``out`` is empty."""
        self.unacked = 0
        """Flow-controlled bytes received and not acknowledged to the peer yet."""
        self.prepaid = 0
        """Bytes of the partial request message acknowledged ahead (see ``_take_data``)."""
        self.held = 0
        """Bytes counted in the listener's ``partial_bytes`` (partial or waiting requests)."""


@implementer(IPushProducer)
class WriteWatch:
    """Registered on the transport: told when its write buffer fills and drains."""

    def __init__(self, connection: ResponseWriter) -> None:
        self.connection: ResponseWriter | None = connection

    def pauseProducing(self) -> None:
        if self.connection is not None:
            self.connection.write_buffer_full()

    def resumeProducing(self) -> None:
        if self.connection is not None:
            self.connection.write_buffer_drained()

    def stopProducing(self) -> None:
        pass


class ResponseWriter:
    """The call runner's wire hooks over h2 (mixed into the connection)."""

    h2: H2Connection
    transport: IServerTransport
    factory: GrpcServerFactory
    calls: dict[int, GrpcCall]
    blocked: dict[int, GrpcCall]
    streams: dict[int, _Stream]
    write_blocked: bool
    ping_strikes: int
    last_ping: float
    _batch: list[bytes] | None

    if TYPE_CHECKING:

        def turn_over(self) -> None: ...

        _turn_waiters: deque[Any]

    # ----------------------------------------------------------------- output

    def _flush(self) -> None:
        """Write what h2 has for the peer."""
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def _sent(self) -> None:
        """Something was handed to h2: write it now, or at the end of the
        read (or turn) being handled."""
        if self._batch is None:
            self._flush()

    def _write_now(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.transport.write(piece)

    def open_batch(self) -> list[bytes]:
        """A turn of the streams' pump is being handled: what h2 has to send
        waits for its end (see :meth:`_sent`). Nothing is collected in the list."""
        batch: list[bytes] = []
        self._batch = batch
        return batch

    def close_batch(self, batch: list[bytes]) -> None:
        self._batch = None  # (the turn's end flushes h2: see turn_over)

    def write_buffer_full(self) -> None:
        """The peer does not read: stop reading its requests, and let the
        streams' pumps wait for their turn."""
        self.write_blocked = True
        self.transport.pauseProducing()

    def write_buffer_drained(self) -> None:
        self.write_blocked = False
        self.transport.resumeProducing()
        if self._turn_waiters:
            self.turn_over()

    # ----------------------------------------------------------------- the hooks

    def _start_response(self, call: GrpcCall, metadata: Mapping[str, str] | None = None) -> None:
        call.headers_sent = True
        headers = RESPONSE_HEADERS
        if metadata:
            headers = [*RESPONSE_HEADERS, *response_metadata(metadata)]
        try:
            self.h2.send_headers(call.stream_id, headers)
        except H2Error:
            # Reset by the client later in the read being handled (h2 took
            # the whole read in before its events): its StreamReset follows.
            call.trailers = []
        self.ping_strikes = 0
        self.last_ping = float("-inf")

    def _write_response(self, call_id: int, payload: bytes) -> None:
        call = self.calls.get(call_id)
        if call is None:
            return
        if not call.headers_sent:
            self._start_response(call)
        self._queue(call, prefix(len(payload)) + payload)
        self._finish(call, OK_TRAILERS)

    def _write_status(self, call_id: int, code: int, message: str) -> None:
        call = self.calls.get(call_id)
        if call is not None:
            self._finish(call, status_headers(code, message))

    def _write_message(self, call_id: int, payload: bytes) -> None:
        call = self.calls.get(call_id)
        if call is None:
            return
        if not call.headers_sent:
            self._start_response(call)
        self._queue(call, prefix(len(payload)) + payload)
        stream = self.streams.get(call_id)
        if stream is not None:
            self._sync_credit(call, stream.credit)

    def _write_headers(self, call_id: int, metadata: Mapping[str, str]) -> None:
        call = self.calls.get(call_id)
        if call is not None and not call.headers_sent:
            self._start_response(call, metadata)
            self._sent()

    def _write_window(self, call_id: int, increment: int) -> None:
        call = self.calls.get(call_id)
        if call is not None:
            self._ack(call, increment)

    def _write_end(
        self,
        call_id: int,
        code: int,
        message: str,
        trailers: Mapping[str, str] | None,
        payload: bytes = b"",
    ) -> None:
        call = self.calls.get(call_id)
        if call is None:
            return
        if code == 0 and call.single_out:
            # A client-streaming call's response (an empty message too).
            if not call.headers_sent:
                self._start_response(call)
            self._queue(call, prefix(len(payload)) + payload)
        self._finish(call, [*status_headers(code, message), *response_metadata(trailers)])

    # ----------------------------------------------------------------- sending

    def _queue(self, call: GrpcCall, data: bytes) -> None:
        """Send ``data`` as DATA on ``call``'s stream as far as the window
        lets; the rest waits in ``call.out``."""
        if call.out:
            call.out.append(data)
            call.out_bytes += len(data)
        else:
            call.out.append(data)
            call.out_bytes = len(data)
            self._drain(call)
        self.ping_strikes = 0
        self.last_ping = float("-inf")
        self._sent()

    def _drain(self, call: GrpcCall) -> None:
        """Send what waits on ``call`` while the window lasts; then the
        trailers if the call has ended."""
        h2 = self.h2
        stream_id = call.stream_id
        out = call.out
        try:
            while out:
                window = h2.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                chunk = out[0]
                n = min(len(chunk), window, h2.max_outbound_frame_size)
                if n == len(chunk):
                    out.popleft()
                    h2.send_data(stream_id, chunk)
                else:
                    view = memoryview(chunk)
                    h2.send_data(stream_id, view[:n])
                    out[0] = view[n:]
                call.out_bytes -= n
        except H2Error:
            out.clear()  # the stream is gone (reset by the peer): nobody reads it
            call.out_bytes = 0
        if out:
            self.blocked[stream_id] = call
            return
        self.blocked.pop(stream_id, None)
        if call.trailers is not None:
            self._send_trailers(call)

    def _finish(self, call: GrpcCall, trailers: Sequence[Header]) -> None:
        """The call ended here: its trailers go once its DATA has."""
        if call.trailers is not None:
            return
        call.trailers = list(trailers)
        if not call.out:
            self._send_trailers(call)
        self._sent()

    def _send_trailers(self, call: GrpcCall) -> None:
        trailers = call.trailers
        assert trailers is not None
        stream_id = call.stream_id
        try:
            if call.headers_sent:
                self.h2.send_headers(stream_id, trailers, end_stream=True)
            else:  # trailers-only
                self.h2.send_headers(stream_id, RESPONSE_HEADERS + trailers, end_stream=True)
            if not call.remote_ended:
                # The answer is whole: the rest of the request is not wanted.
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        except H2Error:
            pass  # reset by the peer meanwhile
        self._drop(call)

    def _sync_credit(self, call: GrpcCall, credit: SendCredit) -> None:
        """A stream's pump may produce while its credit is above zero: keep
        the credit equal to the send window less what already waits."""
        try:
            window = self.h2.local_flow_control_window(call.stream_id)
        except H2Error:
            window = 0
        window -= call.out_bytes
        credit.credit = window
        if window > 0 and credit.waiter is not None:
            waiter, credit.waiter = credit.waiter, None
            waiter.callback(None)

    def window_opened(self, stream_id: int) -> None:
        """A WINDOW_UPDATE (or new SETTINGS) opened a send window: send
        what waits on it, and let the pumps waiting for credit go on."""
        if stream_id:
            call = self.blocked.get(stream_id)
            if call is not None:
                self._drain(call)
            stream = self.streams.get(stream_id)
            call = self.calls.get(stream_id)
            if stream is not None and call is not None and stream.credit.waiter is not None:
                self._sync_credit(call, stream.credit)
        else:
            for call in list(self.blocked.values()):
                self._drain(call)
                if self.h2.outbound_flow_control_window <= 0:
                    break
            for stream_id, stream in list(self.streams.items()):
                call = self.calls.get(stream_id)
                if call is not None and stream.credit.waiter is not None:
                    self._sync_credit(call, stream.credit)

    # ----------------------------------------------------------------- receiving

    def _ack(self, call: GrpcCall, n: int) -> None:
        """Hand ``n`` received bytes of ``call``'s back to the peer's window."""
        n = min(n, call.unacked)
        if n > 0:
            call.unacked -= n
            try:
                self.h2.acknowledge_received_data(n, call.stream_id)
            except H2Error:
                pass
            self._sent()

    def _hold(self, call: GrpcCall, held: int) -> None:
        """``call`` now holds ``held`` bytes of requests (counted per listener)."""
        delta = held - call.held
        if delta:
            call.held = held
            self.stream_held += delta
            factory = self.factory
            factory.partial_bytes += delta
            if delta > 0 and factory.partial_bytes > factory.limits.max_buffered_bytes:
                factory.shed_partial_frames()

    stream_held: int

    def _drop(self, call: GrpcCall) -> None:
        """Forget ``call``: what it holds is let go, what it received acknowledged."""
        stream_id = call.stream_id
        if self.calls.get(stream_id) is call:
            del self.calls[stream_id]
        self.blocked.pop(stream_id, None)
        self._hold(call, 0)
        call.out.clear()
        call.out_bytes = 0
        if call.unacked:
            self._ack(call, call.unacked)
