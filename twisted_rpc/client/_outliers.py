"""Outlier ejection (failure accrual) and peak-EWMA latency, per provider.

:class:`FailureAccrual` watches one channel's unary calls: after
``consecutive_failures`` of them in a row fail with UNAVAILABLE, INTERNAL or
DEADLINE_EXCEEDED, the provider is ejected (out of rotation) for
``base_ejection_time``, doubled at each ejection in a row up to
``max_ejection_time`` (+- 10 %). When the period ends it is probed with a
Health check (``mprpc.health.v1.Health/Check("")`` through the channel
itself): it returns only once the check answers SERVING; a failed check keeps
it out for the next, longer, period.

Balancers honour ejections through :func:`held_out`, which keeps at most
``max_ejection_percent`` of the providers they are given out (those ejected
first), so the cap holds per service even when providers are shared.

:class:`PeakEwma` is Finagle's peak-sensitive moving average of a provider's
latency: a slower sample replaces it at once, a faster one pulls it down with
time constant ``latency_decay``. The least-outstanding balancer weighs a
provider by ``ewma * (outstanding + 1)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf.wrappers_pb2 import Int32Value, StringValue
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._balancer import EJECTED, weighs_latency
from twisted_rpc.client._connection import ClientConnection, TakenBack, _Call
from twisted_rpc.client._states import ChannelState
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import RpcError, StatusCode, code_name

if TYPE_CHECKING:
    from twisted_rpc.client._channel import Channel
    from twisted_rpc.client._options import ClientOptions
    from twisted_rpc.core._codec import GoawayReason

__all__ = ["AccruingConnection", "FailureAccrual", "PeakEwma", "observers"]

log = Logger(namespace="twisted_rpc.client")

COUNTED = frozenset({StatusCode.UNAVAILABLE, StatusCode.INTERNAL, StatusCode.DEADLINE_EXCEEDED})
"""The codes a failure accrual counts; any other outcome ends a run of failures."""

_HEALTH = "mprpc.health.v1.Health"
_CHECK = MethodInfo(_HEALTH, "Check", f"{_HEALTH}/Check".encode(), StringValue, Int32Value)
_SERVING = 1
_NO_HEALTH = frozenset({StatusCode.NOT_FOUND, StatusCode.UNIMPLEMENTED})
"""A probe's answers from a provider that serves no Health service."""

PENALTY = 1e6
"""Cost of a provider with calls in flight and no latency measured yet
(Finagle's penalty): it is tried once, then weighed by what it answers."""


class PeakEwma:
    """A provider's latency, peak-sensitive: see the module docstring."""

    __slots__ = ("clock", "decay", "ewma", "stamp")

    def __init__(self, clock: Any, decay: float) -> None:
        self.clock = clock
        self.decay = decay
        self.ewma = 0.0
        self.stamp = clock.seconds()

    def value(self) -> float:
        """The average now (decaying towards 0 since the last sample)."""
        elapsed: float = max(0.0, self.clock.seconds() - self.stamp)
        return self.ewma * math.exp(-elapsed / self.decay)

    def observe(self, rtt: float) -> None:
        now = self.clock.seconds()
        if rtt > self.ewma:
            self.ewma = rtt  # a slower sample counts at once
        else:
            w = math.exp(-max(0.0, now - self.stamp) / self.decay)
            self.ewma = self.ewma * w + rtt * (1.0 - w)
        self.stamp = now

    def cost(self, load: int) -> float:
        """``ewma * (load + 1)``; PENALTY + load if busy and never measured."""
        ewma = self.value()
        if ewma == 0.0:
            return PENALTY + load if load else 0.0
        return float(ewma * (load + 1))

    def done(self, result: Any, started: float) -> Any:
        """A call's outcome: its latency if it answered, or ran out of time."""
        error = result.value if isinstance(result, Failure) else None
        if error is None or getattr(error, "code", None) == StatusCode.DEADLINE_EXCEEDED:
            self.observe(self.clock.seconds() - started)
        return result


