"""Streaming calls on the consumer: :class:`ServerStream`, :class:`ClientStream`
and :class:`BidiStream`, what a proxy's streaming method returns.

One class does the work (:class:`StreamCall`); the three public ones say,
to readers and type checkers, which half of it a method's kind uses::

    async for reply in proxy.Watch(request, timeout=30):   # ServerStream
        ...
    reply = await proxy.Upload(chunks)                      # ClientStream
    async for echo in proxy.Chat(messages):                 # BidiStream
        ...
    call = proxy.Chat()                                     # by hand
    await call.write(message)
    await call.done_writing()
    echo = await call.read()                                # None at the end

Replies are taken in order from an :class:`twisted_rpc.core._flow.Inbox`:
``async for`` hands out those already received without a reactor turn or a
Deferred each, and credit goes back to the provider in batches as they are
taken. Code that is not ``async def`` consumes a stream Twisted's way:
:meth:`StreamCall.on_message` (the stream is then an ``IPushProducer`` the
caller may pause) or :meth:`StreamCall.consume` (an ``IConsumer``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, Callable, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc.core._codec import HEADER_SIZE
from twisted_rpc.core._flow import Inbox, SendCredit, message_cost
from twisted_rpc.core._service import MethodInfo, wrong_request_type
from twisted_rpc.core._status import (
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RpcError,
    StatusCode,
)

if TYPE_CHECKING:
    from twisted_rpc.client._connection import ClientConnection

RETRY_BUFFER = 256 * 1024
"""Bytes of requests a retryable stream keeps to send again on a retry (gRPC's
per-RPC retry buffer): past it the stream is committed, no longer retried."""


class StreamRetrier(Protocol):
    """What retries a stream before its first reply (_stream_start.StreamRetry):
    ``failed`` gives None if the stream is sent again (it was detached), else
    the error it ends with; ``succeeded``: a reply, HEADERS or an OK end came."""

    def failed(self, stream: StreamCall[Any, Any], error: RpcError) -> RpcError | None: ...
    def succeeded(self) -> None: ...


__all__ = ["BidiStream", "ClientStream", "ServerStream", "StreamCall"]

log = Logger(namespace="twisted_rpc.client")

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


def _ignore(failure: Failure) -> None:
    """What an end nobody waits for is given (it is in ``code`` too)."""


@implementer(IPushProducer)
class StreamCall(Generic[RequestT, ResponseT]):
    """A streaming call, of any kind; see :class:`ServerStream`,
    :class:`ClientStream` and :class:`BidiStream` for each kind's half.

    After the end, :attr:`code` is its status (``StatusCode.OK`` or an
    error), :attr:`details` the error's text and :attr:`trailing_metadata`
    what the provider sent with it. :attr:`initial_metadata` is a Deferred
    of what the provider sent first (``{}`` if nothing).
    """

    def __init__(
        self,
        method: MethodInfo,
        clock: Any,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        window: int = 1024 * 1024,
    ) -> None:
        self.method = method
        self.clock = clock
        self.timeout = timeout
        self.metadata = dict(metadata or {})
        self.window = window
        self.created = clock.seconds()
        self.code: StatusCode | None = None
        """The final status, once the stream ended."""
        self.details = ""
        self.trailing_metadata: Mapping[str, str] | None = None
        self.initial_metadata: Deferred[Mapping[str, str]] = Deferred()
        self.initial_metadata.addErrback(_ignore)
        self.connection: ClientConnection | None = None
        self.call_id = 0
        self.inbox = Inbox(window, self._grant)
        self.credit: SendCredit | None = None
        self._first = True
        self.max_message = 2**31 - 1
        """Largest request the provider takes (its settings' max_message_size)."""
        self._writes: deque[tuple[Message, Deferred[None]]] = deque()
        self._half_closing = False
        self._half_closed = False
        self._closers: list[Deferred[None]] = []
        self._waiting_credit = False
        self._timer: IDelayedCall | None = None
        self._done: Deferred[None] = Deferred()
        self._paused = False
        self._callback: Callable[[Message], object] | None = None
        self._delivering = False
        self.opening: Deferred[Any] | None = None
        """While the stream waits for a connection: what it waits on."""
        self.retry: StreamRetrier | None = None
        """Until the stream is committed (a reply, initial metadata, the
        retry buffer full), what may send it again after a failed attempt."""
        self._sent: list[bytes] = []  # requests written, kept while retryable
        self._sent_bytes = 0
        self._resend: deque[bytes] = deque()  # requests to send again on this attempt
        if timeout:
            self._timer = clock.callLater(timeout, self._expired)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method.full_name} id={self.call_id} code={self.code}>"

    @property
    def ended(self) -> bool:
        return self.code is not None

    # ----------------------------------------------------------------- replies

    def __aiter__(self) -> StreamCall[RequestT, ResponseT]:
        return self

    async def __anext__(self) -> ResponseT:
        inbox = self.inbox
        if not inbox.messages and not inbox.ended:
            await inbox.wait()
        message = inbox.take()
        if message is None:
            raise StopAsyncIteration
        return message  # type: ignore[no-any-return]

    def read(self) -> Deferred[ResponseT | None]:
        """A Deferred of the next reply: None at the end of the stream; it
        fails with the typed ``RpcError`` when the stream ends with an error."""
        inbox = self.inbox
        if inbox.ready():
            try:
                return succeed(inbox.take())
            except RpcError as e:
                return fail(e)
        d: Deferred[ResponseT | None] = Deferred()
        waiting = inbox.wait()

        def ready(_: object) -> None:
            try:
                d.callback(inbox.take())
            except RpcError as e:
                d.errback(e)

        waiting.addCallbacks(ready, d.errback)
        return d

    def on_message(self, callback: Callable[[ResponseT], object]) -> Deferred[None]:
        """Call ``callback(reply)`` for each reply, in order; the Deferred
        fires with None at a clean end or fails with the ``RpcError``. While
        paused (``pauseProducing``) nothing is delivered and no credit goes
        back, so the provider stops too."""
        self._callback = callback  # type: ignore[assignment]
        self._deliver()
        return self._done

    def consume(self, consumer: IConsumer) -> Deferred[None]:
        """Write each reply to ``consumer``, registered as its streaming
        producer (unregistered at the end); the Deferred is :meth:`on_message`'s."""
        consumer.registerProducer(self, True)

        def unregister(result: object) -> object:
            consumer.unregisterProducer()
            return result

        return self.on_message(consumer.write).addBoth(unregister)  # type: ignore[arg-type]

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._deliver()

    def stopProducing(self) -> None:
        self.cancel()

    def _deliver(self) -> None:
        if self._delivering or self._callback is None:
            return
        self._delivering = True
        inbox = self.inbox
        try:
            while not self._paused:
                if not inbox.ready():
                    inbox.wait().addCallbacks(lambda _: self._deliver(), _ignore)
                    return
                try:
                    message = inbox.take()
                except RpcError as e:
                    self._callback = None
                    self._done.errback(e)
                    return
                if message is None:
                    self._callback = None
                    self._done.callback(None)
                    return
                self._callback(message)
        finally:
            self._delivering = False

    # ----------------------------------------------------------------- requests

    def write(self, message: RequestT) -> Deferred[None]:
        """Send ``message``; the Deferred fires once it is written (when the
        provider's window allows), or fails if the stream ended first."""
        if not self.method.client_streaming:
            return fail(TypeError(f"{self.method.full_name} takes one request, not a stream"))
        error = wrong_request_type(self.method, message)
        if error is not None:
            return fail(error)
        if self._half_closing:
            return fail(RuntimeError("write() after done_writing()"))
        if self.code is not None:
            return fail(self._ended_error())
        d: Deferred[None] = Deferred()
        self._writes.append((message, d))
        self._flush()
        return d

    def done_writing(self) -> Deferred[None]:
        """No more requests (once those written are sent): END_STREAM."""
        if not self.method.client_streaming:
            return fail(TypeError(f"{self.method.full_name} takes one request, not a stream"))
        if self._half_closed:
            return succeed(None)
        if self.code is not None:
            return fail(self._ended_error())
        d: Deferred[None] = Deferred()
        self._closers.append(d)
        if not self._half_closing:
            self._half_closing = True
            self._flush()
        return d

    def send_all(self, requests: Iterable[RequestT] | AsyncIterable[RequestT]) -> Deferred[None]:
        """Write every request of ``requests`` (an iterable or async
        iterable) as the window allows, then :meth:`done_writing`. If it
        raises, the stream is cancelled with that error's text."""
        return Deferred.fromCoroutine(self._send_all(requests)).addErrback(_ignore)

    async def _send_all(self, requests: Iterable[RequestT] | AsyncIterable[RequestT]) -> None:
        try:
            if hasattr(requests, "__aiter__"):
                async for message in requests:
                    await self.write(message)
            else:
                for message in requests:
                    await self.write(message)
        except Exception as e:
            if self.code is None:
                log.failure(
                    "stream {method}: its requests' iterator failed",
                    method=self.method.full_name,
                )
                self._cancel(CancelledError(message=f"the requests' iterator raised {e!r}"))
            return
        await self.done_writing()

    def _flush(self) -> None:
        connection = self.connection
        credit = self.credit
        if connection is None or credit is None or self.code is not None:
            return
        resend = self._resend
        while resend and credit.credit > 0:
            payload = resend.popleft()
            credit.spend(message_cost(len(payload)))
            connection.send_stream_message(self.call_id, payload)
        writes = self._writes
        while writes and credit.credit > 0 and not resend:
            message, d = writes.popleft()
            try:
                payload = message.SerializeToString()
            except Exception as e:
                d.errback(InvalidArgumentError(message=f"cannot serialize request: {e}"))
                continue
            if len(payload) > self.max_message:
                d.errback(
                    ResourceExhaustedError(
                        message=f"request of {len(payload)} bytes: the provider takes at most "
                        f"{self.max_message} (its max_message_size)"
                    )
                )
                continue
            credit.spend(message_cost(len(payload)))
            connection.send_stream_message(self.call_id, payload)
            if self.retry is not None:
                self._keep(payload)
            d.callback(None)
        if writes or resend:
            if not self._waiting_credit:
                self._waiting_credit = True
                credit.wait().addCallbacks(self._credit_back, _ignore)
            return
        if self._half_closing and not self._half_closed:
            self._half_closed = True
            connection.send_end_stream(self.call_id)
            closers, self._closers = self._closers, []
            for d in closers:
                d.callback(None)

    def _keep(self, payload: bytes) -> None:
        """Keep a request written for a retry, or commit past RETRY_BUFFER."""
        self._sent_bytes += len(payload)
        if self._sent_bytes > RETRY_BUFFER:
            self.commit()
        else:
            self._sent.append(payload)

    def commit(self) -> None:
        """No retry from now on: the requests kept are dropped."""
        self.retry = None
        self._sent = []

    def detach(self) -> None:
        """The attempt failed and another will be made: what was written is
        sent again on it, END_STREAM too if it was sent."""
        self.connection = None
        self.credit = None
        self.call_id = 0
        self._waiting_credit = False
        self._half_closed = False
        self._resend = deque(self._sent)

    def _credit_back(self, _: object) -> None:
        self._waiting_credit = False
        self._flush()

    # ----------------------------------------------------------------- the end

    def cancel(self) -> None:
        """Give up: the provider is told (CANCEL), the stream ends CANCELLED."""
        self._cancel(CancelledError(message="cancelled by the caller"))

    def _cancel(self, error: RpcError) -> None:
        if self.code is not None:
            return
        self.commit()
        connection = self.connection
        if connection is not None:
            connection.stream_cancelled(self)
        opening, self.opening = self.opening, None
        self.end(error)
        if opening is not None:
            opening.cancel()

    def _expired(self) -> None:
        self._timer = None
        self._cancel(DeadlineExceededError(message=f"deadline of {self.timeout:g}s exceeded"))

    def _ended_error(self) -> RpcError:
        if self.code == StatusCode.OK:
            return RpcError(StatusCode.FAILED_PRECONDITION, "the stream has ended")
        return RpcError.from_status(int(self.code or 0), self.details)

    def end(
        self,
        error: RpcError | None,
        trailers: Mapping[str, str] | None = None,
    ) -> None:
        """The stream is over: OK (``error`` None) or ``error``. Replies
        received before stay readable; the error comes after them."""
        if self.code is not None:
            return
        retry = self.retry
        if retry is not None:
            if error is None:
                retry.succeeded()
            else:
                final = retry.failed(self, error)
                if final is None:
                    return  # sent again
                error = final
            self.commit()
        self.code = StatusCode(error.code) if error is not None else StatusCode.OK
        self.details = error.message if error is not None else ""
        self.trailing_metadata = dict(trailers or {})
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.connection = None
        if not self.initial_metadata.called:
            self.initial_metadata.callback({})
        writes, self._writes = self._writes, deque()
        for _, d in writes:
            d.errback(self._ended_error())
        closers, self._closers = self._closers, []
        for d in closers:
            if error is None:
                d.callback(None)
            else:
                d.errback(error)
        if error is not None and isinstance(error, CancelledError):
            self.inbox.abort(error)  # the caller gave up: what is held is dropped
            if self._callback is not None and self._paused:
                # Nothing more is delivered: the end is told now, paused or not.
                self._callback = None
                self._done.errback(error)
        else:
            self.inbox.finish(error)

    # ----------------------------------------------------------------- from the connection

    def attached(self, connection: ClientConnection, call_id: int, send_window: int) -> None:
        self.connection = connection
        self.call_id = call_id
        self.credit = SendCredit(send_window)
        self.inbox.wake = connection.wake_later
        self._flush()

    def _grant(self, increment: int) -> None:
        connection = self.connection
        if connection is not None:
            connection.send_window(self.call_id, increment)

    def message_received(self, payload: bytes | memoryview, cost: int = 0) -> None:
        """A reply arrived; ``cost`` is what it counts against the receive
        window (0: a MESSAGE frame's size, message_cost())."""
        reply = self.method.response_class()
        try:
            reply.ParseFromString(payload)  # type: ignore[arg-type]
        except Exception as e:
            self._cancel(DataLossError(message=f"cannot parse a stream reply: {e}"))
            return
        if self._first:
            self._first = False
            if self.retry is not None:
                self.retry.succeeded()
                self.commit()
            if not self.initial_metadata.called:
                self.initial_metadata.callback({})
        self.inbox.put(reply, cost or len(payload) + HEADER_SIZE)  # message_cost(), inline

    def headers_received(self, metadata: Mapping[str, str] | None) -> None:
        if self.retry is not None:
            self.retry.succeeded()
            self.commit()
        if not self.initial_metadata.called:
            self.initial_metadata.callback(dict(metadata or {}))

    def response_received(
        self,
        status: int,
        message: str,
        trailers: Mapping[str, str] | None,
        payload: bytes | memoryview,
    ) -> None:
        if status:
            self.end(RpcError.from_status(status, message), trailers)
            return
        if not self.method.server_streaming:  # client streaming: the response is here
            reply = self.method.response_class()
            try:
                reply.ParseFromString(payload)  # type: ignore[arg-type]
            except Exception as e:
                self.end(DataLossError(message=f"cannot parse the response: {e}"), trailers)
                return
            self.inbox.available += message_cost(len(payload))  # not counted against the window
            self.inbox.put(reply, message_cost(len(payload)))
        self.end(None, trailers)


