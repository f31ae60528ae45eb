"""Unary calls on a gRPC consumer connection: :class:`GrpcUnaryCalls`,
mixed into :class:`twisted_rpc.grpc.GrpcClientConnection`. A call is one HTTP/2
stream: HEADERS, one length-prefixed message with END_STREAM; the server's
headers, one message and its trailers (or a trailers-only answer) end it.
Its deadline resets the stream (CANCEL) and ends it DEADLINE_EXCEEDED here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, cast

from google.protobuf.message import Message
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_rpc.client._calls import NotSentError, TakenBack, _Call, _cancel_call
from twisted_rpc.client._options import ClientOptions, timeout_error
from twisted_rpc.client._states import ConnectionState
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import (
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RpcError,
)
from twisted_rpc.grpc._client_status import request_headers, response_error, trailers_status
from twisted_rpc.grpc._wire import GrpcWireError, MessageReader, prefix

__all__ = ["GrpcUnaryCalls"]

_OPEN = ConnectionState.OPEN


class _Unary:
    """A unary call's receiving half: its reader, its one response, its timer."""

    __slots__ = ("reader", "response", "timer", "headers")

    def __init__(self, reader: MessageReader) -> None:
        self.reader = reader
        self.response: bytes | None = None
        self.timer: IDelayedCall | None = None
        self.headers = False


class GrpcUnaryCalls:
    """Unary calls: ``call``, ``resume`` and what ends them."""

    outstanding: dict[int, TakenBack]
    options: ClientOptions
    clock: IReactorTime
    state: ConnectionState
    goaway_reason: GoawayReason | None
    peer: str
    authority: str
    scheme: str
    _calls: dict[int, _Unary]

    if TYPE_CHECKING:

        def _not_open(self) -> NotSentError: ...
        def _flush(self) -> None: ...
        def _close_if_done(self) -> None: ...
        def _open_h2_stream(self, headers: list[tuple[str, str]]) -> int | RpcError: ...
        def _send_data(self, sid: int, chunks: Iterable[bytes], end: bool) -> None: ...
        def _drop_outbox(self, sid: int) -> None: ...
        def _reset(self, sid: int, gave_up: bool = True) -> None: ...

        _outbox_bytes: int

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred[Message]:
        """Send one unary call; the Deferred fires with the response or an RpcError."""
        error = timeout_error(timeout)
        if error is not None:
            return fail(error)
        if self.state is not _OPEN:
            return fail(self._not_open())
        try:
            payload = request.SerializeToString()
        except Exception as e:
            return fail(InvalidArgumentError(message=f"cannot serialize request: {e}"))
        deadline = self.clock.seconds() + timeout if timeout else 0.0
        d = _Call(_cancel_call)
        d.holder = None
        failed = self._start((d, method, payload, metadata, deadline))
        if failed is not None:
            return fail(failed)
        return d

    def resume(self, call: TakenBack) -> RpcError | None:
        """Send a call a GOAWAY took back (from another connection) here.
        Returns why it could not be sent (NotSentError: may go elsewhere), or
        None: sent, or ended (its deadline passed, say)."""
        if self.state is not _OPEN:
            return self._not_open()
        error = self._start(call)
        if error is not None and not isinstance(error, NotSentError):
            call[0].holder = None
            call[0].errback(error)
            return None
        return error

    def _start(self, entry: TakenBack) -> RpcError | None:
        d, method, payload, metadata, deadline = entry
        left = 0.0
        if deadline:
            left = deadline - self.clock.seconds()
            if left <= 0:
                return DeadlineExceededError(message="deadline exceeded")
        size = len(payload) + 5
        if self._outbox_bytes + size > self.options.max_write_buffer:
            return ResourceExhaustedError(
                message=f"{self.peer} reads slower than calls are made: more than "
                f"{self.options.max_write_buffer} bytes of calls wait to be sent"
            )
        try:
            headers = request_headers(
                f"/{method.full_name}", self.scheme, self.authority, left, metadata
            )
        except ValueError as e:
            return InvalidArgumentError(message=f"cannot encode the call: {e}")
        sid = self._open_h2_stream(headers)
        if isinstance(sid, RpcError):
            return sid
        d.call_id = sid
        d.holder = self
        self.outstanding[sid] = entry
        unary = self._calls[sid] = _Unary(MessageReader(self.options.max_frame_size))
        if deadline:
            unary.timer = self.clock.callLater(left, self._deadline_expired, sid)
        self._send_data(sid, [prefix(len(payload)), payload], end=True)
        self._flush()
        return None

    def _cancel(self, d: _Call) -> None:
        entry = self.outstanding.get(d.call_id)
        if entry is not None and entry[0] is d:
            self._end_call(d.call_id, CancelledError(message="cancelled by the caller"))

    def _deadline_expired(self, sid: int) -> None:
        unary = self._calls.get(sid)
        if unary is not None:
            unary.timer = None
            self._end_call(sid, DeadlineExceededError(message="deadline exceeded"))

    def _end_call(
        self, sid: int, error: RpcError | None, response: Message | None = None, reset: bool = True
    ) -> None:
        """End unary call ``sid`` with ``error`` or ``response`` (resetting
        its stream, CANCEL, unless the server ended it)."""
        entry = self.outstanding.pop(sid, None)
        unary = self._calls.pop(sid, None)
        if unary is not None and unary.timer is not None and unary.timer.active():
            unary.timer.cancel()
        self._drop_outbox(sid)
        self._reset(sid, reset)
        if entry is not None:
            if error is not None:
                entry[0].errback(error)
            else:
                entry[0].callback(cast(Message, response))
        self._flush()
        if self.goaway_reason is not None:
            self._close_if_done()

    def _unary_headers(self, sid: int, unary: _Unary, fields: dict[str, str], ended: bool) -> None:
        error = response_error(fields)
        if error is None and "grpc-status" in fields:  # trailers-only
            error = trailers_status(fields) or InternalError(
                message="the server ended the call without a response"
            )
        if error is not None:
            self._end_call(sid, error, reset=not ended)
            return
        unary.headers = True
        unary.reader.encoding = fields.get("grpc-encoding", "identity")

    def _unary_data(self, sid: int, unary: _Unary, data: bytes) -> None:
        if not unary.headers:
            self._end_call(sid, InternalError(message="the server sent DATA before its headers"))
            return
        try:
            messages = unary.reader.feed(data)
        except GrpcWireError as e:
            self._end_call(sid, RpcError.from_status(e.code, f"from {self.peer}: {e}"))
            return
        if messages:
            if unary.response is not None or len(messages) > 1:
                self._end_call(sid, InternalError(message="the server sent two responses"))
                return
            unary.response = messages[0]

    def _unary_trailers(self, sid: int, unary: _Unary, fields: dict[str, str]) -> None:
        error = trailers_status(fields)
        if error is not None:
            self._end_call(sid, error, reset=False)
            return
        if unary.response is None or unary.reader.buffered:
            self._end_call(
                sid, InternalError(message="the server ended the call without a whole response")
            )
            return
        entry = self.outstanding.get(sid)
        if entry is None:
            return
        response = entry[1].response_class()
        try:
            response.ParseFromString(unary.response)
        except Exception as e:
            self._end_call(sid, DataLossError(message=f"cannot parse the response: {e}"))
            return
        self._end_call(sid, None, response, reset=False)
