"""In-memory provider and client for unit tests (like ``treq.testing``).

The real :class:`~twisted_rpc.Client` and the real provider-side
connections talk over in-memory transports on a ``MemoryReactorClock``: no
sockets, no threads, and time moves only when the test says::

    memory = MemoryProvider([UserService()])
    d = memory.proxy(UserService).Login(LoginRequest(name="zhang san"))
    memory.flush()
    response = memory.result(d)

Streams and other ``async def`` code run to their end with :meth:`MemoryProvider.run`
(flushing until the coroutine finishes, the clock standing still), and
:meth:`MemoryProvider.settle` delivers until nothing moves (a paused reader's
provider has spent its credit and waits)::

    stream = memory.proxy(WatchService).Watch(WatchRequest())
    first = memory.run(stream.read())
    stream.pauseProducing()
    memory.settle()
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump

from twisted_rpc.client._client import Client
from twisted_rpc.client._options import ClientOptions
from twisted_rpc.client._proxy import ServiceProxy
from twisted_rpc.core._interfaces import (
    IClientInterceptor,
    IClientStreamInterceptor,
    IServerInterceptor,
    IServerStreamInterceptor,
)
from twisted_rpc.core._service import Service
from twisted_rpc.ops._health import add_builtins
from twisted_rpc.server._dispatcher import Dispatcher
from twisted_rpc.server._factory import ServerFactory, ServerLimits

__all__ = ["MemoryProvider"]


class MemoryProvider:
    """Serves ``services`` in memory and gives a client wired to them."""

    port = 4321

    def __init__(
        self,
        services: Sequence[Service],
        *,
        interceptors: Sequence[IServerInterceptor | IServerStreamInterceptor] = (),
        client_interceptors: Sequence[IClientInterceptor | IClientStreamInterceptor] = (),
        timeout: float | None = None,
        reactor: MemoryReactorClock | None = None,
        limits: ServerLimits | None = None,
        builtins: bool = False,
        client_options: ClientOptions | None = None,
        tracing: bool = False,
    ) -> None:
        """``builtins``: also serve Health and Reflection, as a real provider does
        (``self.health`` is their :class:`~twisted_rpc.ops.HealthState`).
        ``client_options``: the client's settings (``stream_window``...);
        ``timeout``, if given, overrides its timeout. ``tracing``: OpenTelemetry
        spans on both sides, as ``tracing = opentelemetry`` gives (docs/tracing.md)."""
        if tracing:
            from twisted_rpc.core._tracing import ServerTracing

            interceptors = [ServerTracing(), *interceptors]
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self.dispatcher = Dispatcher(services, interceptors)  # type: ignore[arg-type]
        self.health = add_builtins(
            self.dispatcher, self.reactor, health=builtins, reflection=builtins
        )
        self.factory = ServerFactory(self.dispatcher, self.reactor, limits=limits)
        self.reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")
        address = f"127.0.0.1:{self.port}"
        options = client_options if client_options is not None else ClientOptions()
        if timeout is not None:
            options = options.replace(timeout=timeout)
        if tracing:
            options = options.replace(tracing=True)
        self.client = Client(
            self.reactor,
            options,
            providers={name: [address] for name in self.dispatcher.services},
            interceptors=client_interceptors,  # type: ignore[arg-type]
        )
        self._completer = ConnectionCompleter(self.reactor)
        self.pumps: list[IOPump] = []

    def proxy(self, service: ServiceDescriptor | str | type[Service], **kw: Any) -> ServiceProxy:
        return self.client.proxy(service, **kw)

    def flush(self) -> bool:
        """Complete pending connections and deliver every byte in both
        directions; whether anything moved (a connection made, bytes, a close)."""
        moved = self._connect()
        for pump in self.pumps:
            if pump.flush():
                moved = True
        return moved

    def _connect(self) -> bool:
        """Complete pending connections; whether there were any."""
        moved = False
        while True:
            pump = self._completer.succeedOnce(greet=False)
            if pump is None:
                return moved
            moved = True
            self.pumps.append(pump)

    def _step(self) -> bool:
        """One round: what is due now runs, pending connections complete and
        each connection's bytes go across once each way."""
        self.reactor.advance(0)
        moved = self._connect()
        for pump in self.pumps:
            if pump.pump():
                moved = True
        return moved

    def settle(self, rounds: int = 10_000) -> int:
        """Round after round, run what is due now (``callLater(0)``: a
        stream's turn), complete connections and carry each connection's
        bytes across once each way, until a round moves nothing: every
        stream waits (for credit, the clock or the test). The clock does not
        move. Returns the rounds that moved something; AssertionError if
        still moving after ``rounds`` (a reader that never waits)."""
        for n in range(rounds):
            if not self._step():
                return n
        raise AssertionError(f"still moving after {rounds} rounds")

    def run(self, work: Coroutine[Any, Any, Any] | Deferred[Any], rounds: int = 10_000) -> Any:
        """Run ``work`` (a coroutine, e.g. an ``async def`` test body, or a
        Deferred) to its end without moving the clock: as :meth:`settle`,
        stopping as soon as it has a result. Returns the result or raises
        its failure; AssertionError if it still waits once nothing moves
        (for the clock: :meth:`advance` first) or after ``rounds``."""
        d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        for _ in range(rounds):
            if d.called or not self._step():
                break
        return self.result(d)

    def break_connections(self) -> None:
        """Lose every connection as a network failure would (both ends see
        ``ConnectionLost``), then deliver what that caused."""
        for pump in self.pumps:
            for transport in (pump.clientIO, pump.serverIO):
                transport.disconnectReason = ConnectionLost("connection broken by the test")
            pump.serverIO.loseConnection()
        self.flush()
        self.pumps = [p for p in self.pumps if not p.serverIO.disconnected]

    def advance(self, seconds: float) -> None:
        """Move the clock on, then deliver what that caused."""
        self.reactor.advance(seconds)
        self.flush()

    @staticmethod
    def result(d: Deferred[Any]) -> Any:
        """The result ``d`` already has; a failure is raised (and consumed)."""
        outcome: list[Any] = []

        def grab(result: Any) -> Any:
            outcome.append(result)
            return None if isinstance(result, Failure) else result

        d.addBoth(grab)
        if not outcome:
            raise AssertionError(f"{d!r} has no result yet")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]
