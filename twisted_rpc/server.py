"""Provider side: routing calls to service implementations.

:class:`Dispatcher` maps wire routes (``b"package.Service/Method"``) to
handlers wrapped in the interceptor chain; :class:`ServerConnection` runs one
connection's calls (parse, invoke, answer, deadlines, cancellation);
:class:`ServerFactory` ties connections to a dispatcher and can drain them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc import wire
from twisted_rpc.deadlines import DeadlineQueue
from twisted_rpc.interfaces import ICallObserver, IServerInterceptor
from twisted_rpc.protocol import RpcConnection
from twisted_rpc.service import MethodInfo, Service
from twisted_rpc.status import (
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RpcError,
    StatusCode,
    UnavailableError,
    UnimplementedError,
    code_name,
)
from twisted_rpc.wire import FrameKind, ProtocolError

__all__ = [
    "CallContext",
    "Dispatcher",
    "ServerConnection",
    "ServerFactory",
    "ServerLimits",
    "ServerMethod",
]

log = Logger()

Handler = Callable[[Message, "CallContext"], Any]


class CallContext:
    """What a handler knows of the call it serves, beyond the request."""

    __slots__ = ("call_id", "method", "metadata", "deadline", "connection")

    def __init__(
        self,
        call_id: int,
        method: MethodInfo,
        metadata: Mapping[str, str] | None,
        deadline: float | None,
        connection: ServerConnection | None,
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.metadata: Mapping[str, str] = metadata or {}
        self.deadline = deadline
        self.connection = connection

    @property
    def peer(self) -> str:
        return self.connection.peer if self.connection is not None else "?"

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None without one."""
        if self.deadline is None or self.connection is None:
            return None
        return max(0.0, self.deadline - self.connection.clock.seconds())


class ServerMethod:
    """A routed method: its info and the handler chain to invoke."""

    __slots__ = ("info", "request_class", "response_class", "invoke")

    def __init__(self, info: MethodInfo, invoke: Handler) -> None:
        self.info = info
        self.request_class = info.request_class
        self.response_class = info.response_class
        self.invoke = invoke


def _unimplemented(info: MethodInfo) -> Handler:
    def handler(request: Message, context: CallContext) -> Any:
        raise UnimplementedError(message=f"{info.full_name} is not implemented by this provider")

    return handler


def _from_coroutine_function(fn: Callable[..., Any]) -> Handler:
    def handler(request: Message, context: CallContext) -> Deferred:
        return Deferred.fromCoroutine(fn(request, context))

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
        """Serve every method of ``service`` (a :class:`Service` instance)."""
        if not isinstance(service, Service) or type(service).descriptor is None:
            raise TypeError(f"{service!r} is not a Service with a descriptor")
        info = type(service).service_info()
        if info.name in self.services:
            raise ValueError(f"service {info.name} is served twice")
        self.services[info.name] = service
        for method in info.methods.values():
            handler = getattr(service, method.name, None)
            if not callable(handler):
                handler = _unimplemented(method)
            elif inspect.iscoroutinefunction(handler):
                handler = _from_coroutine_function(handler)
            for interceptor in reversed(self.interceptors):
                handler = _intercepted(interceptor, handler)
            self.routes[method.route] = ServerMethod(method, handler)

    def not_found(self, route: bytes) -> RpcError:
        """The error for a route no service here answers."""
        text = route.decode("utf-8", "replace")
        service, _, method = text.rpartition("/")
        if service in self.services:
            return NotFoundError(message=f"unknown method {method!r} of service {service}")
        return NotFoundError(message=f"unknown service {service or text!r}")