class ServerStream(StreamCall[Message, ResponseT]):
    """A server-streaming call: one request went out, replies come back.

    ``async for reply in stream``, ``await stream.read()`` (None at the
    end), ``stream.on_message(f)`` / ``stream.consume(consumer)``;
    ``stream.cancel()``; after the end ``code``, ``details`` and
    ``trailing_metadata``; ``initial_metadata`` a Deferred."""


class ClientStream(StreamCall[RequestT, ResponseT]):
    """A client-streaming call: requests go out (``write``,
    ``done_writing``, or given as an iterable), one response comes back:
    ``await stream`` (or ``stream.response()``) gives it, or raises the
    typed ``RpcError``."""

    def response(self) -> Deferred[ResponseT]:
        """A Deferred of the response."""

        async def response() -> ResponseT:
            reply = await self.read()
            if reply is None:  # pragma: no cover - an OK end always has one
                raise RpcError(StatusCode.INTERNAL, "the stream ended without a response")
            return reply

        return Deferred.fromCoroutine(response())

    def __await__(self) -> Generator[Any, Any, ResponseT]:
        return self.response().__await__()


class BidiStream(StreamCall[RequestT, ResponseT]):
    """A bidirectional stream: ``write``/``done_writing`` (or an iterable
    given at the call) send requests, and replies come back as on a
    :class:`ServerStream`; both directions run at once."""
