"""Load balancers: which of a service's providers takes the next call.

A balancer sees the service's channels (each with ``ready``, ``dialling``,
``usable``, ``address.weight`` and ``load``, the calls it has in flight) and
returns one. Every balancer prefers, in turn: channels that take calls now
(``ready``: a proven connection, or idle after the provider closed an idle
one, redialled by the call that picks it), then channels dialling (a call
waits for the connection to be proven), then any other ``usable`` one. Channels whose
provider cannot be reached are not ``usable``: they are picked only when no
other is left (passive health checking), and then fail the call at once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["Balancer", "LeastOutstanding", "RoundRobin", "WeightedRandom", "balancer_named"]


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


class LeastOutstanding(Balancer):
    """Power of two choices: of two random providers, the one with fewer calls in flight."""

    name = "least_outstanding"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def pick(self, channels: Sequence[_C], exclude: Sequence[object] = ()) -> _C | None:
        candidates = self._candidates(channels, exclude)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        a, b = self._random.sample(candidates, 2)
        return a if a.load <= b.load else b


_BALANCERS = {cls.name: cls for cls in (RoundRobin, WeightedRandom, LeastOutstanding)}


def balancer_named(name: str) -> type[Balancer]:
    """The balancer class for a config name (``round_robin``, ``weighted_random``, ...)."""
    try:
        return _BALANCERS[name]
    except KeyError:
        raise ValueError(
            f"unknown balancer {name!r} (known: {', '.join(sorted(_BALANCERS))})"
        ) from None
