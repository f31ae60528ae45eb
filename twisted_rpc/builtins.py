"""Services every provider serves unless told not to: Health and Reflection.

- ``mprpc.health.v1.Health``: ``Check(service)`` answers SERVING, NOT_SERVING or
  SERVICE_UNKNOWN (``""`` asks about the provider as a whole); ``Watch`` is a
  long poll that answers as soon as the status differs from ``last_status``,
  or when ``max_wait`` (or the call's deadline) is nearly up.
- ``mprpc.reflection.v1.Reflection``: the names of the services served, and
  the serialized ``FileDescriptorProto`` of the file defining a symbol with
  all its dependencies (dependencies first), so a client needs no ``.proto``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_rpc.builtin_protos import (
    HEALTH,
    REFLECTION,
    FileDescriptorsResponse,
    HealthCheckResponse,
    ListServicesResponse,
    ServingStatus,
)
from twisted_rpc.server import CallContext
from twisted_rpc.service import Service
from twisted_rpc.status import NotFoundError

__all__ = [
    "HealthService",
    "HealthState",
    "ReflectionService",
    "add_builtins",
    "files_for_symbol",
]

SERVING = ServingStatus.values_by_name["SERVING"].number
NOT_SERVING = ServingStatus.values_by_name["NOT_SERVING"].number
SERVICE_UNKNOWN = ServingStatus.values_by_name["SERVICE_UNKNOWN"].number

DEFAULT_WATCH_WAIT = 30.0


def status_name(status: int) -> str:
    return ServingStatus.values_by_number[status].name


class HealthState:
    """The serving status of a provider (``""``) and of each of its services."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {"": SERVING}
        self._watchers: list[tuple[str, int, Deferred]] = []

    def check(self, service: str) -> int:
        return self.statuses.get(service, SERVICE_UNKNOWN)

    def set(self, service: str, status: int) -> None:
        """Set one service's status (``""``: the provider's) and wake its watchers."""
        self.statuses[service] = status
        self._wake()

    def set_all(self, status: int) -> None:
        """Set every status at once (NOT_SERVING when the provider starts draining)."""
        for name in self.statuses:
            self.statuses[name] = status
        self._wake()

    def changed(self, service: str, last: int) -> Deferred:
        """Fires with the new status once ``service``'s status is not ``last``."""
        current = self.check(service)
        if current != last:
            d: Deferred = Deferred()
            d.callback(current)
            return d
        d = Deferred(lambda d: self._forget(d))
        self._watchers.append((service, last, d))
        return d

    def _forget(self, d: Deferred) -> None:
        self._watchers = [w for w in self._watchers if w[2] is not d]

    def _wake(self) -> None:
        waiting, self._watchers = self._watchers, []
        for service, last, d in waiting:
            current = self.check(service)
            if current != last:
                d.callback(current)
            else:
                self._watchers.append((service, last, d))


class HealthService(Service, descriptor=HEALTH):
    """``mprpc.health.v1.Health`` over a :class:`HealthState`."""

    builtin = True

    def __init__(self, state: HealthState, clock: IReactorTime) -> None:
        self.state = state
        self.clock = clock

    def Check(self, request: Any, context: CallContext) -> Any:
        return HealthCheckResponse(status=self.state.check(request.service))

    async def Watch(self, request: Any, context: CallContext) -> Any:
        wait = request.max_wait if request.max_wait > 0 else DEFAULT_WATCH_WAIT
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, max(remaining - 0.1, 0.0))  # answer before the caller gives up
        changed = self.state.changed(request.service, request.last_status)
        timer: IDelayedCall | None = None
        if not changed.called:
            timer = self.clock.callLater(wait, changed.cancel)
        try:
            status = await changed
        except CancelledError:  # the wait is over (timer or caller): status unchanged
            status = self.state.check(request.service)
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        return HealthCheckResponse(status=status)


def files_for_symbol(symbol: str, pools: list[Any] = ()) -> list[FileDescriptor]:  # type: ignore[assignment]
    """The file defining ``symbol`` and its dependencies, dependencies first."""
    for pool in [descriptor_pool.Default(), *pools]:
        try:
            file = pool.FindFileContainingSymbol(symbol)
            break
        except KeyError:
            continue
    else:
        raise NotFoundError(message=f"no symbol {symbol!r} here")
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(f: FileDescriptor) -> None:
        if f.name in seen:
            return
        seen.add(f.name)
        for dependency in f.dependencies:
            visit(dependency)
        ordered.append(f)

    visit(file)
    return ordered


class ReflectionService(Service, descriptor=REFLECTION):
    """``mprpc.reflection.v1.Reflection`` for the services of a dispatcher."""

    builtin = True

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    def ListServices(self, request: Any, context: CallContext) -> Any:
        return ListServicesResponse(services=sorted(self.dispatcher.services))

    def FileContainingSymbol(self, request: Any, context: CallContext) -> Any:
        pools = [type(s).descriptor.file.pool for s in self.dispatcher.services.values()]
        files = files_for_symbol(request.symbol, pools)
        return FileDescriptorsResponse(file_descriptor_proto=[f.serialized_pb for f in files])


def add_builtins(
    dispatcher: Any, clock: IReactorTime, *, health: bool = True, reflection: bool = True
) -> HealthState:
    """Add Health and Reflection (each unless turned off) to ``dispatcher``;
    every service it serves starts SERVING. Returns the health state."""
    state = HealthState()
    if health:
        dispatcher.add(HealthService(state, clock))
    if reflection:
        dispatcher.add(ReflectionService(dispatcher))
    for name in dispatcher.services:
        state.statuses[name] = SERVING
    return state
