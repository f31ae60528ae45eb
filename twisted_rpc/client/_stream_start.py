"""How a :class:`~twisted_rpc.client.Client` starts streams: the
:class:`StreamStarter` half of it (what proxies' streaming methods call)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._balancer import Balancer
from twisted_rpc.client._connection import NotSentError
from twisted_rpc.client._dials import ClientReactor
from twisted_rpc.client._options import ClientOptions, timeout_error
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

    if TYPE_CHECKING:

        def _route(self, service: str) -> _ServiceRoute: ...

    def stream(
        self,
        method: MethodInfo,
        request: Any = None,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: Balancer | None = None,
    ) -> StreamCall[Any, Any]:
        """Start a streaming call of ``method`` (what proxies' streaming
        methods do): ``request`` is the request of a server-streaming
        method, or for the others the requests (an iterable or async
        iterable, sent as the window allows, then END_STREAM) or None (write
        them by hand). A stream has no deadline unless given ``timeout``
        (or its method's service config gives one): the client's default
        timeout is for unary calls."""
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
        return self._invoke_stream(call, request)

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
        channel = balancer.pick(route.channels)
        protocol = channel.protocol if channel is not None else None
        if protocol is None or protocol.open_stream(stream, request) is not None:
            opening = Deferred.fromCoroutine(self._open_stream(stream, request, route, balancer))
            stream.opening = opening
            opening.addErrback(_stream_not_opened, stream)
        if requests is not None:
            stream.send_all(requests)
        return stream

    async def _open_stream(
        self,
        stream: StreamCall[Any, Any],
        request: Message | None,
        route: _ServiceRoute,
        balancer: Balancer,
    ) -> None:
        """Find a provider for ``stream`` (waiting for discovery's first list
        and a connection), trying the next while one cannot take it."""
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
        tried: list[Provider] = []
        error: RpcError = NotSentError(message=f"no provider of {method.service}")
        while True:
            channel = balancer.pick(route.channels, tried)
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
                return
            if not isinstance(failed, NotSentError):
                raise failed
            error = failed


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