class FailureAccrual:
    """One channel's run of failures and its ejections: see the module docstring."""

    def __init__(self, channel: Channel, rng: random.Random | None = None) -> None:
        options = channel.options
        self.channel = channel
        self.clock = channel.clock
        self.threshold = options.consecutive_failures
        self.base = options.base_ejection_time
        self.longest = options.max_ejection_time
        self.max_percent = options.max_ejection_percent
        self.probe_timeout = options.connect_timeout
        self.random = rng or random.Random()
        self.failures = 0
        """Counted failures in a row."""
        self.ejections = 0
        """Ejections in a row (the period doubles with each)."""
        self.ejected = False
        self.ejected_at = 0.0
        self.returned_at = 0.0
        self._timer: IDelayedCall | None = None
        self._connection: object = None  # the run of failures counted is on it
        self._start = 0  # its finished calls before the run

    def record(self, connection: Any, code: int, popped: int = 0) -> None:
        """``connection`` failed a call with ``code`` (it tells only failures).

        Successes cost nothing: a run of failures is consecutive while the
        connection's finished calls grew only by the failures themselves
        (calls sent, ``_next_id``, less those in flight; ``popped``: 1 if
        this call is out of ``outstanding`` already)."""
        if self.ejected:
            return  # calls still in flight when it was ejected, or its probe
        if code not in COUNTED:
            self.failures = 0  # the provider answered
            return
        in_flight = len(connection.outstanding) + popped + len(connection.streams)
        done = connection._next_id - in_flight
        if connection is not self._connection or done != self._start + self.failures + 1:
            self._connection = connection
            self._start = done - 1
            self.failures = 0
        self.failures += 1
        if self.failures >= self.threshold:
            self._connection = None
            self.eject(f"{self.failures} calls in a row failed, the last with {code_name(code)}")

    def period(self) -> float:
        """Seconds out for the current ejection: doubling, capped, +- 10 %."""
        seconds = self.base * (1 << min(max(self.ejections - 1, 0), 62))
        return min(self.longest, seconds) * self.random.uniform(0.9, 1.1)

    def eject(self, why: str, again: bool = False) -> None:
        """Out of rotation (``again``: still, after a failed Health check)."""
        now = self.clock.seconds()
        if not again and self.ejections and now - self.returned_at > self.longest:
            self.ejections = 0  # it stayed in for long: start again from the base
        self.ejections += 1
        if not self.ejected:
            self.ejected_at = now  # the cap keeps out those ejected first
        self.ejected = True
        EJECTED[self.channel] = self
        seconds = self.period()
        log.warn(
            "ejecting provider {address} for {seconds:.1f}s: {why}",
            address=self.channel.address,
            seconds=seconds,
            why=why,
        )
        self._timer = self.clock.callLater(seconds, self._probe)

    def _probe(self) -> None:
        self._timer = None
        if self.channel.state == ChannelState.CLOSED:
            self.stop()
            return
        d = self.channel.call(_CHECK, StringValue(value=""), self.probe_timeout, None)
        d.addCallbacks(self._answered, self._unanswered)

    def _answered(self, reply: Any) -> None:
        if isinstance(reply, Int32Value) and reply.value == _SERVING:
            self.restore()
        else:
            self._stay_out(f"its Health check answered {getattr(reply, 'value', reply)}")

    def _unanswered(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, RpcError) and error.code in _NO_HEALTH:
            self.restore()  # it answers, and serves no Health: nothing more to ask
        else:
            self._stay_out(f"its Health check failed: {failure.getErrorMessage()}")

    def _stay_out(self, why: str) -> None:
        if not self.ejected:
            return
        self.eject(why, again=True)

    def restore(self) -> None:
        """Back in rotation (the ejection count decays only after a while in)."""
        if not self.ejected:
            return
        self.ejected = False
        self.failures = 0
        self.returned_at = self.clock.seconds()
        EJECTED.pop(self.channel, None)
        log.info("provider {address} is back in rotation", address=self.channel.address)

    def stop(self) -> None:
        """The channel is closed: no more probes, out of the ejected set."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.ejected = False
        EJECTED.pop(self.channel, None)


class AccruingConnection(ClientConnection):
    """A connection that tells its channel's accrual of each call failed by
    the provider's answer or by its deadline; a success costs nothing more."""

    def __init__(
        self,
        accrual: FailureAccrual,
        clock: IReactorTime,
        options: ClientOptions,
        on_lost: Callable[[ClientConnection, Failure], object],
        on_goaway: Callable[[ClientConnection, GoawayReason, list[TakenBack]], object],
    ) -> None:
        super().__init__(clock, options, on_lost=on_lost, on_goaway=on_goaway)
        self.accrual = accrual

    def _call_failed(
        self, d: _Call, status: int, message: str, metadata: dict[str, str] | None
    ) -> None:
        if metadata is None or wire.NOT_RUN_KEY not in metadata:  # a shed call did not run
            self.accrual.record(self, status, 1)
        super()._call_failed(d, status, message, metadata)

    def _deadline_expired(self, call_id: int) -> None:
        if call_id in self.outstanding:
            self.accrual.record(self, StatusCode.DEADLINE_EXCEEDED)
        ClientConnection._deadline_expired(self, call_id)


_Watch = Callable[[Deferred[Any]], object]


def observers(channel: Channel) -> tuple[FailureAccrual | None, PeakEwma | None, _Watch | None]:
    """A channel's failure accrual (None if ejection is off: its
    connections are then plain), its latency (None unless its balancer is
    least-outstanding) and what it does with each unary call's Deferred:
    nothing (None), or time it."""
    options = channel.options
    accrual = FailureAccrual(channel) if options.consecutive_failures else None
    if not weighs_latency(options.balancer):
        return accrual, None, None
    latency = PeakEwma(channel.clock, options.latency_decay)
    done, clock = latency.done, channel.clock

    def timed(d: Deferred[Any]) -> object:
        return d.addBoth(done, clock.seconds())

    return accrual, latency, timed
