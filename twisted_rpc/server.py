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
from twisted_rpc.protocol import CLOSE_TIMEOUT, RefusedConnection, RpcConnection
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
from twisted_rpc.wire import FrameKind, GoawayReason, ProtocolError

__all__ = [
    "CallContext",
    "Dispatcher",
    "ServerConnection",
    "ServerFactory",
    "ServerLimits",
    "ServerMethod",
    "clip",
]

log = Logger()

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
    """A routed method: its info and the handler chain to invoke.

    ``long_lived``: its calls wait by design (a long poll such as
    ``Health.Watch``, streams later) and count against the long-lived
    budget of :class:`ServerLimits`, not the ordinary one.
    """

    __slots__ = ("info", "request_class", "response_class", "invoke", "long_lived")

    def __init__(self, info: MethodInfo, invoke: Handler, long_lived: bool = False) -> None:
        self.info = info
        self.request_class = info.request_class
        self.response_class = info.response_class
        self.invoke = invoke
        self.long_lived = long_lived


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
            elif inspect.iscoroutinefunction(handler):
                handler = _from_coroutine_function(handler)
            for interceptor in reversed(self.interceptors):
                handler = _intercepted(interceptor, handler)
            self.routes[method.route] = ServerMethod(method, handler, method.name in long_lived)

    def not_found(self, route: bytes) -> RpcError:
        """The error for a route no service here answers (quoting at most
        :data:`ECHO_LIMIT` characters of it)."""
        text = route.decode("utf-8", "replace")
        service, _, method = text.rpartition("/")
        if service in self.services:
            return NotFoundError(message=f"unknown method {clip(method)!r} of service {service}")
        return NotFoundError(message=f"unknown service {clip(service or text)!r}")


_Pending = tuple[Deferred, MethodInfo, float, bool]
"""A call in flight: its handler's Deferred, method, start time, long-lived."""


