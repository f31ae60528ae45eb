"""Calls a GOAWAY took back (never run by the provider) while they wait to be
sent again: parked on a channel until its connection is ready, or failed with
the error that ended the wait. Their deadline and cancelling still apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from twisted_rpc.client._calls import NotSentError, TakenBack, _Call
from twisted_rpc.client._connection import ClientConnection
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._status import CancelledError, DeadlineExceededError, RpcError

if TYPE_CHECKING:
    from twisted_rpc.client._channel import Channel


class _Parked:
    """A call a GOAWAY took back, waiting for its channel's connection; its
    deadline and cancelling still apply."""

    __slots__ = ("channel", "call", "fallback", "waiter", "timer")

    def __init__(
        self,
        channel: Channel,
        call: TakenBack,
        fallback: Callable[[TakenBack, RpcError], object],
    ) -> None:
        self.channel = channel
        self.call = call
        self.fallback = fallback
        call[0].holder = self
        self.waiter: Deferred[ClientConnection] = Deferred()
        channel._waiters.append(self.waiter)
        self.waiter.addCallbacks(self._connected, self._not_sent)
        deadline = call[4]
        self.timer: IDelayedCall | None = None
        if deadline:
            wait = max(0.0, deadline - channel.clock.seconds())
            self.timer = channel.clock.callLater(wait, self._expired)

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _connected(self, protocol: ClientConnection) -> None:
        self._stop_timer()
        self.call[0].holder = None
        error = protocol.resume(self.call)
        if error is not None:
            self.fallback(self.call, error)

    def _not_sent(self, failure: Failure) -> None:
        self._stop_timer()
        self.call[0].holder = None
        error = failure.value
        if not isinstance(error, RpcError):
            error = NotSentError(message=f"provider {self.channel.address}: {error}")
        self.fallback(self.call, error)

    def _cancel(self, d: _Call) -> None:
        self._end(CancelledError(message="cancelled by the caller"))

    def _expired(self) -> None:
        self.timer = None
        self._end(DeadlineExceededError(message="deadline exceeded"))

    def _end(self, error: RpcError) -> None:
        self._stop_timer()
        waiters = self.channel._waiters
        if self.waiter in waiters:
            waiters.remove(self.waiter)
        d = self.call[0]
        d.holder = None
        d.errback(error)


def _not_sent(call: TakenBack, error: RpcError) -> None:
    d = call[0]
    d.holder = None
    d.errback(error)


def _resend_on(channel: Channel, reason: GoawayReason, calls: list[TakenBack]) -> None:
    """Send calls a GOAWAY took back again on the same channel (a standalone
    channel's way; a Client sends them to another provider when it can)."""
    for call in calls:
        channel.resume(call, _not_sent)


def _deadline_exceeded(result: object, timeout: float) -> Failure:
    return Failure(DeadlineExceededError(message=f"deadline of {timeout:g}s exceeded"))
