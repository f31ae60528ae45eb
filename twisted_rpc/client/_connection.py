"""One consumer-side connection: :class:`ClientConnection` numbers calls,
keeps the outstanding map, deadlines and cancellation, and hands calls a
GOAWAY shows were never run back to be sent again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, cast

from google.protobuf.message import Message
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from twisted_rpc.client._calls import (
    MAX_RESENDS,
    NotSentError,
    ShedError,
    TakenBack,
    _Call,
    _cancel_call,
)
from twisted_rpc.client._held import HeldCalls
from twisted_rpc.client._keepalive import Keepalive
from twisted_rpc.client._options import (  # noqa: F401 (also imported from here)
    DEFAULT_MAX_WRITE_BUFFER,
    MAX_TIMEOUT,
    ClientOptions,
    timeout_error,
)
from twisted_rpc.client._routes import MethodEncodings
from twisted_rpc.client._states import ConnectionState
from twisted_rpc.client._stream_wire import StreamWire
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind, GoawayReason
from twisted_rpc.core._connection import LARGE_PAYLOAD, RpcConnection
from twisted_rpc.core._deadlines import DeadlineQueue
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import (
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RpcError,
    UnavailableError,
)

GOAWAY_CLOSE_GRACE = 10.0
"""Seconds a connection closed after its GOAWAY (its calls done) may take to
flush; then it is aborted (a peer that does not read)."""


_DEFAULT_OPTIONS = ClientOptions()
_OPEN = ConnectionState.OPEN
_pack_header = wire.pack_header
_FIXED = wire.FIXED_AFTER_LENGTH
_REQUEST = wire.REQUEST


_Frame = tuple[bytes, bytes, int]


class ClientConnection(HeldCalls, StreamWire, RpcConnection, Keepalive):
    """One consumer-side connection: numbered calls, answered in any order.

    ``outstanding`` maps a call id to ``(deferred, method, payload, metadata,
    deadline)``: what it takes to send the call again if a GOAWAY shows the
    provider never ran it. ``held`` keeps the calls past the provider's
    announced limit, in order (:class:`HeldCalls`).
    """

    on_shed: Callable[[TakenBack, RpcError], object] | None = None
    """Given a call the provider answered "not run" (shed) and its ShedError,
    to send it elsewhere (the channel sets it; unset, the call fails with it)."""

    encodings: MethodEncodings | None = None  # (set per connection only when used)

    def __init__(
        self,
        clock: IReactorTime,
        options: ClientOptions | None = None,
        *,
        on_lost: Callable[[ClientConnection, Failure], object] | None = None,
        on_goaway: Callable[[ClientConnection, GoawayReason, list[TakenBack]], object]
        | None = None,
        **settings: Any,
    ) -> None:
        """``options`` (or ClientOptions' keywords as ``settings``) give
        max_frame_size, keepalive_interval, keepalive_timeout and
        max_write_buffer."""
        if options is None:
            options = _DEFAULT_OPTIONS
        if settings:
            options = options.replace(**settings)
        super().__init__(clock, options.max_frame_size)
        self.options = options
        encodings = MethodEncodings.of(options)
        if encodings is not None:  # (else nothing is compressed: compress_min stays NEVER)
            self.encodings = encodings
            self.want_encoding = encodings.wanted[0]
            self.compress_threshold = options.compression_threshold
        self.keepalive_interval = options.keepalive_interval
        self.keepalive_timeout = options.keepalive_timeout
        self.max_write_buffer = options.max_write_buffer
        self.pong_abort_bytes = options.max_write_buffer
        self._written_while_blocked = 0
        self._keepalive: IDelayedCall | None = None
        self.outstanding: dict[int, TakenBack] = {}
        self.held: OrderedDict[int, TakenBack] = OrderedDict()
        self.deadlines = DeadlineQueue(clock, self.outstanding, self._deadline_expired)
        self.goaway_reason: GoawayReason | None = None
        self.state = ConnectionState.NEW
        """A :class:`ConnectionState`: calls are sent only while ``open``."""
        self.made_at = 0.0
        """When the connection was made (clock seconds)."""
        self._next_id = 1
        self._wrapped = False
        self._timeout: float = 0.0  # the last call's timeout (checked), and it in ms for the wire
        self._timeout_ms = 0
        self._on_lost = on_lost
        self._on_goaway = on_goaway
        self._handlers[FrameKind.RESPONSE] = self._response_received
        self._handlers[FrameKind.GOAWAY] = self._goaway_received
        self._handlers[FrameKind.MESSAGE] = self._stream_message
        self._handlers[FrameKind.HEADERS] = self._stream_headers
        self._handlers[FrameKind.WINDOW] = self._stream_window
        self.streams = {}
        """Streams in flight by call id (they share the ids of calls)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.made_at = self.clock.seconds()
        self.state = ConnectionState.OPEN
        if self.keepalive_interval > 0:
            self._keepalive = self.clock.callLater(self.keepalive_interval, self._send_keepalive)

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred[Message]:
        """Send one call; the Deferred fires with the response or an RpcError.

        A bad ``timeout`` (not a number, negative, nan, past MAX_TIMEOUT)
        fails the Deferred with ValueError; nothing is sent.
        """
        if timeout:
            # The last call's timeout was checked already: the same object,
            # or an equal float or int (True == 1, Decimal(1) == 1: checked).
            if timeout is not self._timeout and (
                timeout != self._timeout
                or (type(timeout) is not float and type(timeout) is not int)
            ):
                error = timeout_error(timeout)
                if error is not None:
                    return fail(error)
                self._timeout = timeout
                self._timeout_ms = max(1, int(timeout * 1000))
        elif timeout is not None and (
            timeout != 0 or (type(timeout) is not float and type(timeout) is not int)
        ):
            return fail(timeout_error(timeout) or ValueError(f"bad timeout {timeout!r}"))
        if self.state is not _OPEN:
            return fail(self._not_open())
        try:
            payload = request.SerializeToString()
        except Exception as e:
            return fail(InvalidArgumentError(message=f"cannot serialize request: {e}"))
        size = len(payload)
        if self.write_blocked and self._over_write_buffer(size):
            return fail(
                ResourceExhaustedError(
                    message=f"{self.peer} reads slower than calls are made: more than "
                    f"{self.max_write_buffer} bytes of calls wait to be sent"
                )
            )
        outstanding = len(self.outstanding)  # (streams count too: rarely any)
        if outstanding >= self.room_limit or (
            self.streams and outstanding + len(self.streams) >= self.room_limit
        ):
            return self.hold_call(method, payload, metadata, timeout)
        call_id = self._next_id
        if call_id < 0xFFFFFFFF and not self._wrapped:
            self._next_id = call_id + 1
        else:
            call_id = self._next_wrapped_id()
        if timeout:
            deadline = self.clock.seconds() + timeout
            timeout_ms = self._timeout_ms
        else:
            deadline = 0.0
            timeout_ms = 0
        route = method.route
        try:
            if metadata:
                header = wire.encode_request(call_id, route, size, timeout_ms, metadata)
            else:  # encode_request's plain case, inline: this is the hot path
                header = (
                    _pack_header(
                        _FIXED + len(route) + size, _REQUEST, 0, 0, call_id, timeout_ms, len(route)
                    )
                    + route
                )
        except Exception as e:  # metadata that is not text, or a payload over 4 GiB, say
            return fail(InvalidArgumentError(message=f"cannot encode the call: {e}"))
        d = _Call(_cancel_call)
        d.call_id = call_id
        d.holder = self
        self.outstanding[call_id] = (d, method, payload, metadata, deadline)
        if deadline:
            self.deadlines.add(deadline, call_id)
        if size >= self.compress_min:  # (NEVER while compression is off)
            header, payload, size = self.squeeze_for(method, header, payload)
        batch = self._batch
        if batch is None or size >= LARGE_PAYLOAD:
            self.send(header, payload)
        else:  # send()'s first branch, inline: this is the hot path
            batch.append(header)
            batch.append(payload)
            if len(batch) >= self._flush_at:
                self.flush_early(batch)
        return d

    def resume(self, call: TakenBack) -> RpcError | None:
        """Send a call a GOAWAY took back (from another connection) here: the
        same Deferred, a new call id, what is left of its deadline.

        Returns why it could not be sent (NotSentError: it may go elsewhere),
        or None: sent, or ended (its deadline passed, the buffer is full).
        """
        if self.state is not _OPEN:
            return self._not_open()
        if len(self.outstanding) + len(self.streams) >= self.room_limit:
            return self.hold_taken(call)
        return self._resume(call)

    def _resume(self, call: TakenBack) -> RpcError | None:
        """:meth:`resume` past the limit's check (releasing a held call)."""
        d, method, payload, metadata, deadline = call
        if self.state is not _OPEN:
            return self._not_open()
        timeout_ms = 0
        if deadline:
            left = deadline - self.clock.seconds()
            if left <= 0:
                d.holder = None
                d.errback(DeadlineExceededError(message="deadline exceeded"))
                return None
            timeout_ms = max(1, int(left * 1000))
        size = len(payload)
        if self.write_blocked and self._over_write_buffer(size):
            d.holder = None
            d.errback(
                ResourceExhaustedError(
                    message=f"{self.peer} reads slower than calls are made: more than "
                    f"{self.max_write_buffer} bytes of calls wait to be sent"
                )
            )
            return None
        call_id = self._new_call_id()
        header = wire.encode_request(call_id, method.route, size, timeout_ms, metadata)
        d.call_id = call_id
        d.holder = self
        self.outstanding[call_id] = call
        if deadline:
            self.deadlines.add(deadline, call_id)
        if size >= self.compress_min:
            header, payload, size = self.squeeze_for(method, header, payload)
        self.send(header, payload)
        return None

    def settings_received(self, settings: dict[str, str]) -> None:
        """Compression starts once the provider lists an encoding some call may
        use; its ``max_calls`` bounds the calls in flight (:class:`HeldCalls`)."""
        if self.peer_settings is None:
            self.learn_limit(settings)
        super().settings_received(settings)
        if self.send_encoding is None and self.encodings is not None:
            for name in self.encodings.wanted:
                if name in self.peer_encodings:
                    self._start_compressing(name)
                    break

    def squeeze_for(self, method: MethodInfo | None, header: bytes, payload: bytes) -> _Frame:
        """``method``'s frame compressed in its encoding (:class:`MethodEncodings`,
        set once past ``compress_min``) if the provider reads it; its payload's size."""
        encodings = cast(MethodEncodings, self.encodings)
        encoding = encodings(method) if method is not None else encodings.default
        if encoding is None or encoding not in self.peer_encodings:
            return header, payload, len(payload)
        return self.squeeze(header, payload, encoding)

    @property
    def available(self) -> bool:
        """Whether new calls may be sent here (open: connected, no GOAWAY)."""
        return self.state is _OPEN

    @property
    def goaway_received(self) -> bool:
        """Whether the provider said GOAWAY on this connection."""
        return self.goaway_reason is not None

    def _not_open(self) -> NotSentError:
        why = "provider is shutting down" if self.goaway_reason is not None else "not connected"
        return NotSentError(message=f"{self.peer}: {why}")

    def _over_write_buffer(self, size: int) -> bool:
        """Whether ``size`` more bytes would pass max_write_buffer.

        Asked only while the transport is paused: the provider reads slower
        than we write (busy, or not reading at all). A transport that does not
        tell what it holds is assumed to hold all written since the pause.
        """
        unsent = self.unsent_bytes()
        if unsent is None:
            unsent = self._written_while_blocked
        if unsent + size > self.max_write_buffer:
            return True
        self._written_while_blocked += size
        return False

    def write_buffer_drained(self) -> None:
        super().write_buffer_drained()
        self._written_while_blocked = 0

    def close(self) -> None:
        """Close at once. The calls in flight fail either way, and flushing
        unsent ones first could wait forever: the transport stops reading
        when asked to close, so a provider with answers for us stops reading
        too once its own buffer is full."""
        self.transport.abortConnection()

    def _new_call_id(self) -> int:
        """The next call id (``call`` has this inline: the hot path)."""
        call_id = self._next_id
        if call_id < 0xFFFFFFFF and not self._wrapped:
            self._next_id = call_id + 1
            return call_id
        return self._next_wrapped_id()

    def _next_wrapped_id(self) -> int:
        """After 2**32 - 1 calls the ids wrap: skip the ones still in flight."""
        self._wrapped = True
        call_id = self._next_id
        while call_id in self.outstanding:
            call_id = call_id + 1 if call_id < 0xFFFFFFFF else 1
        self._next_id = call_id + 1 if call_id < 0xFFFFFFFF else 1
        return call_id

    def _response_received(
        self,
        call_id: int,
        status: int,
        timeout_ms: int,
        route: bytes,
        metadata: dict[str, str] | None,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        entry = self.outstanding.pop(call_id, None)
        if entry is None:
            # answered locally already (cancelled or timed out), or taken back; or a stream
            stream = self.streams.pop(call_id, None) if self.streams else None
            if stream is not None:
                stream.response_received(status, message, metadata, payload)
            return
        d = entry[0]
        if status:
            self._call_failed(entry, status, message, metadata)
            return
        try:
            # One C call (not a new message, then its parse); protobuf parses
            # any buffer, types-protobuf declares bytes only.
            response = entry[1].response_class.FromString(payload)  # type: ignore[arg-type]
        except Exception as e:
            d.errback(DataLossError(message=f"cannot parse the response: {e}"))
            return
        d.callback(response)

    def _call_failed(
        self, entry: TakenBack, status: int, message: str, metadata: dict[str, str] | None
    ) -> None:
        """The provider answered a call with an error status (a subclass that
        counts failures, such as outlier ejection's, hooks in here)."""
        d = entry[0]
        if metadata is not None and wire.NOT_RUN_KEY in metadata:
            if metadata[wire.NOT_RUN_KEY] == "late":  # its deadline passed as it waited
                d.errback(DeadlineExceededError(message=f"{self.peer}: {message} (not run)"))
                return
            # refused unrun (shed): as if never sent, so it may go elsewhere
            error = ShedError(message=f"{self.peer}: {message} (not run)")
            if self.on_shed is not None and d.resends < MAX_RESENDS:
                d.resends += 1
                self.on_shed(entry, error)
            else:
                d.errback(error)
            return
        d.errback(RpcError.from_status(status, message))

    def _goaway_received(self, last_call_id: int, status: int, *_: object) -> None:
        """No new calls here; the calls above ``last_call_id`` were never run.

        They are taken out of this connection and handed to ``on_goaway`` to
        be sent again (a late UNAVAILABLE answer to one of them is ignored).
        """
        if self.state is _OPEN:
            self.state = ConnectionState.GOAWAY
        try:
            reason = GoawayReason(status)
        except ValueError:
            reason = GoawayReason.UNSPECIFIED
        self.goaway_reason = reason
        # From now on, the connection closes once its last call is done.
        self._handlers[FrameKind.RESPONSE] = self._response_after_goaway
        taken = self._take_back(last_call_id) + self.take_held()
        if not self._wrapped:
            for call_id in [i for i in self.streams if i > last_call_id]:
                stream = self.streams.pop(call_id)
                stream.end(NotSentError(message=f"{self.peer}: provider sent GOAWAY"))
        self.log.info(
            "{peer} sent GOAWAY ({reason}, last call {last}): {n} calls it never ran go again",
            peer=self.peer,
            reason=reason.name.lower(),
            last=last_call_id,
            n=len(taken),
        )
        if self._on_goaway is not None:
            self._on_goaway(self, reason, taken)
        else:
            for d, *_rest in taken:
                d.errback(NotSentError(message=f"{self.peer}: provider sent GOAWAY"))
        self._close_if_done()

    def _response_after_goaway(self, *frame: Any) -> None:
        self._response_received(*frame)
        self._close_if_done()

    def _close_if_done(self) -> None:
        """After a GOAWAY, once no call is left: close the connection (a
        provider may leave it open), and abort it if it has not closed
        GOAWAY_CLOSE_GRACE seconds later (a peer that does not read)."""
        if self.outstanding or self.streams or not self.connected or self._close_timer is not None:
            return
        RpcConnection.close(self)  # flushes what was written (a CANCEL, say)
        self._close_timer = self.clock.callLater(GOAWAY_CLOSE_GRACE, self._close_overdue)

    def _close_overdue(self) -> None:
        self._close_timer = None
        if self.connected:
            self.log.warn(
                "aborting the connection to {peer}: not closed {t:g}s after its GOAWAY",
                peer=self.peer,
                t=GOAWAY_CLOSE_GRACE,
            )
            self.transport.abortConnection()

    def _take_back(self, last_call_id: int) -> list[TakenBack]:
        """Remove and return the calls sent after ``last_call_id``.

        After the ids wrapped around, "after" cannot be told from the id:
        then nothing is taken back, and those calls end as the connection does.
        """
        if self._wrapped:
            return []
        outstanding = self.outstanding
        ids = [call_id for call_id in outstanding if call_id > last_call_id]
        taken = [outstanding.pop(call_id) for call_id in ids]
        for entry in taken:
            entry[0].holder = None  # in transit
        return taken

    def _cancel(self, d: _Call) -> None:
        call_id = d.call_id
        if call_id < 0:
            self.drop_held(d, CancelledError(message="cancelled by the caller"))
            return
        entry = self.outstanding.get(call_id)
        if entry is None or entry[0] is not d:
            return
        del self.outstanding[call_id]
        if self.connected:
            self.send(wire.encode_cancel(call_id))
        d.errback(CancelledError(message="cancelled by the caller"))
        if self.held:
            self.release()
        if self.goaway_reason is not None:
            self._close_if_done()

    def _deadline_expired(self, call_id: int) -> None:
        entry = self.outstanding.pop(call_id, None)
        if entry is not None:
            entry[0].errback(DeadlineExceededError(message="deadline exceeded"))
            if self.held:
                self.release()
            if self.goaway_reason is not None:
                self._close_if_done()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.state is not ConnectionState.UNRESPONSIVE:
            self.state = ConnectionState.CLOSED
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        self.deadlines.stop()
        self.fail_held()
        outstanding = list(self.outstanding.values())
        self.outstanding.clear()
        for d, *_ in outstanding:
            d.errback(UnavailableError(message=f"connection to {self.peer} lost"))
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.end(UnavailableError(message=f"connection to {self.peer} lost"))
        if self._on_lost is not None:
            self._on_lost(self, reason)
