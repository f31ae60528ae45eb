"""Routing calls to service implementations.

:class:`Dispatcher` maps wire routes (``b"package.Service/Method"``) to
handlers wrapped in the interceptor chain (:class:`FunctionInterceptor` makes
one from a plain function). Every listener, native or C++, runs calls through it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from zope.interface import implementer

from twisted_rpc.core._interfaces import IServerInterceptor, IServerStreamInterceptor
from twisted_rpc.core._propagation import CURRENT_CALL
from twisted_rpc.core._service import MethodInfo, Service
from twisted_rpc.core._status import NotFoundError, RpcError, UnimplementedError
from twisted_rpc.server._context import CallContext

ECHO_LIMIT = 128
"""At most this many characters of what a peer sent are quoted in an error or a log line."""


MAX_ERROR_MESSAGE = 1024
"""Error messages are cut to this many characters on the wire (a consumer
reads at most a few KiB of a frame's extension)."""


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, with a marker naming its full length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


Handler = Callable[[Message, "CallContext"], Any]


class ServerMethod:
    """A routed method: its info and the handler chain to invoke.

    ``long_lived``: its calls wait by design (a long poll such as
    ``Health.Watch``, streams later) and count against the long-lived
    budget of :class:`ServerLimits`, not the ordinary one.
    """

    __slots__ = ("info", "request_class", "response_class", "invoke", "long_lived", "streaming")

    def __init__(self, info: MethodInfo, invoke: Handler, long_lived: bool = False) -> None:
        self.info = info
        self.request_class = info.request_class
        self.response_class = info.response_class
        self.invoke = invoke
        self.streaming = info.client_streaming or info.server_streaming
        """A stream (of any kind): its calls have their own budget."""
        self.long_lived = long_lived or self.streaming


def _unimplemented(info: MethodInfo) -> Handler:
    def handler(request: Message, context: CallContext) -> Any:
        raise UnimplementedError(message=f"{info.full_name} is not implemented by this provider")

    return handler


def _from_coroutine_function(fn: Callable[..., Any]) -> Handler:
    def handler(request: Message, context: CallContext) -> Deferred[Message]:
        # The coroutine runs in a copy of this context: the calls it makes
        # see the call it serves (deadline, cancellation, metadata).
        token = CURRENT_CALL.set(context)
        try:
            return Deferred.fromCoroutine(fn(request, context))
        finally:
            CURRENT_CALL.reset(token)

    return handler


def _stream_intercepted(interceptor: IServerStreamInterceptor, proceed: Handler) -> Handler:
    def handler(request: Any, context: CallContext) -> Any:
        return interceptor.intercept_stream(request, context, proceed)

    return handler


def _intercepted(interceptor: IServerInterceptor, proceed: Handler) -> Handler:
    def handler(request: Message, context: CallContext) -> Any:
        return interceptor.intercept(request, context, proceed)

    return handler


class Dispatcher:
    """Routes to the handlers of the services it was given."""

    def __init__(
        self,
        services: Iterable[Service] = (),
        interceptors: Sequence[IServerInterceptor] = (),
    ) -> None:
        self.interceptors = list(interceptors)
        self.services: dict[str, Service] = {}
        self.routes: dict[bytes, ServerMethod] = {}
        for service in services:
            self.add(service)

    def add(self, service: Service) -> None:
        """Serve every method of ``service`` (a :class:`Service` instance).

        Methods named in the class attribute ``long_lived_methods`` (a set
        of method names, e.g. ``frozenset({"Watch"})``) are long-lived.
        """
        if not isinstance(service, Service) or type(service).descriptor is None:
            raise TypeError(f"{service!r} is not a Service with a descriptor")
        info = type(service).service_info()
        if info.name in self.services:
            raise ValueError(f"service {info.name} is served twice")
        long_lived = frozenset(getattr(type(service), "long_lived_methods", ()))
        unknown = long_lived - set(info.methods)
        if unknown:
            raise ValueError(
                f"{type(service).__qualname__}.long_lived_methods names methods "
                f"{info.name} does not have: {', '.join(sorted(unknown))}"
            )
        self.services[info.name] = service
        for method in info.methods.values():
            handler = getattr(service, method.name, None)
            if not callable(handler):
                handler = _unimplemented(method)
            elif method.client_streaming or method.server_streaming:
                for interceptor in reversed(self.interceptors):
                    if IServerStreamInterceptor.providedBy(interceptor):
                        handler = _stream_intercepted(interceptor, handler)
                self.routes[method.route] = ServerMethod(method, handler, True)
                continue
            elif inspect.iscoroutinefunction(handler):
                handler = _from_coroutine_function(handler)
            for interceptor in reversed(self.interceptors):
                if IServerInterceptor.providedBy(interceptor) or not (
                    IServerStreamInterceptor.providedBy(interceptor)
                ):
                    handler = _intercepted(interceptor, handler)
            self.routes[method.route] = ServerMethod(method, handler, method.name in long_lived)

    def not_found(self, route: bytes) -> RpcError:
        """The error for a route no service here answers (quoting at most
        :data:`ECHO_LIMIT <twisted_rpc.server._dispatcher.ECHO_LIMIT>` characters of it)."""
        text = route.decode("utf-8", "replace")
        service, _, method = text.rpartition("/")
        if service in self.services:
            return NotFoundError(message=f"unknown method {clip(method)!r} of service {service}")
        return NotFoundError(message=f"unknown service {clip(service or text)!r}")


@implementer(IServerInterceptor)
class FunctionInterceptor:
    """An interceptor from a plain function ``f(request, context, proceed)``."""

    def __init__(self, function: Callable[[Message, CallContext, Handler], Any]) -> None:
        self.function = function

    def intercept(self, request: Message, context: CallContext, proceed: Handler) -> Any:
        return self.function(request, context, proceed)
