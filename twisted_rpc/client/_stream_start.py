"""How a :class:`twisted_rpc.client.Client` starts streams: the
:class:`StreamStarter` half of it (what proxies' streaming methods call)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._balancer import Balancer
from twisted_rpc.client._calls import NotSentError
from twisted_rpc.client._dials import ClientReactor
from twisted_rpc.client._hedge import attempts_error
from twisted_rpc.client._options import ClientOptions, timeout_error
from twisted_rpc.client._retry import Retries, sleep
from twisted_rpc.client._service_config import HedgingPolicy, RetryPolicy
from twisted_rpc.client._streams import BidiStream, ClientStream, ServerStream, StreamCall
from twisted_rpc.core._interfaces import IClientStreamInterceptor
from twisted_rpc.core._service import MethodInfo, wrong_request_type
from twisted_rpc.core._status import RpcError, UnavailableError

if TYPE_CHECKING:
    from twisted_rpc.client._pool import Provider
    from twisted_rpc.client._routes import ClientCall, _ServiceRoute

log = Logger(namespace="twisted_rpc.client")


class StreamStarter:
    """Starting streams: picks a provider (waiting for discovery and a
    connection, trying the next while one cannot take it) and returns the
    stream object at once."""

    reactor: ClientReactor
    options: ClientOptions
    connect_timeout: float
    _invoke_stream: Callable[[ClientCall, Any], StreamCall[Any, Any]]
    _routes: dict[str, _ServiceRoute]
    _retries: Retries
    _stream_retry = True  # False while a stream(retry=False) starts

    if TYPE_CHECKING:

        def _route(self, service: str) -> _ServiceRoute: ...

    def stream(
        self,
        method: MethodInfo,
        request: Any = None,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: Balancer | None = None,
        retry: bool = True,
    ) -> StreamCall[Any, Any]:
        """Start a streaming call of ``method`` (what proxies' streaming
        methods do): ``request`` is the request of a server-streaming
        method, or for the others the requests (an iterable or async
        iterable, sent as the window allows, then END_STREAM) or None (write
        them by hand). A stream has no deadline unless given ``timeout``
        (or its method's service config gives one): the client's default
        timeout is for unary calls. A stream whose method has a retry
        policy is retried until its first reply (StreamRetry), unless
        ``retry`` is False."""
        if not (method.client_streaming or method.server_streaming):
            raise TypeError(f"{method.full_name} is not a streaming method: use call()")
        error = timeout_error(timeout)
        if error is not None:
            raise error
        if not method.client_streaming:
            wrong = wrong_request_type(method, request)
            if wrong is not None:
                raise wrong
        elif (
            request is not None
            and not (hasattr(request, "__iter__") or hasattr(request, "__aiter__"))
            or isinstance(request, Message)
        ):
            raise TypeError(
                f"{method.full_name} takes an iterable of "
                f"{method.request_class.DESCRIPTOR.full_name} (or none), not {request!r}"
            )
        from twisted_rpc.client._routes import ClientCall

        call = ClientCall(method, timeout, dict(metadata or {}), False, balancer)
        # Interceptors return the stream at once: _start_stream runs within.
        self._stream_retry = retry
        try:
            return self._invoke_stream(call, request)
        finally:
            self._stream_retry = True

    def _start_stream(self, call: ClientCall, request: Any) -> StreamCall[Any, Any]:
        method = call.method
        kind: type[StreamCall[Any, Any]]
        if method.client_streaming:
            kind = BidiStream if method.server_streaming else ClientStream
            requests, request = request, None
        else:
            kind, requests = ServerStream, None
        stream = kind(method, self.reactor, call.timeout, call.metadata, self.options.stream_window)
        route = self._routes.get(method.service) or self._route(method.service)
        balancer = call.balancer or route.balancer
        tried: list[Provider] = []
        policy = self._retries.policy_for(method, False) if self._stream_retry else None
        if isinstance(policy, HedgingPolicy) and not method.client_streaming:
            StreamHedge(self, stream, request, route, balancer, policy).start()
            return stream
        if policy is not None:
            stream.retry = StreamRetry(self, stream, request, route, balancer, policy, tried)
        channel = balancer.pick(route.channels)
        protocol = channel.protocol if channel is not None else None
        if protocol is None or protocol.open_stream(stream, request) is not None:
            self._opening(stream, request, route, balancer, tried)
        elif channel is not None:
            tried.append(channel)
        if requests is not None:
            stream.send_all(requests)
        return stream

    def _opening(
        self,
        stream: StreamCall[Any, Any],
        request: Message | None,
        route: _ServiceRoute,
        balancer: Balancer,
        tried: list[Provider],
        delay: float = 0.0,
    ) -> None:
        """Open ``stream`` in the background (after ``delay``: a retry)."""
        opening = Deferred.fromCoroutine(
            self._open_stream(stream, request, route, balancer, tried, delay)
        )
        stream.opening = opening
        opening.addErrback(_stream_not_opened, stream)

    async def _open_stream(
        self,
        stream: StreamCall[Any, Any],
        request: Message | None,
        route: _ServiceRoute,
        balancer: Balancer,
        attempted: list[Provider] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Find a provider for ``stream`` (waiting for discovery's first list
        and a connection), trying the next while one cannot take it; one
        not in ``attempted`` (to which the one taken is added) first."""
        if delay > 0:
            await sleep(self.reactor, delay)
        method = stream.method
        if not route.known:
            waiter: Deferred[None] = Deferred(route.waiters.remove)
            route.waiters.append(waiter)
            timer = self.reactor.callLater(self.connect_timeout, waiter.cancel)
            try:
                await waiter
            except defer.CancelledError:
                if timer.active():
                    raise
                raise NotSentError(
                    message=f"no provider of {method.service}: none known after "
                    f"{self.connect_timeout:g}s"
                ) from None
            finally:
                if timer.active():
                    timer.cancel()
        tried: list[Provider] = list(attempted or ())
        avoid = len(tried)
        error: RpcError = NotSentError(message=route.none_left(method.service))
        while True:
            channel = balancer.pick(route.channels, tried)
            if channel is None and avoid:  # each attempted already: any of them again
                del tried[:avoid]
                avoid, channel = 0, balancer.pick(route.channels, tried)
            if channel is None:
                raise error
            tried.append(channel)
            try:
                protocol = await channel.when_ready()
            except NotSentError as e:
                error = e
                continue
            if protocol.streams_supported is None:
                await protocol.ping()  # a connection not proven yet: learn its settings
            failed = protocol.open_stream(stream, request)
            if failed is None:
                stream.opening = None
                if attempted is not None:
                    attempted.append(channel)
                return
            if not isinstance(failed, NotSentError):
                raise failed
            error = failed


class StreamRetry:
    """A stream's retries before its first reply: as a unary call's
    (_retry.send_with_retries), on the policy's retryable codes (a hedging
    policy's non-fatal ones: streams are not hedged), within ``max_attempts``,
    the retry budget and the deadline, after a jittered backoff, to a
    provider not attempted yet when there is one."""

    def __init__(
        self,
        starter: StreamStarter,
        stream: StreamCall[Any, Any],
        request: Message | None,
        route: _ServiceRoute,
        balancer: Balancer,
        policy: RetryPolicy | HedgingPolicy,
        tried: list[Provider],
    ) -> None:
        self.starter = starter
        self.request = request
        self.route = route
        self.balancer = balancer
        self.policy = policy
        self.tried = tried  # the channels attempted, in order
        self.attempts = 1
        self.budget = starter._retries.budget
        self.budget.deposit()
        self.last: RpcError | None = None

    def succeeded(self) -> None:
        self.budget.succeeded()

    def failed(self, stream: StreamCall[Any, Any], error: RpcError) -> RpcError | None:
        policy = self.policy
        if isinstance(error, NotSentError):  # no provider could take a retry
            last = self.last or error
            return attempts_error(last, self.attempts, "no provider left") if self.last else last
        if isinstance(policy, HedgingPolicy):
            codes, backoff = policy.non_fatal_status_codes, 0.0
        else:
            codes = policy.retryable_status_codes
            backoff = self.starter._retries.backoff(policy, self.attempts)
        if error.code not in codes:
            return attempts_error(error, self.attempts) if self.attempts > 1 else error
        self.budget.failed()
        if self.attempts >= policy.max_attempts:
            return attempts_error(error, self.attempts)
        events, name = self.starter._retries.events, stream.method.full_name
        if not self.budget.withdraw():
            events("retry_refused", name)
            return attempts_error(error, self.attempts, "retry budget exhausted")
        clock = self.starter.reactor
        if stream.timeout and clock.seconds() + backoff >= stream.created + stream.timeout:
            return attempts_error(error, self.attempts, "no time left to retry")
        log.debug(
            "retrying stream {method} in {delay:.3f}s: {error}",
            method=stream.method.full_name,
            delay=backoff,
            error=error.message,
        )
        events("retried", name, error.code)
        self.attempts += 1
        self.last = error
        stream.detach()
        self.starter._opening(stream, self.request, self.route, self.balancer, self.tried, backoff)
        return None


class _Attempt:
    """One attempt of a hedged server stream, in its connection's streams
    until it wins (the caller's stream takes its place) or loses (CANCEL)."""

    def __init__(self, hedge: StreamHedge) -> None:
        stream = hedge.stream
        self.hedge = hedge
        self.method = stream.method
        self.timeout = stream.timeout
        self.created = stream.created
        self.metadata = stream.metadata
        self.max_message = 2**31 - 1
        self.connection: Any = None
        self.call_id = 0
        self.window = 0
        self.credit = None
        self.opening: Deferred[Any] | None = None
        self.over = False

    def attached(self, connection: Any, call_id: int, send_window: int) -> None:
        self.connection, self.call_id, self.window = connection, call_id, send_window

    def message_received(self, payload: bytes | memoryview, cost: int = 0) -> None:
        self.hedge.won(self).message_received(payload, cost)

    def headers_received(self, metadata: Mapping[str, str] | None) -> None:
        self.hedge.won(self).headers_received(metadata)

    def response_received(
        self, status: int, message: str, trailers: Mapping[str, str] | None, payload: Any
    ) -> None:
        if status:
            self.end(RpcError.from_status(status, message))
        else:
            self.hedge.won(self).response_received(status, message, trailers, payload)

    def end(self, error: RpcError | None, trailers: Mapping[str, str] | None = None) -> None:
        if not self.over:
            self.over = True
            self.hedge.failed(self, error or UnavailableError(message="no reply"))

    def cancel(self) -> None:
        """A loser: CANCEL to its provider, or its opening given up."""
        self.over = True
        if self.connection is not None:
            self.connection.stream_cancelled(self)
        opening, self.opening = self.opening, None
        if opening is not None:
            opening.cancel()


class StreamHedge:
    """A hedged server stream (``hedgingPolicy``): after ``hedging_delay``
    with no reply, another attempt to a provider not tried yet, up to
    ``max_attempts`` in flight in all, within the budget and the deadline;
    the first attempt to bring a reply, initial metadata or an OK end wins
    and becomes the caller's stream; the others are cancelled (CANCEL). A
    non-fatal status hedges at once; any other ends the stream with it."""

    def __init__(
        self,
        starter: StreamStarter,
        stream: StreamCall[Any, Any],
        request: Message | None,
        route: _ServiceRoute,
        balancer: Balancer,
        policy: HedgingPolicy,
    ) -> None:
        self.starter = starter
        self.stream = stream
        self.request = request
        self.route = route
        self.balancer = balancer
        self.policy = policy
        self.budget = starter._retries.budget
        self.clock = starter.reactor
        self.tried: list[Provider] = []
        self.pending: list[_Attempt] = []
        self.attempts = 0
        self.timer: Any = None
        self.why = ""
        self.last: RpcError | None = None
        self.done = False

    def start(self) -> None:
        self.budget.deposit()
        opening: Deferred[None] = Deferred(lambda _: self._stop())
        opening.addErrback(lambda f: f.trap(defer.CancelledError) and None)
        self.stream.opening = opening
        self._send()

    def _send(self) -> None:
        attempt = _Attempt(self)
        self.pending.append(attempt)
        self.attempts += 1
        stream = cast("StreamCall[Any, Any]", attempt)
        self.starter._opening(stream, self.request, self.route, self.balancer, self.tried)
        self._arm()

    def _arm(self) -> None:
        if self.done or self.attempts >= self.policy.max_attempts:
            return
        delay = self.policy.hedging_delay
        deadline = self.stream.timeout and self.stream.created + self.stream.timeout
        if deadline and self.clock.seconds() + delay >= deadline:
            self.why = "no time left to hedge"
            return
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = self.clock.callLater(delay, self._hedge)

    def _hedge(self) -> None:
        self.timer = None
        if self.done or self.attempts >= self.policy.max_attempts:
            return
        events, name = self.starter._retries.events, self.stream.method.full_name
        if not self.budget.withdraw():
            self.why = "retry budget exhausted"
            events("retry_refused", name)
            return
        events("hedged", name)
        log.debug(
            "hedging stream {method}: attempt {n}",
            method=self.stream.method.full_name,
            n=self.attempts + 1,
        )
        self._send()

    def won(self, attempt: _Attempt) -> StreamCall[Any, Any]:
        """``attempt`` brought the first reply: the caller's stream takes its place."""
        stream = self.stream
        if not self.done:
            self.pending.remove(attempt)
            self.budget.succeeded()
            self._stop()
            stream.opening = None
            connection = attempt.connection
            if connection.streams.get(attempt.call_id) is attempt:
                connection.streams[attempt.call_id] = stream
            stream.max_message = attempt.max_message
            stream.attached(connection, attempt.call_id, attempt.window)
        return stream

    def failed(self, attempt: _Attempt, error: RpcError) -> None:
        if attempt in self.pending:
            self.pending.remove(attempt)
        if self.done:
            return
        if isinstance(error, NotSentError):  # never written: not an attempt
            self.attempts -= 1
            if not self.pending:
                self._finish(self.last or error)
            return
        if error.code not in self.policy.non_fatal_status_codes:
            self._finish(error)
            return
        self.budget.failed()
        self.last = error
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self._hedge()  # at once
        if not self.pending and not self.done:
            self._finish(error)

    def _finish(self, error: RpcError) -> None:
        self._stop()
        self.stream.opening = None
        if self.attempts > 1:
            attempts_error(error, self.attempts, self.why)
        self.stream.end(error)

    def _stop(self) -> None:
        """The outcome is decided (or the caller gave up): no more attempts."""
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        pending, self.pending = self.pending, []
        for attempt in pending:
            attempt.cancel()


def _stream_not_opened(failure: Failure, stream: StreamCall[Any, Any]) -> None:
    """A stream that found no provider ends with why (a cancel ended it already)."""
    error = failure.value
    if not isinstance(error, RpcError):
        if not failure.check(defer.CancelledError):
            log.failure("starting stream {method}", failure, method=stream.method.full_name)
        error = UnavailableError(message=f"cannot start the stream: {failure.getErrorMessage()}")
    stream.end(error)


def _stream_intercepted(
    interceptor: IClientStreamInterceptor,
    proceed: Callable[[ClientCall, Any], StreamCall[Any, Any]],
) -> Callable[[ClientCall, Any], StreamCall[Any, Any]]:
    def invoke(call: ClientCall, request: Any) -> StreamCall[Any, Any]:
        return interceptor.intercept_stream(call, request, proceed)  # type: ignore[no-any-return]

    return invoke