class ServerConnection(RpcConnection):
    """One provider-side connection: many calls in flight, answered in any order."""

    def __init__(self, factory: ServerFactory) -> None:
        limits = factory.limits
        super().__init__(
            factory.clock,
            factory.max_frame_size,
            limits.max_metadata_size,
            limits.max_metadata_entries,
        )
        self.factory = factory
        self.routes = factory.dispatcher.routes
        self.pending: dict[int, _Pending] = {}
        self.long_lived = 0
        """How many of the calls in ``pending`` are long-lived."""
        self.deadlines = DeadlineQueue(
            factory.clock, self.pending, self._deadline_expired, by_record=True
        )
        self.draining = False
        self.goaway_message = ""
        self.last_call_id = 0
        """The highest call id accepted to run here (what a GOAWAY reports)."""
        self.held = 0
        """Bytes of a partial frame counted in the factory's ``partial_bytes``."""
        self._handlers[FrameKind.REQUEST] = self._request_received
        self._handlers[FrameKind.CANCEL] = self._cancel_received

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connection_made(self)
        if self.factory.draining:
            self.goaway("provider is shutting down")

    def connectionLost(self, reason: Failure) -> None:
        self._release_partial()
        super().connectionLost(reason)
        factory = self.factory
        factory.connection_lost(self)
        self.deadlines.stop()
        pending = list(self.pending.values())
        long_lived = self.long_lived
        factory.in_flight -= len(pending) - long_lived
        factory.long_lived_in_flight -= long_lived
        self.long_lived = 0
        self.pending.clear()
        for d, info, started, _ in pending:
            self._finished(info.full_name, StatusCode.CANCELLED, started)
            d.cancel()
        factory.check_idle()

    # ----------------------------------------------------------------- partial frames

    def partial_frame(self, completed: bool) -> None:
        super().partial_frame(completed)
        held = self.decoder.buffered
        factory = self.factory
        factory.partial_bytes += held - self.held
        self.held = held
        if held and factory.partial_bytes > factory.limits.max_buffered_bytes:
            factory.shed_partial_frames()

    def _release_partial(self) -> None:
        """Stop counting this connection's partial frame (it is dropped)."""
        self.factory.partial_bytes -= self.held
        self.held = 0

    def drop(self, why: str) -> None:
        """Close at once for ``why`` (logged), letting go of a partial frame now."""
        self._release_partial()
        self.abort(why)

    def write_buffer_full(self) -> None:
        # Answers are not being read: stop reading requests until they are.
        super().write_buffer_full()
        log.info("{peer} is not reading its answers: pausing its requests", peer=self.peer)
        self.transport.pauseProducing()

    def write_buffer_drained(self) -> None:
        super().write_buffer_drained()
        self.transport.resumeProducing()

    def goaway(self, message: str = "", reason: GoawayReason = GoawayReason.SHUTDOWN) -> None:
        """Tell the peer to send no new calls here; calls in flight still finish.

        The frame carries ``reason`` and the highest call id accepted here:
        the calls above it were not run, and requests that still arrive are
        answered UNAVAILABLE with ``message``.
        """
        if not self.draining:
            self.draining = True
            self.goaway_message = message or "provider is shutting down"
            if self.connected:
                self.send(wire.encode_goaway(self.last_call_id, message, reason))

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
            self._unknown_route(call_id, route, started)
            return
        if call_id in self.pending:
            raise ProtocolError(f"call id {call_id} is already in flight")
        if self.draining:
            self._send_error(
                call_id,
                UnavailableError(message=self.goaway_message),
                method.info.full_name,
                started,
            )
            return
        limits = self.factory.limits
        if method.long_lived:
            refusal = self._long_lived_refusal(method)
            if refusal is not None:
                self._send_error(call_id, refusal, method.info.full_name, started)
                return
        elif len(self.pending) - self.long_lived >= limits.max_calls_per_connection:
            self._send_error(
                call_id,
                ResourceExhaustedError(
                    message=f"{limits.max_calls_per_connection} calls in flight on this connection"
                ),
                method.info.full_name,
                started,
            )
            return
        elif self.factory.in_flight >= limits.max_calls:
            self._send_error(
                call_id,
                ResourceExhaustedError(
                    message=f"{limits.max_calls} calls in flight at this provider"
                ),
                method.info.full_name,
                started,
            )
            return
        if call_id > self.last_call_id:
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
            long_lived = method.long_lived
            self.pending[call_id] = (result, method.info, started, long_lived)
            if long_lived:
                self.long_lived += 1
                self.factory.long_lived_in_flight += 1
            else:
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

    def _unknown_route(self, call_id: int, route: bytes, started: float) -> None:
        not_found = self.factory.dispatcher.not_found(route)
        text = clip(route.decode("utf-8", "replace"))
        self._send_error(call_id, not_found, text, started, unknown=True)

    def _long_lived_refusal(self, method: ServerMethod) -> RpcError | None:
        """Why a long-lived call cannot start now (None: it can)."""
        limits = self.factory.limits
        if self.long_lived >= limits.max_long_lived_calls_per_connection:
            return ResourceExhaustedError(
                message=f"{limits.max_long_lived_calls_per_connection} long-lived calls "
                f"({method.info.full_name} and the like) in flight on this connection"
            )
        if self.factory.long_lived_in_flight >= limits.max_long_lived_calls:
            return ResourceExhaustedError(
                message=f"{limits.max_long_lived_calls} long-lived calls "
                f"({method.info.full_name} and the like) in flight at this provider"
            )
        return None

    def _ext_rejected(self, kind: int, call_id: int, status: int, route: bytes, why: str) -> None:
        """A REQUEST whose metadata is over the limits is answered
        RESOURCE_EXHAUSTED without being run; the connection lives on."""
        if kind != FrameKind.REQUEST:
            super()._ext_rejected(kind, call_id, status, route, why)
            return
        if call_id in self.pending:
            raise ProtocolError(f"call id {call_id} is already in flight")
        started = self.clock.seconds()
        method = self.routes.get(route)
        if method is None:
            self._unknown_route(call_id, route, started)
            return
        limit = "max_metadata_entries" if "entries" in why else "max_metadata_size"
        error = ResourceExhaustedError(message=f"request not read: {why} ({limit})")
        self._send_error(call_id, error, method.info.full_name, started)

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
        """Answer ``call_id`` with ``error``, and log the failed call.

        ``method`` and the message are the provider's own text or already
        clipped; the message is cut to :data:`MAX_ERROR_MESSAGE` anyway.
        """
        duration = self.clock.seconds() - started
        message = clip(error.message, MAX_ERROR_MESSAGE)
        log.info(
            "call {call_id} {method} from {peer} failed: {code} {message} ({duration_ms:.1f} ms)",
            call_id=call_id,
            method=method,
            service=method.rpartition("/")[0],
            peer=self.peer,
            code=code_name(error.code),
            message=message,
            duration_ms=duration * 1000,
        )
        self.send(wire.encode_status(call_id, int(error.code), message))
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

    def _take(self, call_id: int) -> _Pending | None:
        """Remove a call from the calls in flight (None if it is not there)."""
        entry = self.pending.pop(call_id, None)
        if entry is not None:
            factory = self.factory
            if entry[3]:
                self.long_lived -= 1
                factory.long_lived_in_flight -= 1
            else:
                factory.in_flight -= 1
            if factory.idle_waiters:
                factory.check_idle()
        return entry

    def _cancel_received(self, call_id: int, *_: object) -> None:
        entry = self._take(call_id)
        if entry is not None:
            self._finished(entry[1].full_name, StatusCode.CANCELLED, entry[2])
            entry[0].cancel()

    def _deadline_expired(self, call_id: int) -> None:
        entry = self._take(call_id)
        if entry is not None:
            d, info, started, _ = entry
            error = RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded at the provider")
            self._send_error(call_id, error, info.full_name, started)
            d.cancel()


