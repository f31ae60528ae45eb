"""Outlier ejection (failure accrual) and peak-EWMA latency, per provider.

:class:`FailureAccrual` watches one channel's unary calls: after
``consecutive_failures`` of them in a row fail with UNAVAILABLE, INTERNAL or
DEADLINE_EXCEEDED, the provider is ejected (out of rotation) for
``base_ejection_time``, doubled at each ejection in a row up to
``max_ejection_time`` (+- 10 %). When the period ends it is probed with a
Health check (``mprpc.health.v1.Health/Check("")`` through the channel
itself): it returns only once the check answers SERVING; a failed check keeps
it out for the next, longer, period.

A provider is also ejected, the same way, when its *success rate* is well
below its peers' (:class:`SuccessRates`, Envoy's success-rate detection made
simpler): when one of its calls fails and ``success_rate_window`` seconds have
passed since the last look, every provider of the client with at least
``success_rate_min_calls`` calls finished since then is compared, if there
are ``success_rate_min_providers`` of them: one whose share of calls not
failed (as counted above) is under ``success_rate_ratio`` times the mean
share of the others is ejected. Successes still cost nothing: a provider's
finished calls are read off its connections' counters.

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
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf.wrappers_pb2 import Int32Value, StringValue
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._balancer import EJECTED, weighs_latency
from twisted_rpc.client._calls import TakenBack
from twisted_rpc.client._connection import ClientConnection
from twisted_rpc.client._events import Events
from twisted_rpc.client._states import ChannelState
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import RpcError, StatusCode, code_name

if TYPE_CHECKING:
    from twisted_rpc.client._channel import Channel
    from twisted_rpc.client._options import ClientOptions
    from twisted_rpc.core._codec import GoawayReason

__all__ = [
    "AccruingConnection",
    "FailureAccrual",
    "PeakEwma",
    "SuccessRates",
    "observers",
    "peers_of",
]

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


def _finished(connection: Any) -> int:
    """Calls (and streams) ``connection`` finished: sent, less those in flight."""
    sent = getattr(connection, "_next_id", 1) - 1
    return int(sent - len(connection.outstanding) - len(getattr(connection, "streams", ())))


class SuccessRates:
    """The providers of one client compared by success rate: see the module
    docstring. Looked at when a call fails (:meth:`check`), so a client whose
    calls succeed pays nothing."""

    def __init__(self) -> None:
        self.members: dict[FailureAccrual, None] = {}
        self.events = Events()
        """The client's resilience observers (ejections, returns, shed calls)."""
        self.started: float | None = None

    def join(self, accrual: FailureAccrual) -> None:
        self.members[accrual] = None
        if self.started is None:
            self.started = accrual.clock.seconds()

    def check(self, accrual: FailureAccrual) -> None:
        """One of ``accrual``'s calls failed: compare the providers if a window passed."""
        options = accrual.channel.options
        now = accrual.clock.seconds()
        if self.started is None or now - self.started < options.success_rate_window:
            return
        self.started = now
        rates: dict[FailureAccrual, tuple[float, int]] = {}
        for member in self.members:
            calls = 0 if member.ejected else member.window_calls()
            if calls >= options.success_rate_min_calls:
                rates[member] = (1.0 - min(member.window_failures, calls) / calls, calls)
        if len(rates) >= max(2, options.success_rate_min_providers):
            total = sum(rate for rate, _ in rates.values())
            for member, (rate, calls) in rates.items():
                others = (total - rate) / (len(rates) - 1)
                if rate < options.success_rate_ratio * others:
                    member.eject(
                        f"{rate:.0%} of its last {calls} calls succeeded, "
                        f"its peers' {others:.0%} on average"
                    )
        for member in self.members:
            member.new_window()


_PEERS: weakref.WeakKeyDictionary[object, SuccessRates] = weakref.WeakKeyDictionary()


def peers_of(key: object) -> SuccessRates:
    """The success-rate peers of a client, by its dial queue (``Client._dials``)."""
    peers = _PEERS.get(key)
    if peers is None:
        peers = _PEERS[key] = SuccessRates()
    return peers


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
        dials = getattr(channel, "_dials", None)
        self.peers = SuccessRates() if dials is None else peers_of(dials)
        """Its client's providers, compared by success rate."""
        self.window_failures = 0
        """Counted failures since the success-rate window started."""
        self._seen: Any = None  # the connection the window's calls are read on
        self._base = 0  # its finished calls when the window started
        self._carried = 0  # calls finished on earlier connections in the window
        self.new_window()
        if options.success_rate_min_calls:
            self.peers.join(self)

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
        self.window_failures += 1
        self._look(connection)
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
        elif self.peers.members:
            self.peers.check(self)

    def window_calls(self) -> int:
        """Calls finished since the success-rate window started (on this
        connection and the ones before it; a connection seen first at the end
        of the window counts whole)."""
        self._look(self.channel.protocol)
        now = _finished(self._seen) - self._base if self._seen is not None else 0
        return self._carried + now

    def _look(self, connection: object) -> None:
        """Read the window's calls on ``connection`` from now on (its calls
        so far count; the previous connection's are carried)."""
        if connection is not None and connection is not self._seen:
            if self._seen is not None:
                self._carried += _finished(self._seen) - self._base
            self._seen, self._base = connection, 0

    def new_window(self) -> None:
        self._seen = self.channel.protocol
        self._base = _finished(self._seen) if self._seen is not None else 0
        self._carried = 0
        self.window_failures = 0

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
        self.peers.events("ejected", str(self.channel.address))
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
        self.new_window()
        self.peers.events("returned", str(self.channel.address))
        log.info("provider {address} is back in rotation", address=self.channel.address)

    def stop(self) -> None:
        """The channel is closed: no more probes, out of the ejected set."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.ejected = False
        EJECTED.pop(self.channel, None)
        self.peers.members.pop(self, None)


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
        self, entry: TakenBack, status: int, message: str, metadata: dict[str, str] | None
    ) -> None:
        if metadata is None or wire.NOT_RUN_KEY not in metadata:  # a shed call did not run
            self.accrual.record(self, status, 1)
        else:
            self.accrual.peers.events("call_shed", str(self.accrual.channel.address))
        super()._call_failed(entry, status, message, metadata)

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
