"""In-memory provider and client for unit tests (like ``treq.testing``).

The real :class:`~twisted_rpc.Client` and the real provider-side
connections talk over in-memory transports on a ``MemoryReactorClock``: no
sockets, no threads, and time moves only when the test says::

    memory = MemoryProvider([UserService()])
    d = memory.proxy(UserService).Login(LoginRequest(name="zhang san"))
    memory.flush()
    response = memory.result(d)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump

from twisted_rpc.client._client import Client
from twisted_rpc.client._proxy import ServiceProxy
from twisted_rpc.core._interfaces import IClientInterceptor, IServerInterceptor
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
        interceptors: Sequence[IServerInterceptor] = (),
        client_interceptors: Sequence[IClientInterceptor] = (),
        timeout: float | None = None,
        reactor: MemoryReactorClock | None = None,
        limits: ServerLimits | None = None,
        builtins: bool = False,
    ) -> None:
        """``builtins``: also serve Health and Reflection, as a real provider does
        (``self.health`` is their :class:`~twisted_rpc.ops.HealthState`)."""
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self.dispatcher = Dispatcher(services, interceptors)
        self.health = add_builtins(
            self.dispatcher, self.reactor, health=builtins, reflection=builtins
        )
        self.factory = ServerFactory(self.dispatcher, self.reactor, limits=limits)
        self.reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")
        address = f"127.0.0.1:{self.port}"
        self.client = Client(
            self.reactor,
            providers={name: [address] for name in self.dispatcher.services},
            interceptors=client_interceptors,
            timeout=timeout,
        )
        self._completer = ConnectionCompleter(self.reactor)
        self.pumps: list[IOPump] = []

    def proxy(self, service: ServiceDescriptor | str | type[Service], **kw: Any) -> ServiceProxy:
        return self.client.proxy(service, **kw)

    def flush(self) -> None:
        """Complete pending connections and deliver every byte in both directions."""
        while True:
            pump = self._completer.succeedOnce()
            if pump is None:
                break
            self.pumps.append(pump)
        for pump in self.pumps:
            pump.flush()

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
