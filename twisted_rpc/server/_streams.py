"""Streaming calls on the provider: :class:`StreamRunner`, mixed into the
call runner, and :class:`RequestStream`, what a client-streaming or bidi
handler iterates.

A stream starts with a REQUEST for a method whose descriptor says it
streams. Its handler is chosen by the method's kind:

- server streaming: ``handler(request, context)`` returns an async iterable
  (an ``async def`` with ``yield``) or an iterable of responses;
- client streaming: ``handler(requests, context)`` returns the response (a
  message, a Deferred or a coroutine);
- bidi: ``handler(requests, context)`` returns an async iterable or iterable.

Responses go out as MESSAGE frames while the consumer's credit lasts (the
handler's ``yield`` waits when it runs out), then the final status in a
RESPONSE (with the trailing metadata). Requests arrive as MESSAGE frames
into an :class:`twisted_rpc.core._flow.Inbox` and END_STREAM ends them;
credit is granted back as the handler takes them. Every end (the handler's,
a CANCEL, the deadline, the idle timeout, the connection's loss, the GOAWAY
grace running out) closes the handler's generator: its ``finally`` runs.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core._codec import ProtocolError
from twisted_rpc.core._deadlines import DeadlineQueue
from twisted_rpc.core._flow import UNANNOUNCED_WINDOW, Inbox, message_cost, peer_setting
from twisted_rpc.core._propagation import CURRENT_CALL
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RpcError,
    StatusCode,
    UnimplementedError,
)
from twisted_rpc.server._context import CallContext
from twisted_rpc.server._dispatcher import ServerMethod
from twisted_rpc.server._stream_pump import StreamPump
from twisted_rpc.server._stream_state import RequestStream, _Stream

if TYPE_CHECKING:
    from twisted_rpc.server._factory import ServerFactory
    from twisted_rpc.server._listener import ListenerFactory

log = Logger(namespace="twisted_rpc.server")


class StreamRunner(StreamPump):
    """The streaming half of the call runner (see :class:`CallRunner`).

    The wire mixing it in sets ``supports_streams`` and provides
    :meth:`_write_message`, :meth:`_write_headers`, :meth:`_write_window` and
    :meth:`_write_end`; a wire without streams (the C++ one) refuses them.
    """

    supports_streams = False
    streams: dict[int, _Stream]

    # What the call runner mixing this in provides (see CallRunner).
    factory: ListenerFactory[Any]
    clock: IReactorTime
    peer: str
    call_label: ClassVar[str]
    last_call_id: int
    write_blocked: bool
    pending: dict[int, Any]
    exempt: int
    connected: int
    _batch: list[bytes] | None

    if TYPE_CHECKING:

        def _write_now(self, pieces: list[bytes]) -> None: ...

    if TYPE_CHECKING:

        def fail_call(
            self,
            call_id: int,
            error: RpcError,
            method: str,
            started: float,
            unknown: bool = False,
            trailers: Mapping[str, str] | None = None,
        ) -> None: ...

        def _finished(
            self, method: str, code: int, started: float, call_id: int | None = None
        ) -> None: ...

        def _status_of(
            self,
            error: BaseException,
            call_id: int,
            info: MethodInfo,
            failure: Failure | None = None,
        ) -> RpcError: ...

    def init_streams(self) -> None:
        self.streams = {}
        self.stream_deadlines = DeadlineQueue(
            self.clock, self.streams, self._stream_deadline, by_record=True
        )
        self._turn_bytes = 0
        self._turn_waiters: deque[Deferred[None]] = deque()
        self._turn_timer = False

    # ----------------------------------------------------------------- the wire

    def _write_message(self, call_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def _write_headers(self, call_id: int, metadata: Mapping[str, str]) -> None:
        raise NotImplementedError

    def _write_window(self, call_id: int, increment: int) -> None:
        raise NotImplementedError

    def _write_end(
        self,
        call_id: int,
        code: int,
        message: str,
        trailers: Mapping[str, str] | None,
        payload: bytes = b"",
    ) -> None:
        """End stream ``call_id``: a status, its trailing metadata, and for a
        client-streaming call that succeeded, the response."""
        raise NotImplementedError

    def stream_window(self) -> int:
        """The credit the consumer gave each stream (its settings: 64 KiB if
        they name none, as docs/protocol.md says)."""
        settings = getattr(self, "peer_settings", None)
        return peer_setting(settings, "stream_window", UNANNOUNCED_WINDOW)

    # ----------------------------------------------------------------- start

    def start_stream(
        self,
        call_id: int,
        timeout_ms: int,
        method: ServerMethod,
        metadata: dict[str, str] | None,
        payload: bytes | memoryview,
        started: float,
    ) -> None:
        info = method.info
        if not self.supports_streams:
            why = f"{info.full_name} streams, and this listener's protocol has no streams"
            log.warn(
                "refused " + self.call_label + " from {peer}: {why}",
                call_id=call_id,
                peer=self.peer,
                why=why,
            )
            self.fail_call(call_id, UnimplementedError(message=why), info.full_name, started)
            return
        if call_id in self.streams:
            raise ProtocolError(f"stream id {call_id} is already in flight")
        factory = self.factory
        limits = factory.limits
        refusal = None
        if len(self.streams) >= limits.max_streams_per_connection:
            refusal = (
                f"{limits.max_streams_per_connection} streams open on this connection "
                "(max_streams_per_connection)"
            )
        elif factory.streams_in_flight >= limits.max_streams:
            refusal = f"{limits.max_streams} streams open at this provider (max_streams)"
        elif len(self.pending) - self.exempt >= limits.max_calls_per_connection:
            refusal = (
                f"{limits.max_calls_per_connection} calls in flight on this connection "
                "(max_calls_per_connection; open streams count)"
            )
        elif factory.in_flight >= limits.max_calls:
            refusal = f"{limits.max_calls} calls in flight at this provider (max_calls)"
        if refusal is not None:
            self.fail_call(
                call_id, ResourceExhaustedError(message=refusal), info.full_name, started
            )
            return
        if info.client_streaming:
            request: Any = None
            if payload:
                raise ProtocolError(f"REQUEST opening client stream {call_id} has a payload")
        else:
            request = method.request_class()
            try:
                request.ParseFromString(payload)
            except Exception as e:
                error = InvalidArgumentError(
                    message=f"cannot parse {method.request_class.DESCRIPTOR.full_name}: {e}"
                )
                self.fail_call(call_id, error, info.full_name, started)
                return
        if call_id > self.last_call_id:
            self.last_call_id = call_id
        stream = _Stream(call_id, method, started, self.stream_window())
        deadline = started + timeout_ms / 1000.0 if timeout_ms else None
        context = CallContext(call_id, info, metadata, deadline, self)  # type: ignore[arg-type]
        context._stream = stream
        stream.context = context
        self.streams[call_id] = stream
        factory.streams_in_flight += 1
        factory.in_flight += 1  # a stream counts as a call in flight
        self.exempt -= 1
        observer = self.factory.observer
        if observer is not None and hasattr(observer, "stream_started"):
            observer.stream_started(info.full_name)
        if deadline is not None:
            self.stream_deadlines.add(deadline, call_id)
        idle = limits.stream_idle_timeout
        if idle:
            stream.idle_timer = self.clock.callLater(idle, self._stream_idle, stream)
        if info.client_streaming:
            stream.inbox = Inbox(
                limits.stream_window,
                lambda n: self._grant(stream, n),
                getattr(self, "wake_later", None),
            )
            stream.inbox.release = self.release_stream_bytes
            request = RequestStream(stream)
        # The handler runs in a copy of this context (Deferred.fromCoroutine):
        # the calls it makes see the call it serves (deadline, cancellation).
        token = CURRENT_CALL.set(context)
        try:
            task = self._run_handler(stream, method, request, context)
        finally:
            CURRENT_CALL.reset(token)
        if task is None:
            return
        if not stream.ended:
            stream.task = task
        task.addCallbacks(
            self._stream_done, self._stream_failed, callbackArgs=(stream,), errbackArgs=(stream,)
        )

    def _run_handler(
        self, stream: _Stream, method: ServerMethod, request: Any, context: CallContext
    ) -> Deferred[Any] | None:
        """Start the handler of ``stream``: the Deferred of its end (None if
        it ended the stream already)."""
        call_id = stream.call_id
        info = method.info
        try:
            result = method.invoke(request, context)
        except Exception as e:
            self._end_stream(stream, self._status_of(e, call_id, info))
            return None
        if info.server_streaming:
            if not (hasattr(result, "__aiter__") or hasattr(result, "__iter__")) or isinstance(
                result, (Message, bytes, str)
            ):
                expected = (
                    f"an async iterable of {method.response_class.DESCRIPTOR.full_name} "
                    "(an async def with yield)"
                )
                wrong = self.wrong_result(call_id, info, "returned", result, expected)
                if inspect.iscoroutine(result):
                    result.close()
                self._end_stream(stream, wrong)
                return None
            task = Deferred.fromCoroutine(self._pump(stream, result))
        else:
            if inspect.iscoroutine(result):
                result = Deferred.fromCoroutine(result)
            task = result if isinstance(result, Deferred) else defer.succeed(result)
        return task

    # ----------------------------------------------------------------- sending

    def send_initial_metadata(self, stream: _Stream, metadata: Mapping[str, str]) -> None:
        if stream.sent or stream.headers_sent:
            raise RuntimeError("initial metadata is sent once, before the first message")
        stream.headers_sent = True
        if not stream.ended:
            self._write_headers(stream.call_id, dict(metadata))

    stream_held = 0
    """Bytes of request messages this connection's streams hold, not taken yet;
    counted with the partial frames in the listener's ``partial_bytes``
    (bounded by ``max_buffered_bytes``)."""

    def hold_stream_bytes(self, n: int) -> None:
        self.stream_held += n
        factory = cast("ServerFactory", self.factory)  # streams run on native listeners
        factory.partial_bytes += n
        if factory.partial_bytes > factory.limits.max_buffered_bytes:
            factory.shed_partial_frames()

    def release_stream_bytes(self, n: int) -> None:
        if self.stream_held:  # (0 once the connection was dropped: released then)
            self.stream_held -= n
            cast("ServerFactory", self.factory).partial_bytes -= n

    def _grant(self, stream: _Stream, increment: int) -> None:
        if not stream.ended:
            self._write_window(stream.call_id, increment)

    # ----------------------------------------------------------------- frames

    def stream_message_received(self, call_id: int, *fields: Any) -> None:
        payload = fields[-1]
        stream = self.streams.get(call_id)
        if stream is None:
            return  # ended here already (cancelled, failed, expired)
        inbox = stream.inbox
        if inbox is None:
            raise ProtocolError(f"MESSAGE on stream {call_id}, which takes no request messages")
        request = stream.method.request_class()
        try:
            request.ParseFromString(payload)
        except Exception as e:
            self._end_stream(
                stream,
                InvalidArgumentError(
                    message=f"cannot parse {stream.method.request_class.DESCRIPTOR.full_name}: {e}"
                ),
            )
            return
        stream.last_active = self.clock.seconds()
        cost = message_cost(len(payload))
        inbox.put(request, cost)
        self.hold_stream_bytes(cost)

    def end_stream_received(self, call_id: int, *_: Any) -> None:
        stream = self.streams.get(call_id)
        if stream is not None and stream.inbox is not None:
            stream.inbox.finish()

    def window_received(self, call_id: int, status: int, increment: int, *_: Any) -> None:
        stream = self.streams.get(call_id)
        if stream is not None:
            stream.credit.add(increment)

    # ----------------------------------------------------------------- ends

    def _stream_done(self, result: object, stream: _Stream) -> None:
        if stream.ended:
            return
        info = stream.method.info
        if info.server_streaming:
            self._end_stream(stream, None)
            return
        if type(result) is not stream.method.response_class:
            self._end_stream(stream, self.wrong_result(stream.call_id, info, "returned", result))
            return
        try:
            payload = result.SerializeToString()
        except Exception as e:
            self._end_stream(stream, self._status_of(e, stream.call_id, info))
            return
        self._end_stream(stream, None, payload)

    def _stream_failed(self, failure: Failure, stream: _Stream) -> None:
        if stream.ended:
            return  # ended here already: the handler's end is of no interest
        error = failure.value or Exception()
        self._end_stream(
            stream, self._status_of(error, stream.call_id, stream.method.info, failure)
        )

    def _end_stream(
        self,
        stream: _Stream,
        error: RpcError | None,
        payload: bytes = b"",
        send: bool = True,
    ) -> None:
        """End ``stream``: send its status (unless ``send`` is false: the
        consumer cancelled, or the connection is gone) and stop its handler."""
        if stream.ended:
            return
        stream.ended = True
        call_id = stream.call_id
        if self.streams.get(call_id) is stream:
            del self.streams[call_id]
        factory = self.factory
        factory.streams_in_flight -= 1
        factory.in_flight -= 1
        self.exempt += 1
        if stream.idle_timer is not None and stream.idle_timer.active():
            stream.idle_timer.cancel()
        stream.idle_timer = None
        info = stream.method.info
        code = int(error.code) if error is not None else 0
        if send:
            trailers = stream.context.trailing_metadata if stream.context is not None else None
            if error is not None:
                self.fail_call(call_id, error, info.full_name, stream.started, trailers=trailers)
            else:
                self._write_end(call_id, 0, "", trailers, payload)
                self._finished(info.full_name, StatusCode.OK, stream.started, call_id)
        else:
            self._finished(info.full_name, code or StatusCode.CANCELLED, stream.started)
        observer = factory.observer
        if observer is not None and hasattr(observer, "stream_finished"):
            ended = code or (0 if send else StatusCode.CANCELLED)
            observer.stream_finished(info.full_name, stream.received, stream.sent, ended)
        if stream.inbox is not None:
            stream.inbox.abort(error or RpcError(StatusCode.CANCELLED, "stream ended"))
        task, stream.task = stream.task, None
        if task is not None and not task.called:
            task.cancel()
        if factory.idle_waiters:
            factory.check_idle()

    def cancel_stream(self, call_id: int) -> bool:
        """The consumer cancelled ``call_id``: end it without an answer."""
        stream = self.streams.get(call_id)
        if stream is None:
            return False
        self._end_stream(
            stream, RpcError(StatusCode.CANCELLED, "cancelled by the caller"), send=False
        )
        return True

    def cancel_streams(self) -> None:
        """The connection is gone: end every stream (nothing is sent)."""
        self.stream_deadlines.stop()
        for stream in list(self.streams.values()):
            self._end_stream(stream, RpcError(StatusCode.CANCELLED, "connection lost"), send=False)
        waiters, self._turn_waiters = self._turn_waiters, deque()
        for d in waiters:
            d.cancel()

    def end_streams(self, error: RpcError) -> None:
        """End every stream with ``error`` (the GOAWAY grace period is over)."""
        for stream in list(self.streams.values()):
            self._end_stream(stream, error)

    def _stream_deadline(self, call_id: int) -> None:
        stream = self.streams.get(call_id)
        if stream is not None:
            self._end_stream(
                stream, DeadlineExceededError(message="deadline exceeded at the provider")
            )

    def _stream_idle(self, stream: _Stream) -> None:
        stream.idle_timer = None
        if stream.ended:
            return
        idle = self.factory.limits.stream_idle_timeout
        left = stream.last_active + idle - self.clock.seconds()
        if left > 0:
            stream.idle_timer = self.clock.callLater(left, self._stream_idle, stream)
            return
        self._end_stream(
            stream,
            DeadlineExceededError(message=f"stream idle for {idle:g}s (stream_idle_timeout)"),
        )
