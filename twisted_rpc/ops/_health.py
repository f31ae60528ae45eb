"""The Health service every provider serves unless told not to.

``mprpc.health.v1.Health``: ``Check(service)`` answers SERVING, NOT_SERVING or
SERVICE_UNKNOWN (``""`` asks about the provider as a whole); ``Watch`` is a
long poll that answers as soon as the status differs from ``last_status``,
or when ``max_wait`` (at most :data:`MAX_WATCH_WAIT` seconds) or the call's
deadline is nearly up; ``WatchStream`` is a server stream, as gRPC's
``Health.Watch``: the current status at once, then each change (a consumer
that reads slowly holds at most its window of changes; past that it gets
the status of the moment its window reopens). :func:`add_builtins` adds
Health and Reflection to a dispatcher, with gRPC's standard services
(``grpc.health.v1.Health``, ``grpc.reflection.v1alpha`` and ``v1``) over the
same health state and descriptors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_rpc.core._service import Service
from twisted_rpc.ops._grpc_health import GrpcHealthService
from twisted_rpc.ops._grpc_reflection import ServerReflectionV1, ServerReflectionV1Alpha
from twisted_rpc.ops._protos import HEALTH, HealthCheckResponse, ServingStatus
from twisted_rpc.ops._reflection import ReflectionService
from twisted_rpc.server._context import CallContext

__all__ = [
    "MAX_WATCH_WAIT",
    "NOT_SERVING",
    "SERVICE_UNKNOWN",
    "SERVING",
    "HealthService",
    "HealthState",
    "add_builtins",
    "status_name",
]

SERVING = ServingStatus.values_by_name["SERVING"].number


NOT_SERVING = ServingStatus.values_by_name["NOT_SERVING"].number


SERVICE_UNKNOWN = ServingStatus.values_by_name["SERVICE_UNKNOWN"].number


DEFAULT_WATCH_WAIT = 30.0


MAX_WATCH_WAIT = 60.0
"""A longer ``max_wait`` is cut to this: a watch holds a call slot while it waits."""


def status_name(status: int) -> str:
    return ServingStatus.values_by_number[status].name


class HealthState:
    """The serving status of a provider (``""``) and of each of its services."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {"": SERVING}
        # Keyed by id(Deferred): a watcher that gives up is forgotten in O(1).
        self._watchers: dict[int, tuple[str, int, Deferred[int]]] = {}

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

    def changed(self, service: str, last: int) -> Deferred[int]:
        """Fires with the new status once ``service``'s status is not ``last``."""
        current = self.check(service)
        if current != last:
            done: Deferred[int] = Deferred()
            done.callback(current)
            return done
        d: Deferred[int] = Deferred(self._forget)
        self._watchers[id(d)] = (service, last, d)
        return d

    @property
    def watching(self) -> int:
        """How many watches wait for a change."""
        return len(self._watchers)

    def _forget(self, d: Deferred[int]) -> None:
        self._watchers.pop(id(d), None)

    def _wake(self) -> None:
        waiting, self._watchers = self._watchers, {}
        for key, (service, last, d) in waiting.items():
            if d.called:  # cancelled by an earlier watcher's callback
                continue
            current = self.check(service)
            if current != last:
                d.callback(current)
            else:
                self._watchers[key] = (service, last, d)


class HealthService(Service, descriptor=HEALTH):
    """``mprpc.health.v1.Health`` over a :class:`HealthState`."""

    builtin = True
    long_lived_methods = frozenset({"Watch"})
    """Calls that wait by design: bounded apart from ordinary calls (``server.py``)."""

    def __init__(self, state: HealthState, clock: IReactorTime) -> None:
        self.state = state
        self.clock = clock
        self.watch_streams = 0
        """``WatchStream`` handlers running (their ``finally`` counts them out)."""

    def Check(self, request: Any, context: CallContext) -> Any:
        return HealthCheckResponse(status=self.state.check(request.service))

    async def Watch(self, request: Any, context: CallContext) -> Any:
        # NaN and non-positive values mean "the default"; anything longer is capped.
        wait = min(request.max_wait, MAX_WATCH_WAIT) if request.max_wait > 0 else DEFAULT_WATCH_WAIT
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

    async def WatchStream(self, request: Any, context: CallContext) -> AsyncIterator[Any]:
        # A stream, bounded by the stream limits (max_streams_per_connection,
        # max_streams), not by the long-lived calls' ones. Between two yields
        # nothing is queued: a change while the consumer's window is closed
        # is seen when the handler resumes, as the status of that moment.
        self.watch_streams += 1
        try:
            status = self.state.check(request.service)
            yield HealthCheckResponse(status=status)
            while True:
                status = await self.state.changed(request.service, status)
                yield HealthCheckResponse(status=status)
        finally:
            self.watch_streams -= 1


def add_builtins(
    dispatcher: Any, clock: IReactorTime, *, health: bool = True, reflection: bool = True
) -> HealthState:
    """Add Health and Reflection (each unless turned off) to ``dispatcher``,
    ours and gRPC's (``grpc.health.v1.Health`` over the same state;
    ``grpc.reflection.v1alpha`` and ``v1`` over the same descriptors);
    every service it serves starts SERVING. Returns the health state."""
    state = HealthState()
    if health:
        dispatcher.add(HealthService(state, clock))
        dispatcher.add(GrpcHealthService(state))
    if reflection:
        dispatcher.add(ReflectionService(dispatcher))
        dispatcher.add(ServerReflectionV1Alpha(dispatcher))
        dispatcher.add(ServerReflectionV1(dispatcher))
    for name in dispatcher.services:
        state.statuses[name] = SERVING
    return state
