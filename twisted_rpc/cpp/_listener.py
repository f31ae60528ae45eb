"""A listener speaking the C++ mprpc protocol, serving a :class:`Dispatcher`'s services.

One call per connection: read the request (reassembled across reads), invoke
the same handler chain the native protocol uses, write the bare response and
half-close. The protocol has no status field, so every error is logged and
the connection closed without a reply, as the C++ provider does.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._connection import RefusedConnection
from twisted_rpc.core._interfaces import ICallObserver
from twisted_rpc.core._status import RpcError, StatusCode, code_name
from twisted_rpc.cpp._wire import CPP_REPLY_LIMIT, CppProtocolError, RequestReader
from twisted_rpc.server._context import CallContext
from twisted_rpc.server._dispatcher import MAX_ERROR_MESSAGE, Dispatcher, ServerMethod, clip
from twisted_rpc.server._factory import ServerLimits, fire_waiters, when_empty

__all__ = ["CppServerFactory", "CppServerProtocol", "short_routes"]

log = Logger(namespace="twisted_rpc.cpp")


def short_routes(dispatcher: Dispatcher) -> dict[tuple[str, str], ServerMethod]:
    """``(ShortServiceName, Method)`` → method, as C++ callers name them."""
    routes: dict[tuple[str, str], ServerMethod] = {}
    for method in dispatcher.routes.values():
        key = (method.info.service.rpartition(".")[2], method.info.name)
        if key in routes:
            log.warn(
                "mprpc listener: {a} and {b} share the short name {key}; serving the first",
                a=routes[key].info.full_name,
                b=method.info.full_name,
                key=".".join(key),
            )
            continue
        routes[key] = method
    return routes


class CppServerProtocol(Protocol):
    """Serves one C++-style call on one connection."""

    def __init__(self, factory: CppServerFactory) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.reader = RequestReader(factory.max_request_size)
        self.peer = "?"
        self.peer_host: str | None = None
        self.call: Deferred | None = None
        self.method: ServerMethod | None = None
        self._timer: IDelayedCall | None = None
        self._done = False
        self.started: float | None = None

    # -------------------------------------------------------------- connection

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '?')}"
        self.peer_host = getattr(peer, "host", None)
        self.factory.connection_made(self)
        self._timer = self.clock.callLater(self.factory.read_timeout, self._read_timed_out)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connection_lost(self)
        self._cancel_timer()
        self._done = True
        if self.call is not None:
            call = self.call
            self._end_call()
            log.info(
                "mprpc call {method} from {peer}: caller went away before the reply",
                method=self.method.info.full_name if self.method else "?",
                peer=self.peer,
            )
            call.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        try:
            request = self.reader.feed(data)
        except CppProtocolError as e:
            self._fail(f"bad request: {e}")
            return
        if request is None:
            return
        self._cancel_timer()
        self.started = self.clock.seconds()
        if self.reader.extra:
            log.warn(
                "mprpc request from {peer}: ignoring {n} bytes after the request",
                peer=self.peer,
                n=self.reader.extra,
            )
        method = self.factory.routes.get((request.service, request.method))
        if method is None:
            known = any(s == request.service for s, _ in self.factory.routes)
            what = (
                f"unknown method {clip(request.method)!r} of service {request.service}"
                if known
                else f"unknown service {clip(request.service)!r}"
            )
            self._fail(what, StatusCode.NOT_FOUND)
            return
        self.method = method
        self._invoke(method, request.args)

    # -------------------------------------------------------------- the call

    def _invoke(self, method: ServerMethod, args: bytes) -> None:
        if self.factory.draining:
            self._fail("provider is shutting down", StatusCode.UNAVAILABLE)
            return
        factory = self.factory
        if method.long_lived:
            if factory.long_lived_in_flight >= factory.limits.max_long_lived_calls:
                self._fail(
                    f"{factory.limits.max_long_lived_calls} long-lived calls in flight at "
                    "this listener",
                    StatusCode.RESOURCE_EXHAUSTED,
                )
                return
        elif factory.in_flight >= factory.limits.max_calls:
            self._fail(
                f"{factory.limits.max_calls} calls in flight at this provider",
                StatusCode.RESOURCE_EXHAUSTED,
            )
            return
        request = method.request_class()
        try:
            request.ParseFromString(args)
        except Exception as e:
            self._fail(
                f"cannot parse {method.request_class.DESCRIPTOR.full_name}: {e}",
                StatusCode.INVALID_ARGUMENT,
            )
            return
        context = CallContext(0, method.info, None, None, self)  # type: ignore[arg-type]
        try:
            result = method.invoke(request, context)
        except Exception as e:
            self._failed_call(Failure(e))
            return
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if not isinstance(result, Deferred):
            self._reply(result)
            return
        self.call = result
        self.factory.call_started(method)
        result.addCallbacks(self._answered, self._failed_call)

    def _end_call(self) -> None:
        self.call = None
        assert self.method is not None
        self.factory.call_ended(self.method)

    def _answered(self, result: object) -> None:
        if self.call is None:
            return  # the caller went away
        self._end_call()
        self._reply(result)

    def _failed_call(self, failure: Failure) -> None:
        if self.call is not None:
            self._end_call()
        elif self._done:
            return
        error = failure.value
        if isinstance(error, RpcError):
            self._fail(f"handler failed: {code_name(error.code)} {error.message}", error.code)
            return
        log.failure(
            "mprpc call {method} from {peer} failed",
            failure,
            method=self._method_name(),
            peer=self.peer,
        )
        self._fail("handler raised an exception", StatusCode.INTERNAL)

    def _reply(self, result: object) -> None:
        assert self.method is not None
        if type(result) is not self.method.response_class:
            self._fail(
                f"handler returned {type(result).__name__}, expected "
                f"{self.method.response_class.DESCRIPTOR.full_name}",
                StatusCode.INTERNAL,
            )
            return
        payload = result.SerializeToString()  # type: ignore[attr-defined]
        if len(payload) > CPP_REPLY_LIMIT:
            log.warn(
                "mprpc call {method} from {peer}: reply of {size} bytes; a C++ mprpc caller "
                "reads only {limit} and will see it truncated",
                method=self._method_name(),
                peer=self.peer,
                size=len(payload),
                limit=CPP_REPLY_LIMIT,
            )
        self._done = True
        self._observe(StatusCode.OK)
        self.transport.write(payload)
        # Half-close as the C++ provider does: the caller reads to EOF, then closes.
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            self.transport.loseConnection()
        self._timer = self.clock.callLater(self.factory.read_timeout, self._close_timed_out)

    # -------------------------------------------------------------- endings

    def _observe(self, code: int) -> None:
        observer = self.factory.observer
        if observer is not None and self.started is not None:
            method = self.method.info.full_name if self.method is not None else "?/?"
            observer.call_finished(method, int(code), self.clock.seconds() - self.started)

    def _fail(self, why: str, code: int | None = None) -> None:
        """Log why and close without a reply (the protocol has no status)."""
        if code is not None:
            self._observe(code)
        log.info(
            "mprpc call {method} from {peer} failed: {why}; closing without a reply",
            method=self._method_name(),
            peer=self.peer,
            why=clip(why, MAX_ERROR_MESSAGE),
        )
        self._done = True
        self._cancel_timer()
        self.transport.loseConnection()

    def _method_name(self) -> str:
        return self.method.info.full_name if self.method is not None else "?"

    def _read_timed_out(self) -> None:
        self._timer = None
        self._fail(f"no whole request within {self.factory.read_timeout:g} s")

    def _close_timed_out(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class CppServerFactory(Factory):
    """Connections speaking the C++ mprpc protocol to ``dispatcher``'s services."""

    noisy = False

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: IReactorTime,
        max_request_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        limits: ServerLimits | None = None,
        read_timeout: float = 10.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.max_request_size = max_request_size
        self.limits = limits or ServerLimits()
        self.read_timeout = read_timeout
        self.routes = short_routes(dispatcher)
        self.connections: set[CppServerProtocol] = set()
        self.per_peer: dict[str, int] = {}
        """Connections open by peer host."""
        self.in_flight = 0
        """Ordinary calls in flight (see ``calls_in_flight`` for all)."""
        self.long_lived_in_flight = 0
        self.idle_waiters: list[Deferred] = []
        self.closed_waiters: list[Deferred] = []
        self.draining = False
        self.observer: ICallObserver | None = None
        """Told of every call's end, as the native factory's observer is."""

    def buildProtocol(self, addr: Any) -> CppServerProtocol | RefusedConnection:
        if len(self.connections) >= self.limits.max_connections:
            log.warn("mprpc listener: refusing {addr}: too many connections", addr=addr)
            return RefusedConnection()
        host = getattr(addr, "host", None)
        if host is not None and self.per_peer.get(host, 0) >= self.limits.max_connections_per_peer:
            log.warn(
                "mprpc listener: refusing {addr}: {n} connections open from {host} "
                "(max_connections_per_peer)",
                addr=addr,
                n=self.per_peer[host],
                host=host,
            )
            return RefusedConnection()
        return CppServerProtocol(self)

    def connection_made(self, connection: CppServerProtocol) -> None:
        self.connections.add(connection)
        if connection.peer_host is not None:
            host = connection.peer_host
            self.per_peer[host] = self.per_peer.get(host, 0) + 1

    def connection_lost(self, connection: CppServerProtocol) -> None:
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

    def call_started(self, method: ServerMethod) -> None:
        if method.long_lived:
            self.long_lived_in_flight += 1
        else:
            self.in_flight += 1

    def call_ended(self, method: ServerMethod) -> None:
        if method.long_lived:
            self.long_lived_in_flight -= 1
        else:
            self.in_flight -= 1
        if self.idle_waiters and not self.calls_in_flight:
            waiters, self.idle_waiters = self.idle_waiters, []
            self.clock.callLater(0, fire_waiters, waiters)

    def when_idle(self) -> Deferred[None]:
        """Fires once no call is in flight (at once if none is)."""
        if not self.calls_in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred(self._forget_waiter)
        self.idle_waiters.append(d)
        return d

    def _forget_waiter(self, d: Deferred[None]) -> None:
        if d in self.idle_waiters:
            self.idle_waiters.remove(d)

    def goaway(self, message: str = "") -> None:
        """Refuse calls that arrive from now on (the protocol cannot say so)."""
        self.draining = True

    def close_connections(self) -> Deferred[None]:
        """Close every connection once its reply is sent; fires when all are closed."""
        for connection in list(self.connections):
            connection.transport.loseConnection()
        return when_empty(self.connections, self.closed_waiters)

    def abort_connections(self) -> None:
        for connection in list(self.connections):
            connection.transport.abortConnection()
