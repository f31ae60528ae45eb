"""OpenTelemetry tracing: a client and a server interceptor (docs/tracing.md).

Imported only when tracing is switched on (``[provider] tracing =
opentelemetry``, ``[consumer] tracing = opentelemetry``,
``Client(..., tracing=True)``): the package imports without OpenTelemetry,
and importing this module without it raises an ImportError naming the extra.

The client interceptor starts a CLIENT span per call (child of the span
current where the call is made) and writes its W3C ``traceparent`` (and
``tracestate``) into the call's metadata with the global propagator; the
server interceptor extracts it, starts the SERVER span and makes it current
while the handler runs: an ``async def`` handler's coroutine starts in a copy
of the context that holds it (as :data:`twisted_rpc.core._propagation.CURRENT_CALL`
does), so the calls the handler makes are its children. Streams get a span
from their start to their end.

The interceptors are in ``core`` because both the client and the provider
use them; they take the client's ``ClientCall`` and the server's
``CallContext`` by what they read of them.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Span, SpanKind, Status
    from opentelemetry.trace import StatusCode as SpanStatus
except ImportError as e:  # pragma: no cover (the tests run with it installed)
    raise ImportError(
        "tracing = opentelemetry needs the OpenTelemetry API: "
        f"pip install 'twisted_rpc[otel]' ({e})"
    ) from e
from google.protobuf.message import Message
from twisted.internet.defer import CancelledError as DeferredCancelled
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc._version import __version__
from twisted_rpc.core._interfaces import (
    IClientInterceptor,
    IClientStreamInterceptor,
    IServerInterceptor,
    IServerStreamInterceptor,
)
from twisted_rpc.core._status import RpcError, StatusCode, code_name

__all__ = ["ClientTracing", "ServerTracing", "rpc_system"]

TRACER_NAME = "twisted_rpc"


_SYSTEMS = {"grpc": "grpc", "cpp": "mprpc"}


def rpc_system(protocol: str) -> str:
    """``rpc.system`` for a wire: ``grpc`` for gRPC's, ``mprpc`` for the C++
    mprpc protocol, ``twisted_rpc`` for the native one (a protocol of its
    own, which no gRPC peer speaks)."""
    return _SYSTEMS.get(protocol, "twisted_rpc")


def _code_of(error: BaseException | None) -> tuple[int, str]:
    if isinstance(error, RpcError):
        return error.code, error.message
    if isinstance(error, (DeferredCancelled, GeneratorExit)):
        return StatusCode.CANCELLED, "cancelled"
    return StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


def _finish(span: Span, system: str, code: int, message: str = "") -> None:
    """End ``span`` with the call's status: the status attribute, and an
    error status on anything but OK."""
    span.set_attribute(f"rpc.{system}.status_code", int(code))
    if code != StatusCode.OK:
        name = code_name(code)
        span.set_status(Status(SpanStatus.ERROR, f"{name}: {message}" if message else name))
    span.end()


def _ended(span: Span, system: str) -> Callable[[Any], Any]:
    """A callback and errback ending ``span`` with the outcome it passes on."""

    def ended(result: Any) -> Any:
        if isinstance(result, Failure):
            _finish(span, system, *_code_of(result.value))
        else:
            _finish(span, system, StatusCode.OK)
        return result

    return ended


def _method_attributes(system: str, method: Any) -> dict[str, str | int]:
    return {"rpc.system": system, "rpc.service": method.service, "rpc.method": method.name}


@implementer(IClientInterceptor, IClientStreamInterceptor)
class ClientTracing:
    """A CLIENT span per call and stream, its context sent in the metadata.

    The span covers the whole call as the caller sees it (failover and
    retries included), so it names no provider: a retried call's attempts
    go to different ones.
    """

    def __init__(self, protocol: str = "native") -> None:
        self.system = rpc_system(protocol)
        self.tracer = trace.get_tracer(TRACER_NAME, __version__)

    def _start(self, call: Any) -> Span:
        method = call.method
        span = self.tracer.start_span(
            method.full_name,
            kind=SpanKind.CLIENT,
            attributes=_method_attributes(self.system, method),
        )
        propagate.inject(call.metadata, context=trace.set_span_in_context(span))
        return span

    def intercept(
        self, call: Any, request: Message, proceed: Callable[[Any, Message], Deferred[Message]]
    ) -> Deferred[Message]:
        span = self._start(call)
        try:
            d = proceed(call, request)
        except BaseException as e:
            _finish(span, self.system, *_code_of(e))
            raise
        return d.addBoth(_ended(span, self.system))

    def intercept_stream(self, call: Any, request: Any, proceed: Callable[[Any, Any], Any]) -> Any:
        span = self._start(call)
        try:
            stream = proceed(call, request)
        except BaseException as e:
            _finish(span, self.system, *_code_of(e))
            raise
        if stream.code is not None:  # ended already (refused before it was sent)
            _finish(span, self.system, stream.code, stream.details)
            return stream
        end = stream.end  # the stream's one way to its end: the span ends there too

        def ended(error: Any, trailers: Mapping[str, str] | None = None) -> None:
            was_open = stream.code is None
            end(error, trailers)
            if was_open and stream.code is not None:  # (None: sent again, a retry)
                _finish(span, self.system, stream.code, stream.details)

        stream.end = ended
        return stream


def _server_attributes(system: str, context: Any) -> dict[str, str | int]:
    attributes = _method_attributes(system, context.method)
    transport = getattr(context.connection, "transport", None)
    if transport is None:
        return attributes
    host, peer = transport.getHost(), transport.getPeer()
    for prefix, address in (("server", host), ("network.peer", peer)):
        if isinstance(getattr(address, "host", None), str):
            attributes[f"{prefix}.address"] = address.host
            attributes[f"{prefix}.port"] = address.port
            if prefix == "server":
                attributes["network.transport"] = "tcp"
                attributes["network.type"] = "ipv6" if ":" in address.host else "ipv4"
    return attributes


@implementer(IServerInterceptor, IServerStreamInterceptor)
class ServerTracing:
    """A SERVER span per call and stream served, child of the caller's span
    (``traceparent`` in the metadata), current while the handler runs."""

    def __init__(self) -> None:
        self.tracer = trace.get_tracer(TRACER_NAME, __version__)

    def _start(self, context: Any) -> tuple[Span, str, otel_context.Context]:
        connection = context.connection
        layer = type(connection).__module__.split(".")[1:2]  # the listener's: grpc, cpp, server
        system = rpc_system(layer[0] if layer else "native")
        parent = propagate.extract(context.metadata)
        span = self.tracer.start_span(
            context.method.full_name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_server_attributes(system, context),
        )
        return span, system, trace.set_span_in_context(span, parent)

    def _run(self, request: Any, context: Any, proceed: Callable[[Any, Any], Any]) -> Any:
        """``proceed`` with the span current; a coroutine it returns starts
        here, in a copy of the context that holds the span."""
        span, system, current = self._start(context)
        token = otel_context.attach(current)
        try:
            result = proceed(request, context)
            if inspect.iscoroutine(result):
                result = Deferred.fromCoroutine(result)
        except BaseException as e:
            _finish(span, system, *_code_of(e))
            raise
        finally:
            otel_context.detach(token)
        if isinstance(result, Deferred):
            return result.addBoth(_ended(span, system))
        if context.method.server_streaming and (
            hasattr(result, "__aiter__")
            or (hasattr(result, "__iter__") and not isinstance(result, (Message, bytes, str)))
        ):
            return _traced_stream(result, span, system, current)
        _finish(span, system, StatusCode.OK)  # (a wrong result: the runner says so)
        return result

    def intercept(self, request: Message, context: Any, proceed: Callable[..., Any]) -> Any:
        return self._run(request, context, proceed)

    def intercept_stream(self, request: Any, context: Any, proceed: Callable[..., Any]) -> Any:
        return self._run(request, context, proceed)


async def _traced_stream(
    source: Any, span: Span, system: str, current: otel_context.Context
) -> AsyncIterator[Any]:
    """Re-yield what a streaming handler yields with its span current (in the
    context of the coroutine that drives the stream); the span ends with it."""
    token = otel_context.attach(current)
    code, message = int(StatusCode.OK), ""
    try:
        if hasattr(source, "__aiter__"):
            async for item in source:
                yield item
        else:
            for item in source:
                yield item
    except BaseException as e:
        code, message = _code_of(e)
        if isinstance(e, GeneratorExit):
            message = "the stream ended before its handler did"
        raise
    finally:
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()
        otel_context.detach(token)
        _finish(span, system, code, message)
