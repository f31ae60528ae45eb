"""What a handler knows of the call it serves: :class:`CallContext`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted_rpc.core._service import MethodInfo

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from twisted_rpc.server._runner import CallRunner


class CallContext:
    """What a handler knows of the call it serves, beyond the request.

    ``connection`` is the connection the call came on, of whichever listener
    (the native :class:`ServerConnection` or the C++ listener's); ``call_id``
    is 0 and ``metadata`` empty for a C++ caller, whose protocol has neither.
    ``clock`` is the provider's clock (its reactor; the test's clock under
    ``MemoryProvider``): ``deferLater(context.clock, 1.0, ...)``.
    """

    __slots__ = (
        "call_id",
        "method",
        "metadata",
        "deadline",
        "connection",
        "trailing_metadata",
        "_stream",
    )

    def __init__(
        self,
        call_id: int,
        method: MethodInfo,
        metadata: Mapping[str, str] | None,
        deadline: float | None,
        connection: CallRunner | None,
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.metadata: Mapping[str, str] = metadata or {}
        self.deadline = deadline
        self.connection = connection
        self.trailing_metadata: dict[str, str] | None = None
        """Sent with a stream's final status (see :meth:`set_trailing_metadata`)."""
        self._stream: Any = None

    def send_initial_metadata(self, metadata: Mapping[str, str]) -> None:
        """Send ``metadata`` to the consumer now, before the stream's first
        message (streaming calls only; the consumer reads it as the
        stream's ``initial_metadata``)."""
        if self._stream is None or self.connection is None:
            raise RuntimeError("initial metadata is for streaming calls")
        self.connection.send_initial_metadata(self._stream, metadata)

    def set_trailing_metadata(self, metadata: Mapping[str, str]) -> None:
        """Metadata to send with the stream's final status."""
        self.trailing_metadata = dict(metadata)

    @property
    def clock(self) -> IReactorTime:
        """The provider's clock, what handlers wait on (``callLater``,
        ``deferLater``, ``seconds``): the one the connection was given."""
        if self.connection is None:  # a context built by hand: the global reactor
            from twisted.internet import reactor

            return reactor
        return self.connection.clock

    @property
    def peer(self) -> str:
        return self.connection.peer if self.connection is not None else "?"

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None without one."""
        if self.deadline is None or self.connection is None:
            return None
        return max(0.0, self.deadline - self.connection.clock.seconds())