@dataclass(frozen=True)
class ServerLimits:
    """What one provider accepts at most (see docs/config.md, ``[provider]``)."""

    max_calls_per_connection: int = 1000
    """Calls in flight (answered through a Deferred) on one connection."""
    max_calls: int = 10000
    """Calls in flight on all connections together."""
    max_connections: int = 1000
    idle_timeout: float = 0.0
    """Close a connection with no call in flight and no frame for this long (0: never)."""
    max_long_lived_calls_per_connection: int = 100
    """Long-lived calls (``Service.long_lived_methods``) in flight on one
    connection; they do not count against ``max_calls_per_connection``."""
    max_long_lived_calls: int = 5000
    """Long-lived calls in flight on all connections; not counted in ``max_calls``."""
    max_metadata_size: int = wire.DEFAULT_MAX_EXT_SIZE
    """Bytes of a request's extension (its metadata) read at most; a larger
    request is answered RESOURCE_EXHAUSTED unread."""
    max_metadata_entries: int = wire.DEFAULT_MAX_EXT_ENTRIES
    """Metadata pairs in one request at most; more: RESOURCE_EXHAUSTED, unread."""
    frame_timeout: float = 30.0
    """Seconds a frame, once started, has to arrive whole; then the connection
    is closed (0: no limit)."""
    max_connections_per_peer: int = 256
    """Connections open at once from one peer address (host)."""
    max_buffered_bytes: int = 256 * 1024 * 1024
    """Bytes of partial frames held across all connections; past it, the
    connections holding the largest partial frames are closed."""

    def __post_init__(self) -> None:
        for name in (
            "max_calls_per_connection",
            "max_calls",
            "max_connections",
            "max_long_lived_calls_per_connection",
            "max_long_lived_calls",
            "max_metadata_size",
            "max_metadata_entries",
            "max_connections_per_peer",
            "max_buffered_bytes",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive int, not {value!r}")
        for name in ("idle_timeout", "frame_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"ServerLimits.{name} must be seconds >= 0, not {value!r}")


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
        self.per_peer: dict[str, int] = {}
        """Connections open by peer host."""
        self.draining = False
        self.in_flight = 0
        """Ordinary calls in flight (see ``calls_in_flight`` for all)."""
        self.long_lived_in_flight = 0
        self.partial_bytes = 0
        """Bytes of partial frames held by all connections."""
        self.idle_waiters: list[Deferred] = []
        self.closed_waiters: list[Deferred] = []
        self._sweeper: Any = None
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

    def buildProtocol(self, addr: object) -> ServerConnection | RefusedConnection:
        limits = self.limits
        if len(self.connections) >= limits.max_connections:
            log.warn(
                "refusing connection from {addr}: {n} connections open",
                addr=addr,
                n=len(self.connections),
            )
            return RefusedConnection()
        host = getattr(addr, "host", None)
        if host is not None and self.per_peer.get(host, 0) >= limits.max_connections_per_peer:
            log.warn(
                "refusing connection from {addr}: {n} connections open from {host} "
                "(max_connections_per_peer)",
                addr=addr,
                n=self.per_peer[host],
                host=host,
            )
            return RefusedConnection()
        return ServerConnection(self)

    def connection_made(self, connection: ServerConnection) -> None:
        self.connections.add(connection)
        host = connection.peer_host
        if host is not None:
            self.per_peer[host] = self.per_peer.get(host, 0) + 1

    def connection_lost(self, connection: ServerConnection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        if not self.connections and self.closed_waiters:
            waiters, self.closed_waiters = self.closed_waiters, []
            fire_waiters(waiters)
        host = connection.peer_host
        if host is not None:
            left = self.per_peer.get(host, 1) - 1
            if left > 0:
                self.per_peer[host] = left
            else:
                self.per_peer.pop(host, None)

    @property
    def calls_in_flight(self) -> int:
        """Calls in flight, long-lived ones included."""
        return self.in_flight + self.long_lived_in_flight

    def when_idle(self) -> Deferred[None]:
        """Fires once no call is in flight (at once if none is)."""
        if not self.calls_in_flight:
            return defer.succeed(None)
        d: Deferred[None] = Deferred(self._forget_waiter)
        self.idle_waiters.append(d)
        return d

    def _forget_waiter(self, d: Deferred[None]) -> None:
        if d in self.idle_waiters:
            self.idle_waiters.remove(d)

    def check_idle(self) -> None:
        """Tell the waiters of :meth:`when_idle` if no call is in flight now
        (on the next turn: the last call's answer is sent first)."""
        if self.idle_waiters and not self.calls_in_flight:
            waiters, self.idle_waiters = self.idle_waiters, []
            self.clock.callLater(0, fire_waiters, waiters)

    def shed_partial_frames(self) -> None:
        """Over ``max_buffered_bytes`` of partial frames: close the connections
        holding the largest ones until the total is back under it."""
        limit = self.limits.max_buffered_bytes
        holders = sorted((c for c in self.connections if c.held), key=lambda c: -c.held)
        for connection in holders:
            if self.partial_bytes <= limit:
                break
            connection.drop(
                f"its partial frame of {connection.held} bytes is the largest while "
                f"partial frames hold {self.partial_bytes} bytes (max_buffered_bytes "
                f"{limit})"
            )

    def startFactory(self) -> None:
        if self._sweeper is None and self._sweep_interval():
            self._sweeper = self.clock.callLater(self._sweep_interval(), self._sweep)

    def stopFactory(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None

    def _sweep_interval(self) -> float:
        """How often connections are checked for idleness and stalled frames
        (0: never): half the idle timeout, a third of the frame timeout."""
        limits = self.limits
        intervals = []
        if limits.idle_timeout > 0:
            intervals.append(limits.idle_timeout / 2)
        if limits.frame_timeout > 0:
            intervals.append(limits.frame_timeout / 3)
        return min(intervals, default=0.0)

    def _sweep(self) -> None:
        limits = self.limits
        now = self.clock.seconds()
        for connection in list(self.connections):
            if connection.closing:
                continue  # closed as idle already, or after an error: aborted in time
            started = connection.partial_since
            if started is not None and limits.frame_timeout:
                if now - started >= limits.frame_timeout:
                    connection.drop(
                        f"a frame started {now - started:.0f}s ago is still not whole "
                        f"({connection.decoder.buffered} bytes in; frame_timeout "
                        f"{limits.frame_timeout:g}s)"
                    )
                continue
            # Without a frame timeout, a partial frame is no activity either.
            if (
                limits.idle_timeout
                and not connection.pending
                and connection.last_active <= now - limits.idle_timeout
            ):
                log.info("closing idle connection from {peer}", peer=connection.peer)
                connection.goaway("connection closed as idle", GoawayReason.IDLE)
                connection.close_within(CLOSE_TIMEOUT, "GOAWAY (idle) unread")
        self._sweeper = self.clock.callLater(self._sweep_interval(), self._sweep)

    def goaway(self, message: str = "provider is shutting down") -> None:
        """Refuse new calls on every connection, present and future (GOAWAY
        SHUTDOWN on each)."""
        self.draining = True
        for connection in list(self.connections):
            connection.goaway(message, GoawayReason.SHUTDOWN)

    def close_connections(self) -> Deferred[None]:
        """Close every connection once what was written to it is sent; the
        Deferred fires when all are closed (cancel it to stop waiting)."""
        for connection in list(self.connections):
            connection.close()
        return when_empty(self.connections, self.closed_waiters)

    def abort_connections(self) -> None:
        for connection in list(self.connections):
            connection.transport.abortConnection()


def fire_waiters(waiters: list[Deferred]) -> None:
    """Fire each Deferred of ``waiters`` not fired (or cancelled) yet with None."""
    for d in waiters:
        if not d.called:
            d.callback(None)


def when_empty(connections: set[Any], waiters: list[Deferred]) -> Deferred[None]:
    """A Deferred firing once ``connections`` is empty (kept in ``waiters``)."""
    if not connections:
        return defer.succeed(None)
    d: Deferred[None] = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
    waiters.append(d)
    return d


@implementer(IServerInterceptor)
class FunctionInterceptor:
    """An interceptor from a plain function ``f(request, context, proceed)``."""

    def __init__(self, function: Callable[[Message, CallContext, Handler], Any]) -> None:
        self.function = function

    def intercept(self, request: Message, context: CallContext, proceed: Handler) -> Any:
        return self.function(request, context, proceed)
