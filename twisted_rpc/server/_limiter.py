"""An adaptive limit of the calls a provider runs at once: :class:`AdaptiveLimiter`.

A gradient limiter in the manner of Netflix's concurrency-limits (Gradient2)
and brpc's auto limiter. It learns two latencies from the calls that finish:

- the **no-load** latency, the lowest latency of a recent window (the least
  of the last ``history`` windows' minimums, so it follows a drift up as old
  windows fall out);
- the **current** latency, the mean of the last window of ``window`` calls.

At the end of each window the limit moves towards
``limit * gradient + headroom``, where ``gradient = no_load * tolerance /
current`` (kept within [0.5, 1]) and ``headroom`` is ``sqrt(limit)``: when
calls take longer than at no load, the limit falls (at most by half a
window); when they take about as long, it climbs by a fraction of the
headroom per window, and only while the limit is in use (at least half of it
in flight), as an idle provider proves nothing about a higher one. The
limit stays within ``[min_limit, max_limit]``.

It knows no clock and no wire: the runner feeds it each finished call's
latency and the calls in flight, and sheds calls over :attr:`limit`
(docs/resilience.md).
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["AdaptiveLimiter"]


class AdaptiveLimiter:
    """A concurrency limit that falls as latency rises over its no-load figure."""

    __slots__ = (
        "min_limit",
        "max_limit",
        "window",
        "tolerance",
        "smoothing",
        "estimate",
        "limit",
        "no_load",
        "current",
        "shed",
        "_mins",
        "_count",
        "_total",
        "_low",
        "_peak",
    )

    def __init__(
        self,
        min_limit: int = 4,
        max_limit: int = 1000,
        initial_limit: int | None = None,
        window: int = 50,
        history: int = 100,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, not {min_limit}, {max_limit}")
        if window < 1 or history < 1:
            raise ValueError("window and history must be >= 1")
        if not tolerance >= 1.0 or not 0.0 < smoothing <= 1.0:
            raise ValueError("need tolerance >= 1 and 0 < smoothing <= 1")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.window = window
        self.tolerance = tolerance
        self.smoothing = smoothing
        start = initial_limit if initial_limit is not None else min(max_limit, max(min_limit, 50))
        self.estimate = float(min(max_limit, max(min_limit, start)))
        """The limit before rounding down."""
        self.limit = int(self.estimate)
        """Calls in flight at most; one more is shed."""
        self.no_load = 0.0
        """Seconds: the least latency of the recent windows (0: none seen yet)."""
        self.current = 0.0
        """Seconds: the mean latency of the last window."""
        self.shed = 0
        """Calls shed (told by the runner), for metrics."""
        self._mins: deque[float] = deque(maxlen=history)
        self._count = 0
        self._total = 0.0
        self._low = math.inf
        self._peak = 0

    def sample(self, latency: float, in_flight: int) -> bool:
        """A call took ``latency`` seconds, with ``in_flight`` calls running
        (it included) when it finished. True when the limit changed."""
        self._count += 1
        self._total += latency
        if latency < self._low:
            self._low = latency
        if in_flight > self._peak:
            self._peak = in_flight
        if self._count < self.window:
            return False
        return self._end_window()

    def _end_window(self) -> bool:
        current = self._total / self._count
        self._mins.append(self._low)
        used = self._peak * 2 >= self.limit
        self._count = 0
        self._total = 0.0
        self._low = math.inf
        self._peak = 0
        self.current = current
        self.no_load = no_load = min(self._mins)
        if current <= 0.0:
            gradient = 1.0
        else:
            gradient = max(0.5, min(1.0, no_load * self.tolerance / current))
        estimate = self.estimate
        target = estimate * gradient + math.sqrt(estimate)
        if target > estimate and not used:
            return False  # not using the limit it has: no evidence for more
        estimate = estimate * (1.0 - self.smoothing) + target * self.smoothing
        self.estimate = estimate = min(float(self.max_limit), max(float(self.min_limit), estimate))
        old, self.limit = self.limit, int(estimate)
        return self.limit != old
