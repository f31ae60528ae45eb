"""One decoded frame of the native wire (see :mod:`twisted_rpc.core._codec`)."""

from __future__ import annotations

__all__ = ["Frame"]


class Frame:
    """One decoded frame. ``route`` stays bytes: it is a dispatch key."""

    __slots__ = (
        "kind",
        "flags",
        "status",
        "call_id",
        "timeout_ms",
        "route",
        "metadata",
        "message",
        "payload",
    )

    def __init__(
        self,
        kind: int,
        flags: int,
        status: int,
        call_id: int,
        timeout_ms: int,
        route: bytes,
        metadata: dict[str, str] | None,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        self.kind = kind
        self.flags = flags
        self.status = status
        self.call_id = call_id
        self.timeout_ms = timeout_ms
        self.route = route
        self.metadata = metadata
        self.message = message
        self.payload = payload

    def __repr__(self) -> str:
        return (
            f"Frame(kind={self.kind}, flags={self.flags}, status={self.status}, "
            f"call_id={self.call_id}, timeout_ms={self.timeout_ms}, route={self.route!r}, "
            f"metadata={self.metadata!r}, message={self.message!r}, payload={self.payload!r})"
        )
