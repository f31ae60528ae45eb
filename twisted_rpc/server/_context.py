"""What a handler knows of the call it serves: :class:`CallContext`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from twisted_rpc.core._service import MethodInfo

if TYPE_CHECKING:
    from twisted_rpc.server._connection import ServerConnection


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