class ServerConnection(RpcConnection):
    """One provider-side connection: many calls in flight, answered in any order."""

    def __init__(self, factory: ServerFactory) -> None:
        super().__init__(factory.clock, factory.max_frame_size)
        self.factory = factory
        self.routes = factory.dispatcher.routes
        self.pending: dict[int, tuple[Deferred, MethodInfo, float]] = {}
        self.deadlines = DeadlineQueue(factory.clock, self.pending, self._deadline_expired)
        self.draining = False
        self.last_call_id = 0
        self._handlers[FrameKind.REQUEST] = self._request_received
        self._handlers[FrameKind.CANCEL] = self._cancel_received

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.add(self)
        if self.factory.draining:
            self.goaway("provider is shutting down")

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.connections.discard(self)
        self.deadlines.stop()
        pending = list(self.pending.values())
        self.factory.in_flight -= len(pending)
        self.pending.clear()
        for d, info, started in pending:
            self._finished(info.full_name, StatusCode.CANCELLED, started)
            d.cancel()

    def write_buffer_full(self) -> None:
        # Answers are not being read: stop reading requests until they are.
        super().write_buffer_full()
        log.info("{peer} is not reading its answers: pausing its requests", peer=self.peer)
        self.transport.pauseProducing()

    def write_buffer_drained(self) -> None:
        super().write_buffer_drained()
        self.transport.resumeProducing()

    def goaway(self, message: str = "") -> None:
        """Tell the peer to send no new calls here; calls in flight still finish."""
        if not self.draining:
            self.draining = True
            if self.connected:
                self.send(wire.encode_goaway(self.last_call_id, message))

    # ----------------------------------------------------------------- calls

    def _request_received(
        self,
        call_id: int,
        status: int,
        timeout_ms: int,
        route: bytes,
        metadata: dict[str, str] | None,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        started = self.clock.seconds()
        method = self.routes.get(route)
        if method is None:
            not_found = self.factory.dispatcher.not_found(route)
            text = route.decode("utf-8", "replace")
            self._send_error(call_id, not_found, text, started, unknown=True)
            return
        if call_id in self.pending:
            raise ProtocolError(f"call id {call_id} is already in flight")
        if self.draining:
            self._send_error(
                call_id,
                UnavailableError(message="provider is shutting down"),
                method.info.full_name,
                started,
            )
            return
        limits = self.factory.limits
        if len(self.pending) >= limits.max_calls_per_connection:
            self._send_error(
                call_id,
                ResourceExhaustedError(
                    message=f"{limits.max_calls_per_connection} calls in flight on this connection"
                ),
                method.info.full_name,
                started,
            )
            return
        if self.factory.in_flight >= limits.max_calls:
            self._send_error(
                call_id,
                ResourceExhaustedError(
                    message=f"{limits.max_calls} calls in flight at this provider"
                ),
                method.info.full_name,
                started,
            )
            return
        self.last_call_id = call_id
        request = method.request_class()
        try:
            request.ParseFromString(payload)
        except Exception as e:
            self._send_error(
                call_id,
                InvalidArgumentError(
                    message=f"cannot parse {method.request_class.DESCRIPTOR.full_name}: {e}"
                ),
                method.info.full_name,
                started,
            )
            return
        deadline = started + timeout_ms / 1000.0 if timeout_ms else None
        context = CallContext(call_id, method.info, metadata, deadline, self)
        try:
            result = method.invoke(request, context)
        except Exception as e:
            error = self._status_of(e, call_id, method.info)
            self._send_error(call_id, error, method.info.full_name, started)
            return
        if type(result) is method.response_class:
            self._send_response(call_id, result, method.info, started)
            return
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            self.pending[call_id] = (result, method.info, started)
            self.factory.in_flight += 1
            if deadline is not None:
                self.deadlines.add(deadline, call_id)
            result.addCallbacks(
                self._async_answer,
                self._async_failure,
                callbackArgs=(call_id, method.info),
                errbackArgs=(call_id, method.info),
            )
        else:
            self._send_response(call_id, result, method.info, started)

    def _async_answer(self, result: object, call_id: int, info: MethodInfo) -> None:
        entry = self._take(call_id)
        if entry is not None:
            self._send_response(call_id, result, info, entry[2])

    def _async_failure(self, failure: Failure, call_id: int, info: MethodInfo) -> None:
        entry = self._take(call_id)
        if entry is None:
            return  # cancelled, expired or disconnected: already answered or nobody waits
        error = self._status_of(failure.value, call_id, info, failure)
        self._send_error(call_id, error, info.full_name, entry[2])

    def _send_response(
        self, call_id: int, result: object, info: MethodInfo, started: float
    ) -> None:
        if type(result) is not info.response_class:
            log.error(
                "call {call_id} {method} from {peer}: handler returned {kind}, expected {expected}",
                call_id=call_id,
                method=info.full_name,
                peer=self.peer,
                kind=type(result).__name__,
                expected=info.response_class.DESCRIPTOR.full_name,
            )
            error = InternalError(message="internal error")
            self._send_error(call_id, error, info.full_name, started)
            return
        try:
            payload = result.SerializeToString()  # type: ignore[attr-defined]
        except Exception as e:
            self._send_error(call_id, self._status_of(e, call_id, info), info.full_name, started)
            return
        self.send(wire.encode_response(call_id, len(payload)), payload)
        if self.factory.timing:
            self._finished(info.full_name, StatusCode.OK, started, call_id)

    def _send_error(
        self, call_id: int, error: RpcError, method: str, started: float, unknown: bool = False
    ) -> None:
        """Answer ``call_id`` with ``error``, and log the failed call."""
        duration = self.clock.seconds() - started
        log.info(
            "call {call_id} {method} from {peer} failed: {code} {message} ({duration_ms:.1f} ms)",
            call_id=call_id,
            method=method,
            service=method.rpartition("/")[0],
            peer=self.peer,
            code=code_name(error.code),
            message=error.message,
            duration_ms=duration * 1000,
        )
        self.send(wire.encode_status(call_id, int(error.code), error.message))
        observer = self.factory.observer
        if observer is not None:
            observer.call_finished("?/?" if unknown else method, int(error.code), duration)

    def _finished(self, method: str, code: int, started: float, call_id: int | None = None) -> None:
        """Tell the observer of a call's end; log it if it was slow."""
        duration = self.clock.seconds() - started
        observer = self.factory.observer
        if observer is not None:
            observer.call_finished(method, code, duration)
        threshold = self.factory.slow_call_threshold
        if code == StatusCode.OK and threshold and duration >= threshold:
            log.warn(
                "slow call {call_id} {method} from {peer}: {duration_ms:.1f} ms",
                call_id=call_id,
                method=method,
                peer=self.peer,
                code="OK",
                duration_ms=duration * 1000,
            )

    def _status_of(
        self, error: BaseException, call_id: int, info: MethodInfo, failure: Failure | None = None
    ) -> RpcError:
        """The error to send for ``error``: RpcErrors as they are, others as INTERNAL."""
        if isinstance(error, RpcError):
            return error
        if isinstance(error, defer.CancelledError):
            return RpcError(StatusCode.CANCELLED, "cancelled by the provider")
        log.failure(
            "call {call_id} {method} from {peer} failed",
            failure=failure or Failure(error),
            call_id=call_id,
            method=info.full_name,
            peer=self.peer,
        )
        return InternalError(message="internal error")

    def _take(self, call_id: int) -> tuple[Deferred, MethodInfo, float] | None:
        """Remove a call from the calls in flight (None if it is not there)."""
        entry = self.pending.pop(call_id, None)
        if entry is not None:
            self.factory.in_flight -= 1
        return entry

    def _cancel_received(self, call_id: int, *_: object) -> None:
        entry = self._take(call_id)
        if entry is not None:
            self._finished(entry[1].full_name, StatusCode.CANCELLED, entry[2])
            entry[0].cancel()

    def _deadline_expired(self, call_id: int) -> None:
        entry = self._take(call_id)
        if entry is not None:
            d, info, started = entry
            error = RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded at the provider")
            self._send_error(call_id, error, info.full_name, started)
            d.cancel()


@dataclass(frozen=True)
class ServerLimits:
    """What one provider accepts at most (see docs/config.md)."""

    max_calls_per_connection: int = 1000
    """Calls in flight (answered through a Deferred) on one connection."""
    max_calls: int = 10000
    """Calls in flight on all connections together."""
    max_connections: int = 1000
    idle_timeout: float = 0.0
    """Close a connection with no call in flight and no frame for this long (0: never)."""


class ServerFactory(Factory):
    """Builds :class:`ServerConnection` s for a dispatcher and tracks them."""

    noisy = False

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: IReactorTime,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        limits: ServerLimits | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.max_frame_size = max_frame_size
        self.limits = limits or ServerLimits()
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self.in_flight = 0
        self._idle_sweep: Any = None
        self._observer: ICallObserver | None = None
        self._slow_call_threshold = 0.0
        self.timing = False
        """Whether successful calls are timed (for the observer or the slow-call log)."""

    @property
    def observer(self) -> ICallObserver | None:
        """Told of every call's end (metrics); see :mod:`twisted_rpc.metrics`."""
        return self._observer

    @observer.setter
    def observer(self, observer: ICallObserver | None) -> None:
        self._observer = observer
        self.timing = observer is not None or self._slow_call_threshold > 0

    @property
    def slow_call_threshold(self) -> float:
        """Seconds from which a successful call is logged as slow (0: never)."""
        return self._slow_call_threshold

    @slow_call_threshold.setter
    def slow_call_threshold(self, seconds: float) -> None:
        self._slow_call_threshold = seconds
        self.timing = self._observer is not None or seconds > 0

    def buildProtocol(self, addr: object) -> ServerConnection | None:
        if len(self.connections) >= self.limits.max_connections:
            log.warn(
                "refusing connection from {addr}: {n} connections open",
                addr=addr,
                n=len(self.connections),
            )
            return None
        return ServerConnection(self)

    @property
    def calls_in_flight(self) -> int:
        return self.in_flight

    def startFactory(self) -> None:
        if self.limits.idle_timeout > 0 and self._idle_sweep is None:
            self._idle_sweep = self.clock.callLater(self.limits.idle_timeout / 2, self._sweep_idle)

    def stopFactory(self) -> None:
        if self._idle_sweep is not None and self._idle_sweep.active():
            self._idle_sweep.cancel()
        self._idle_sweep = None

    def _sweep_idle(self) -> None:
        timeout = self.limits.idle_timeout
        cutoff = self.clock.seconds() - timeout
        for connection in list(self.connections):
            if not connection.pending and connection.last_active <= cutoff:
                log.info("closing idle connection from {peer}", peer=connection.peer)
                connection.goaway("idle")
                connection.close()
        self._idle_sweep = self.clock.callLater(timeout / 2, self._sweep_idle)

    def goaway(self, message: str = "provider is shutting down") -> None:
        """Refuse new calls on every connection, present and future."""
        self.draining = True
        for connection in list(self.connections):
            connection.goaway(message)

    def close_connections(self) -> None:
        for connection in list(self.connections):
            connection.close()


@implementer(IServerInterceptor)
class FunctionInterceptor:
    """An interceptor from a plain function ``f(request, context, proceed)``."""

    def __init__(self, function: Callable[[Message, CallContext, Handler], Any]) -> None:
        self.function = function

    def intercept(self, request: Message, context: CallContext, proceed: Handler) -> Any:
        return self.function(request, context, proceed)
