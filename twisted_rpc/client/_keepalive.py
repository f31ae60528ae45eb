"""Keepalive PINGs of a consumer connection (gRPC's keepalive): while calls
or streams are in flight on it, a PING every ``keepalive_interval``; one
unanswered within ``keepalive_timeout`` means the provider is gone (cut off,
frozen) and the connection is aborted, failing its calls UNAVAILABLE. An idle
connection is not pinged unless ``keepalive_without_calls``, so that a
provider's ``idle_timeout`` can close it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._options import ClientOptions
from twisted_rpc.client._states import ConnectionState

if TYPE_CHECKING:
    from twisted_rpc.client._calls import TakenBack


class Keepalive:
    """The keepalive half of :class:`twisted_rpc.client.ClientConnection`."""

    clock: IReactorTime
    options: ClientOptions
    keepalive_interval: float
    keepalive_timeout: float
    _keepalive: IDelayedCall | None
    connected: int
    outstanding: dict[int, TakenBack]
    streams: dict[int, Any]
    state: ConnectionState
    log: Logger
    peer: str
    transport: Any

    if TYPE_CHECKING:  # RpcConnection's, before this class in the MRO

        def ping(self, payload: bytes = b"") -> Deferred[float]: ...

    def _send_keepalive(self) -> None:
        """PING; a peer that does not answer within keepalive_timeout is dead."""
        self._keepalive = None
        if not self.connected:
            return
        if not (self.outstanding or self.streams or self.options.keepalive_without_calls):
            # Idle: no PING (gRPC's default), so that the provider's
            # idle_timeout can close the connection; looked at again later.
            self._keepalive = self.clock.callLater(self.keepalive_interval, self._send_keepalive)
            return
        d = self.ping()
        d.addTimeout(self.keepalive_timeout, self.clock)
        d.addCallbacks(self._keepalive_answered, self._keepalive_missed)

    def _keepalive_answered(self, rtt: float) -> None:
        if self.connected:
            self._keepalive = self.clock.callLater(self.keepalive_interval, self._send_keepalive)

    def _keepalive_missed(self, failure: Failure) -> None:
        if self.connected:
            self.state = ConnectionState.UNRESPONSIVE
            self.log.warn(
                "no answer to a keepalive ping from {peer} in {t:g}s: closing the connection",
                peer=self.peer,
                t=self.keepalive_timeout,
            )
            self.transport.abortConnection()

    @property
    def keepalive_failed(self) -> bool:
        """Whether the connection was aborted for an unanswered keepalive PING."""
        return self.state is ConnectionState.UNRESPONSIVE
