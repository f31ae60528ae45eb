"""gRPC's standard health service, ``grpc.health.v1.Health``, answering
from the provider's one :class:`twisted_rpc.ops.HealthState` (the one
``mprpc.health.v1.Health`` answers from), as gRPC's health-checking
protocol specifies:

- ``Check(service)``: the status; ``""`` is the provider as a whole; a
  service the provider does not know is NOT_FOUND.
- ``Watch(service)``: a server stream, the current status at once (an
  unknown service: SERVICE_UNKNOWN, the stream staying open), then each
  change. Nothing is queued between two messages: a reader that reads
  slowly holds at most its window of changes, then gets the status of the
  moment its window reopens.
- ``List()``: every status, RESOURCE_EXHAUSTED past :data:`MAX_LISTED`
  services (gRPC's limit).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from google.protobuf.message_factory import GetMessageClass

from twisted_rpc.core._service import Service
from twisted_rpc.core._status import NotFoundError, ResourceExhaustedError
from twisted_rpc.ops._grpc_protos import GRPC_HEALTH
from twisted_rpc.ops._reflection import _quote
from twisted_rpc.server._context import CallContext

if TYPE_CHECKING:
    from twisted_rpc.ops._health import HealthState

__all__ = ["MAX_LISTED", "GrpcHealthService"]

MAX_LISTED = 100
"""``List`` answers at most this many statuses (gRPC's own servers' limit)."""

_messages = GRPC_HEALTH.file.message_types_by_name
HealthCheckResponse = GetMessageClass(_messages["HealthCheckResponse"])
HealthListResponse: Any = GetMessageClass(_messages["HealthListResponse"])


class GrpcHealthService(Service, descriptor=GRPC_HEALTH):
    """``grpc.health.v1.Health`` over a :class:`twisted_rpc.ops.HealthState`."""

    builtin = True

    def __init__(self, state: HealthState) -> None:
        self.state = state
        self.watch_streams = 0
        """``Watch`` handlers running (their ``finally`` counts them out)."""

    def Check(self, request: Any, context: CallContext) -> Any:
        status = self.state.statuses.get(request.service)
        if status is None:
            raise NotFoundError(message=f"unknown service {_quote(request.service)}")
        return HealthCheckResponse(status=status)

    def List(self, request: Any, context: CallContext) -> Any:
        statuses = self.state.statuses
        if len(statuses) > MAX_LISTED:
            raise ResourceExhaustedError(
                message=f"{len(statuses)} services: List answers at most {MAX_LISTED}"
            )
        reply = HealthListResponse()
        for name, status in sorted(statuses.items()):
            reply.statuses[name].status = status
        return reply

    async def Watch(self, request: Any, context: CallContext) -> AsyncIterator[Any]:
        # A stream, bounded by the stream limits as mprpc's WatchStream is.
        self.watch_streams += 1
        try:
            status = self.state.check(request.service)  # SERVICE_UNKNOWN if unknown
            yield HealthCheckResponse(status=status)
            while True:
                status = await self.state.changed(request.service, status)
                yield HealthCheckResponse(status=status)
        finally:
            self.watch_streams -= 1
