"""Load balancers: which of a service's providers takes the next call.

A balancer sees the service's channels (each with ``ready``, ``dialling``,
``usable``, ``address.weight`` and ``load``, the calls it has in flight) and
returns one. Every balancer prefers, in turn: channels that take calls now
(``ready``: a proven connection, or idle after the provider closed an idle
one, redialled by the call that picks it), then channels dialling (a call
waits for the connection to be proven), then any other ``usable`` one. Channels whose
provider cannot be reached are not ``usable``: they are picked only when no
other is left (passive health checking), and then fail the call at once.
Providers a failure accrual ejected are left out, up to the service's
``max_ejection_percent`` (:func:`held_out`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from twisted_rpc.client._outliers import FailureAccrual

__all__ = [
    "EJECTED",
    "Balancer",
    "LeastOutstanding",
    "RoundRobin",
    "WeightedRandom",
    "balancer_named",
    "held_out",
    "weighs_latency",
]


EJECTED: dict[object, FailureAccrual] = {}
"""Channels out of rotation now (in any client of the process), and their
accruals. Empty (the usual case), balancers skip :func:`held_out` at once."""


def held_out(channels: Sequence[object], exclude: Sequence[object]) -> Sequence[object]:
    """``exclude`` plus the ejected ``channels`` that stay out: at most
    ``max_ejection_percent`` of ``channels`` (rounded down), ejected first."""
    out = [c for c in channels if c in EJECTED]
    if not out:
        return exclude
    accruals = [EJECTED[c] for c in out]
    cap = len(channels) * accruals[0].max_percent // 100
    if len(out) > cap:
        out = [a.channel for a in sorted(accruals, key=lambda a: a.ejected_at)[:cap]]
    return (*exclude, *out) if out else exclude


class _Weighted(Protocol):
    @property
    def weight(self) -> int: ...


class _Channel(Protocol):
    """What a balancer sees of a channel."""

    @property
    def address(self) -> _Weighted: ...

    @property
    def usable(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    @property
    def dialling(self) -> bool: ...

    @property
    def load(self) -> int: ...


_C = TypeVar("_C", bound=_Channel)
"""The channels' type: a balancer returns one of those it is given."""


class Balancer:
    """Base: ``pick(channels, exclude)`` returns a channel, or None if there is none."""

    name = ""

    def pick(self, channels: Sequence[_C], exclude: Sequence[object] = ()) -> _C | None:
        raise NotImplementedError

    @staticmethod
    def _candidates(channels: Sequence[_C], exclude: Sequence[object]) -> list[_C]:
        """The channels of the best tier: ready, else dialling, else usable, else any."""
        if EJECTED:
            exclude = held_out(channels, exclude)
        rest = [c for c in channels if c not in exclude] if exclude else list(channels)
        ready = [c for c in rest if c.ready]
        if ready:
            return ready
        usable = [c for c in rest if c.usable]
        return [c for c in usable if c.dialling] or usable or rest


class RoundRobin(Balancer):
    """Each usable provider in turn (the default)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, channels: Sequence[_C], exclude: Sequence[object] = ()) -> _C | None:
        if EJECTED:
            exclude = held_out(channels, exclude)
        count = len(channels)
        if count <= 1 and not exclude:
            return channels[0] if count else None  # usable or not, it is the only one
        if not count:
            return None
        start = self._next % count
        for step in range(count):
            channel = channels[(start + step) % count]
            if channel.ready and channel not in exclude:
                self._next = (start + step + 1) % count
                return channel
        # None is ready: the next one dialling, else the next usable one.
        fallback = None
        for step in range(count):
            channel = channels[(start + step) % count]
            if channel.usable and channel not in exclude:
                if channel.dialling:
                    self._next = (start + step + 1) % count
                    return channel
                if fallback is None:
                    fallback = channel
                    self._next = (start + step + 1) % count
        if fallback is not None:
            return fallback
        rest = [c for c in channels if c not in exclude]
        return rest[0] if rest else None


class WeightedRandom(Balancer):
    """At random, in proportion to each provider's registered weight."""

    name = "weighted_random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def pick(self, channels: Sequence[_C], exclude: Sequence[object] = ()) -> _C | None:
        candidates = self._candidates(channels, exclude)
        if not candidates:
            return None
        weights = [max(0, c.address.weight) for c in candidates]
        if not any(weights):
            return self._random.choice(candidates)
        return self._random.choices(candidates, weights)[0]


def _cost(channel: Any) -> float:
    """Peak-EWMA latency times (calls in flight + 1); the load alone if unmeasured."""
    latency = getattr(channel, "latency", None)
    return float(channel.load) if latency is None else float(latency.cost(channel.load))


class LeastOutstanding(Balancer):
    """Power of two choices: of two random providers, the cheaper, by peak-EWMA
    latency times calls in flight (Finagle's), or calls in flight alone when
    latency is not measured (a proxy's balancer when the client's is another)."""

    name = "least_outstanding"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def pick(self, channels: Sequence[_C], exclude: Sequence[object] = ()) -> _C | None:
        candidates = self._candidates(channels, exclude)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        a, b = self._random.sample(candidates, 2)
        return a if _cost(a) <= _cost(b) else b


_BALANCERS = {cls.name: cls for cls in (RoundRobin, WeightedRandom, LeastOutstanding)}


def weighs_latency(choice: object) -> bool:
    """Whether a ClientOptions.balancer choice needs the providers' latency."""
    if isinstance(choice, str):
        return choice == LeastOutstanding.name
    return isinstance(choice, type) and issubclass(choice, LeastOutstanding)


def balancer_named(name: str) -> type[Balancer]:
    """The balancer class for a config name (``round_robin``, ``weighted_random``, ...)."""
    try:
        return _BALANCERS[name]
    except KeyError:
        raise ValueError(
            f"unknown balancer {name!r} (known: {', '.join(sorted(_BALANCERS))})"
        ) from None
