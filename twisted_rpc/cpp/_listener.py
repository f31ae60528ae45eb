"""A listener speaking the C++ mprpc protocol, serving a :class:`Dispatcher`'s services.

One call per connection: read the request (reassembled across reads), run it
through the same call runner as the native listener (:class:`CallRunner`:
limits, parse, the interceptor chain, errors, the observer), write the bare
response and half-close. The protocol has no status field, so a call that
fails is logged and its connection closed without a reply, as the C++
provider does.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._status import NotFoundError
from twisted_rpc.cpp._wire import CPP_REPLY_LIMIT, CppProtocolError, RequestReader
from twisted_rpc.server._dispatcher import MAX_ERROR_MESSAGE, Dispatcher, ServerMethod, clip
from twisted_rpc.server._listener import ListenerFactory, ServerLimits
from twisted_rpc.server._runner import CallRunner

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


class CppServerProtocol(CallRunner, Protocol):
    """Serves one C++-style call on one connection."""

    call_label = "mprpc call"
    factory: CppServerFactory
    transport: ITCPTransport
    """Set before ``connectionMade``; every method that writes or closes runs after it."""

    def __init__(self, factory: CppServerFactory) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.reader = RequestReader(factory.max_request_size)
        self.peer = "?"
        self.peer_host: str | None = None
        self.routes = factory.routes
        self._timer: IDelayedCall | None = None
        self._done = False
        self.init_calls(factory.clock)

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
        if self.pending:
            log.info(
                "mprpc call {method} from {peer}: caller went away before the reply",
                method=self._method_name(),
                peer=self.peer,
            )
        self.cancel_calls()

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
        if self.reader.extra:
            log.warn(
                "mprpc request from {peer}: ignoring {n} bytes after the request",
                peer=self.peer,
                n=self.reader.extra,
            )
        key = (request.service, request.method)
        self.request_received(0, 0, 0, key, None, "", request.args)

    def _unknown_route(self, call_id: int, route: tuple[str, str], started: float) -> None:
        service, method = route
        known = any(s == service for s, _ in self.routes)
        what = (
            f"unknown method {clip(method)!r} of service {service}"
            if known
            else f"unknown service {clip(service)!r}"
        )
        name = clip(f"{service}/{method}")
        self.fail_call(call_id, NotFoundError(message=what), name, started, unknown=True)

    def goaway(self, message: str) -> None:
        """Refuse the call if it has not arrived yet (closed without a reply)."""
        self.draining = True
        self.goaway_message = message

    def close(self) -> None:
        """Close once what was written is sent."""
        self.transport.loseConnection()

    # -------------------------------------------------------------- the wire

    def _write_response(self, call_id: int, payload: bytes) -> None:
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
        self.transport.write(payload)
        # Half-close as the C++ provider does: the caller reads to EOF, then closes.
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            self.transport.loseConnection()
        self._timer = self.clock.callLater(self.factory.read_timeout, self._close_timed_out)

    def _write_status(self, call_id: int, code: int, message: str) -> None:
        """The protocol has no status: close without a reply (the runner logged why)."""
        self._close_without_reply()

    def _write_end(
        self,
        call_id: int,
        code: int,
        message: str,
        trailers: Mapping[str, str] | None,
        payload: bytes = b"",
    ) -> None:
        """No trailers either (a shed or late call's not-run marking): as a status."""
        self._write_status(call_id, code, message)

    def _close_without_reply(self) -> None:
        self._done = True
        self._cancel_timer()
        self.transport.loseConnection()

    # -------------------------------------------------------------- endings

    def _fail(self, why: str) -> None:
        """Log why and close without a reply: no call to end (bad bytes, too slow)."""
        log.info(
            "mprpc request from {peer} failed: {why}; closing without a reply",
            peer=self.peer,
            why=clip(why, MAX_ERROR_MESSAGE),
        )
        self._close_without_reply()

    def _method_name(self) -> str:
        request = self.reader.request
        method = None if request is None else self.routes.get((request.service, request.method))
        return method.info.full_name if method is not None else "?"

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


class CppServerFactory(ListenerFactory[CppServerProtocol]):
    """Connections speaking the C++ mprpc protocol to ``dispatcher``'s services."""

    protocol = CppServerProtocol
    name = "C++ mprpc"

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: IReactorTime,
        max_request_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        limits: ServerLimits | None = None,
        read_timeout: float = 10.0,
    ) -> None:
        super().__init__(dispatcher, clock, limits)
        self.max_request_size = max_request_size
        self.read_timeout = read_timeout
        self.routes = short_routes(dispatcher)
