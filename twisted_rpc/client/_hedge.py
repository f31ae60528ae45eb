"""Hedging (backup requests): a call whose method has a ``hedgingPolicy`` is
sent, then sent again to another provider each ``hedgingDelay`` without an
answer, up to ``maxAttempts`` in flight in all; the first OK answer wins and
the others are cancelled (CANCEL on the wire). See docs/resilience.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._calls import NotSentError, ShedError
from twisted_rpc.client._dials import _Clock
from twisted_rpc.client._events import Events
from twisted_rpc.client._service_config import HedgingPolicy
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import CancelledError, DeadlineExceededError, RpcError, StatusCode

if TYPE_CHECKING:
    from twisted_rpc.client._balancer import Balancer
    from twisted_rpc.client._pool import Provider

log = Logger(namespace="twisted_rpc.client")


class _Budget(Protocol):
    """The part of a retry budget hedging uses (_retry.RetryBudget)."""

    def deposit(self) -> None: ...

    def succeeded(self) -> None: ...

    def failed(self) -> None: ...

    def withdraw(self) -> bool: ...


def attempts_error(error: RpcError, attempts: int, why: str = "") -> RpcError:
    """``error`` with the attempts made (and why no more) in its message."""
    made = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    note = f"{made}; {why}" if why else made
    error.message = f"{error.message} ({note})" if error.message else note
    return error


class _Hedged:
    """One hedged call: its attempts in flight, the hedge timer, the outcome."""

    def __init__(
        self,
        clock: _Clock,
        budget: _Budget,
        channels: Callable[[], Sequence[Provider]],
        balancer: Balancer,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        policy: HedgingPolicy,
        events: Events | None = None,
    ) -> None:
        self.events = events if events is not None else Events()
        self.clock = clock
        self.budget = budget
        self.channels = channels
        self.balancer = balancer
        self.method = method
        self.request = request
        self.timeout = timeout
        self.metadata = metadata
        self.policy = policy
        self.deadline = None if not timeout else clock.seconds() + timeout
        self.result: Deferred[Message] = Deferred(self._cancelled)
        self.pending: list[Deferred[Message]] = []
        self.tried: list[Provider] = []
        self.attempts = 0  # attempts written (a call never written is not one)
        self.timer: IDelayedCall | None = None
        self.why = ""  # why no more hedges, for the final error
        self.last_error: RpcError | None = None
        self.done = False  # the outcome is decided: answers now are ignored
        self.first: Deferred[Message] | None = None  # the first attempt written

    # Sending

    def _send(self, channel: Provider) -> None:
        """Send an attempt to ``channel`` with what is left of the deadline."""
        remaining = None
        if self.deadline is not None:
            remaining = self.deadline - self.clock.seconds()
            if remaining <= 0:
                self._no_time()
                return
        self.tried.append(channel)
        self.attempts += 1
        d = channel.call(self.method, self.request, remaining, self.metadata)
        self.pending.append(d)
        if self.first is None:
            self.first = d
        d.addCallbacks(self._answered, self._failed, callbackArgs=(d,), errbackArgs=(d, channel))

    def _hedge(self) -> None:
        """Send one more attempt if the policy, the deadline and the budget
        allow, then arm the timer for the next one."""
        self.timer = None
        if self.done:
            return
        if self.attempts >= self.policy.max_attempts:
            self.why = ""
            return
        if self.deadline is not None and self.clock.seconds() >= self.deadline:
            self.why = "no time left to hedge"
            return
        if not self.budget.withdraw():
            self.why = "retry budget exhausted"
            self.events("retry_refused", self.method.full_name)
            log.debug("not hedging {method}: retry budget exhausted", method=self.method.full_name)
            return
        listed = self.channels()
        channel = self.balancer.pick(listed, self.tried) or self.balancer.pick(listed)
        if channel is None:
            self.why = "no provider left"
            return
        log.debug(
            "hedging {method}: attempt {n} to {channel}",
            method=self.method.full_name,
            n=self.attempts + 1,
            channel=getattr(channel, "address", channel),
        )
        self.events("hedged", self.method.full_name)
        self._send(channel)
        self._arm()

    def _arm(self) -> None:
        """Arm the timer for the next hedge, unless none can be sent in time."""
        if self.done or self.attempts >= self.policy.max_attempts:
            return
        delay = self.policy.hedging_delay
        if self.deadline is not None and self.clock.seconds() + delay >= self.deadline:
            return
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = self.clock.callLater(delay, self._hedge)

    # Outcomes

    def _answered(self, answer: Message, d: Deferred[Message]) -> None:
        self.pending.remove(d)
        if self.done:
            return
        self.budget.succeeded()
        if d is not self.first:
            self.events("hedge_won", self.method.full_name)
        self._stop(count=True)
        self.result.callback(answer)

    def _failed(self, failure: Failure, d: Deferred[Message], channel: Provider) -> None:
        self.pending.remove(d)
        if self.done:
            return None  # a loser cancelled, or after the outcome
        error = failure.value
        if not isinstance(error, RpcError):
            self._finish(failure)
            return None
        if isinstance(error, NotSentError):
            # Never written: not an attempt; another provider not tried yet.
            self.attempts -= 1
            other = self.balancer.pick(self.channels(), self.tried)
            if other is not None and isinstance(error, ShedError) and not self._may_resend():
                other = None  # shed: resent only as the budget allows
            if other is not None:
                self._send(other)
            elif not self.pending:
                self._finish(self.last_error or error)
            return None
        if error.code not in self.policy.non_fatal_status_codes:
            self._finish(error)
            return None
        self.budget.failed()
        self.last_error = error
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self._hedge()  # a non-fatal answer: the next hedge at once
        if not self.pending and not self.done:
            self._finish(error)
        return None

    def _may_resend(self) -> bool:
        """May an attempt a provider shed go elsewhere? As a retry would."""
        if self.budget.withdraw():
            self.events("retried", self.method.full_name, StatusCode.RESOURCE_EXHAUSTED)
            return True
        self.why = "retry budget exhausted"
        self.events("retry_refused", self.method.full_name)
        return False

    def _no_time(self) -> None:
        if not self.pending:
            error = self.last_error or DeadlineExceededError(
                message=f"deadline of {self.timeout:g}s exceeded"
            )
            self._finish(error)

    def _finish(self, outcome: RpcError | Failure) -> None:
        self._stop(count=True)
        if isinstance(outcome, RpcError) and self.attempts > 1:
            attempts_error(outcome, self.attempts, self.why)
        self.result.errback(outcome)

    def _stop(self, count: bool = False) -> None:
        """Decide the outcome: cancel the timer and every attempt in flight
        (``count``: tell the observers of the losers cancelled)."""
        self.done = True
        if count and self.pending:
            self.events("hedges_cancelled", self.method.full_name, len(self.pending))
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        for d in list(self.pending):
            d.cancel()

    def _cancelled(self, result: Deferred[Message]) -> None:
        self._stop()
        result.errback(CancelledError(message="cancelled by the caller"))


def send_hedged(
    clock: _Clock,
    budget: _Budget,
    channels: Callable[[], Sequence[Provider]],
    balancer: Balancer,
    channel: Provider,
    method: MethodInfo,
    request: Message,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
    policy: HedgingPolicy,
    events: Events | None = None,
) -> Deferred[Message]:
    """Send to ``channel``, then hedge per ``policy``: after each
    ``hedging_delay`` without an answer, to a provider not tried yet (else
    any), up to ``max_attempts`` in all, each hedge only if the retry budget
    allows it and before the deadline. The first OK answer wins and the
    others are cancelled; a status in ``non_fatal_status_codes`` lets the
    others go on and sends the next hedge at once; any other status ends the
    call with it. Cancelling the result cancels every attempt."""
    hedged = _Hedged(
        clock, budget, channels, balancer, method, request, timeout, metadata, policy, events
    )
    budget.deposit()
    hedged._send(channel)
    hedged._arm()
    return hedged.result
