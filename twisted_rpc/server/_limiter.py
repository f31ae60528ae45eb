"""An adaptive limit of the calls a provider runs at once: :class:`AdaptiveLimiter`.

A gradient limiter in the manner of Netflix's concurrency-limits (Gradient2)
and brpc's auto limiter. It learns two latencies from the calls that finish:

- the **no-load** latency, the lowest latency of a recent window (the least
  of the last ``history`` windows' minimums, so it follows a drift up as old
  windows fall out);
- the **current** latency, the mean of the last window of ``window`` calls.

At the end of each window the limit moves towards ``limit * gradient +
headroom``, where ``gradient = no_load * tolerance / current`` (kept within
[``floor``, 1]):

- when calls take longer than at no load, the limit falls to ``limit *
  gradient`` at once (by at most three quarters per window: a sudden overload
  is met within a few windows, not a few seconds);
- when they take about as long, it climbs by a fifth of the headroom per
  window, and only while the limit is in use (at least half of it in flight),
  as an idle provider proves nothing about a higher one.

The headroom is ``sqrt(limit)`` (Gradient2's), except when the window's calls
*serialise*: their mean latency grew with the calls in flight, as when the
handlers' work is CPU-bound on the provider's one thread (``current >= no_load
* mean_in_flight / 2`` with more than one call in flight). Then a higher
limit only adds queue: the headroom is 1, the gradient uses a tolerance of
1.2 (a second call queued behind one waits its whole length), the limit falls
to ``limit * gradient`` with nothing added, and it does not climb again for
:attr:`hold_windows` windows, so it stays where nothing waits and probes one
more only now and then. A window with several calls in flight and none slower
than the tolerance allows ends the hold (they did not serialise).

A window is ``window`` calls, or ends after ``short_window`` or more
calls once their mean latency is over twice the tolerance above the no-load
figure (overload ends the window early). The limit starts at 20 (Gradient2's
initial limit). The limit stays within ``[min_limit, max_limit]``.

**The CPU bound.** Given ``cpu_clock`` (the provider's CPU time,
``time.process_time``: its reactor thread's and its thread pool's) and
``wall_clock`` (the reactor's ``seconds``), each window also measures how
busy the process was (its CPU over the window's wall time, averaged with the
windows before: a lull of one window is not idleness) and its CPU seconds
per finished call. When a window's calls waited (took over 1.2x their
no-load latency on average) in a process busy at least :data:`BUSY` of the
time, the limit is at most :attr:`cpu_bound` = ``no_load * tolerance /
cpu_per_call * max(1, busy)`` (rounded down, at least 1): what the process
can run within the tolerated latency when that CPU is what a call costs it
(one thread, or one at a time under the GIL; ``busy`` over 1 means threads
ran at once on several cores). The bound is kept, and measured again each
window, while the process stays that busy, and let go one call a window
while it is not (a lull in arrivals, then a burst, must not meet a limit
let go at once); a window that shows several calls in flight without
waiting lets it go at once. A process with time to spare is not bound, nor
one busy with work that does not make these calls wait (another listener's,
a flood of requests that fail). A handler whose work burns the CPU (2 ms,
2.05 ms at no load), on the reactor thread or in its thread pool, gets 1
without probing for it; one that waits on I/O for 10 ms with 50 µs of CPU,
in a busy process, 300, so the gradient alone decides. The bound is
measured, not inferred from latency, so it may go below ``min_limit``
(which bounds the gradient's fall).

**Per method.** Latencies are compared with the no-load latency of the
same method (each method's own least of its recent window minimums, read as
at least :data:`LATENCY_FLOOR`): a window's *load* is the mean of its calls'
latency over their method's no-load figure, and ``current / no_load`` above
stands for it. A cheap method (a health check answered in 50 µs) beside a
slow one (a 10 ms backend call) then does not make the slow one look
overloaded. Queueing under a millisecond is not taken for overload: a read
that brings sixteen 5 µs calls makes the last wait 80 µs, 16x its no-load
latency but no sign of overload.

It reads no clock but the two it may be given, and knows no wire: the
runner feeds it each finished call's latency (from the request's arrival)
and the calls in flight, sheds calls over :attr:`limit`, and counts the
calls it sheds and those it drops late (docs/resilience.md).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable

__all__ = ["BUSY", "LATENCY_FLOOR", "AdaptiveLimiter"]

_SERIAL_TOLERANCE = 1.2
"""How much longer than at no load serialised calls may take before the limit
falls (a second call queued behind one doubles the wait: 1.5 would keep it)."""

BUSY = 0.5
"""The share of a window's wall time the process must have spent on the CPU
for the window's CPU per call to bound the limit. (A provider held at one
CPU-bound call at a time is busy 85-95 % of the time: it idles between an
answer and the next read; the VM's steal and the callers' pauses take more.)"""

LATENCY_FLOOR = 0.001
"""Seconds: the least no-load latency a method is compared with (queueing
under a millisecond is not overload)."""


class _Method:
    """One method's latencies: its no-load figure and the window's calls."""

    __slots__ = ("mins", "no_load", "low", "total", "count")

    def __init__(self, history: int) -> None:
        self.mins: deque[float] = deque(maxlen=history)
        self.no_load = 0.0
        self.low = math.inf
        self.total = 0.0
        self.count = 0

    def load(self, no_load: float) -> float:
        """The window's calls' latency over ``no_load`` (at least the floor), summed."""
        return self.total / max(no_load, LATENCY_FLOOR)


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
        "dropped_late",
        "serial",
        "floor",
        "short_window",
        "history",
        "_methods",
        "_count",
        "_total",
        "_peak",
        "_flight",
        "_hold",
        "cpu_bound",
        "cpu_per_call",
        "busy",
        "_bound_held",
        "_cpu_clock",
        "_wall_clock",
        "_cpu_mark",
        "_wall_mark",
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
        floor: float = 0.25,
        short_window: int = 4,
        cpu_clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, not {min_limit}, {max_limit}")
        if window < 1 or history < 1:
            raise ValueError("window and history must be >= 1")
        if not tolerance >= 1.0 or not 0.0 < smoothing <= 1.0 or not 0.0 < floor <= 1.0:
            raise ValueError("need tolerance >= 1, 0 < smoothing <= 1 and 0 < floor <= 1")
        if short_window < 1:
            raise ValueError("short_window must be >= 1")
        if (cpu_clock is None) != (wall_clock is None):
            raise ValueError("cpu_clock and wall_clock go together")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.window = window
        self.history = history
        self.tolerance = tolerance
        self.smoothing = smoothing
        self.floor = floor
        """The least gradient: the limit falls by at most ``1 - floor`` per window."""
        self.short_window = min(short_window, window)
        start = initial_limit if initial_limit is not None else min(max_limit, max(min_limit, 20))
        self.estimate = float(min(max_limit, max(min_limit, start)))
        """The limit before rounding down."""
        self.limit = int(self.estimate)
        """Calls in flight at most; one more is shed."""
        self.no_load = 0.0
        """Seconds: the no-load latency of the last window's calls (the mean
        of their methods' figures; 0: no window yet)."""
        self.current = 0.0
        """Seconds: the mean latency of the last window."""
        self.shed = 0
        """Calls shed (told by the runner), for metrics: over the limit, or
        dropped late (counted in :attr:`dropped_late` too)."""
        self.dropped_late = 0
        """Calls dropped unrun because their deadline passed before they could run."""
        self.serial = False
        """Whether the last window's calls serialised (latency grew with the
        calls in flight): then the limit has no ``sqrt(limit)`` headroom."""
        self._methods: dict[Hashable, _Method] = {}
        self._count = 0
        self._total = 0.0
        self._peak = 0
        self._flight = 0
        self._hold = 0
        self._cpu_clock = cpu_clock
        self._wall_clock = wall_clock
        self._cpu_mark = self._wall_mark = 0.0
        self.busy = 0.0
        """The process's CPU over the wall time of the last windows (each
        window's figure averaged with the one before; 0: unknown)."""
        self.cpu_per_call = 0.0
        """Seconds of the process's CPU per call in the last window (0: unknown)."""
        self.cpu_bound = max_limit
        """The most calls the process can run within the tolerated latency
        (see "The CPU bound"; ``max_limit`` while not bound)."""
        self._bound_held = False

    hold_windows = 20
    """Windows the limit does not climb after serialised calls made it fall:
    a one-thread provider's best limit is the one with no queue, and probing
    above it costs the calls of that window a wait (they serialise)."""

    def sample(self, latency: float, in_flight: int, method: Hashable = None) -> bool:
        """A call of ``method`` (any key naming it: a provider has a bounded
        set) took ``latency`` seconds, with ``in_flight`` calls running (it
        included) when it finished. True when the limit changed."""
        stats = self._methods.get(method)
        if stats is None:
            stats = self._methods[method] = _Method(self.history)
        stats.total += latency
        stats.count += 1
        if latency < stats.low:
            stats.low = latency
        self._count += 1
        self._total += latency
        self._flight += in_flight
        if in_flight > self._peak:
            self._peak = in_flight
        count = self._count
        if count == 1 and self._cpu_clock is not None:
            self._cpu_mark = self._cpu_clock()
            self._wall_mark = self._wall_clock()  # type: ignore[misc]
        if count < self.window and (count < self.short_window or not self._overloaded()):
            return False
        return self._end_window()

    def _overloaded(self) -> bool:
        """Whether the window so far is already well over the no-load latency."""
        load = 0.0
        for stats in self._methods.values():
            if stats.count:
                no_load = min(stats.low, stats.no_load) if stats.no_load else stats.low
                load += stats.load(no_load)
        return load > self._count * self.tolerance * 2.0

    def _end_window(self) -> bool:
        count = self._count
        if self._cpu_clock is not None and count > 1:
            # The CPU from the window's first call to its last: count - 1 calls.
            cpu = self._cpu_clock() - self._cpu_mark
            wall = self._wall_clock() - self._wall_mark  # type: ignore[misc]
            busy = cpu / wall if wall > 0.0 else 0.0
            # Over two windows or so (a lull of one is not idleness); the first as it is.
            self.busy = (self.busy + busy) / 2.0 if self.busy else busy
            self.cpu_per_call = cpu / (count - 1)
        load = no_loads = 0.0
        for stats in self._methods.values():
            if stats.count:
                stats.mins.append(stats.low)
                stats.no_load = no_load = min(stats.mins)
                load += stats.load(no_load)
                no_loads += max(no_load, LATENCY_FLOOR) * stats.count
                stats.low, stats.total, stats.count = math.inf, 0.0, 0
        load /= count  # the calls' latency over their no-load latency
        flight = self._flight / count
        used = self._peak * 2 >= self.limit
        self.current = self._total / count
        self.no_load = no_loads / count
        self._count = 0
        self._total = 0.0
        self._peak = 0
        self._flight = 0
        # Serialised calls: latency grew with the calls in flight (one thread's work).
        queued = load > _SERIAL_TOLERANCE
        self.serial = serial = flight > 1.0 and queued and load * 2.0 >= flight
        if flight > 1.0 and not queued:
            self._hold = 0  # several in flight and none waited: no one thread's queue
            self._bound_held = False
        # (Serialised: the limit with no wait is the one to keep.)
        tolerance = _SERIAL_TOLERANCE if serial else self.tolerance
        gradient = max(self.floor, min(1.0, tolerance / load)) if load > 0.0 else 1.0
        estimate = self.estimate
        if gradient < 1.0:
            target = estimate * gradient if serial else estimate * gradient + math.sqrt(estimate)
        else:
            target = estimate + (1.0 if serial else math.sqrt(estimate))
        if target > estimate:
            if not used or self._hold > 0:
                self._hold = max(0, self._hold - 1)  # not using it (or holding): no evidence
            else:
                estimate = estimate * (1.0 - self.smoothing) + target * self.smoothing
        else:
            if serial and target < estimate:
                self._hold = self.hold_windows
            estimate = target  # falling: at once (by at most 1 - floor)
        estimate = min(float(self.max_limit), max(float(self.min_limit), estimate))
        bound = self.cpu_bound = self._bound(queued)
        if estimate > bound:
            estimate = max(float(bound), float(self.min_limit))  # no climbing past it unseen
        self.estimate = estimate
        old, self.limit = self.limit, min(int(estimate), bound)
        return self.limit != old

    def _bound(self, queued: bool) -> int:
        """The CPU bound on the limit (see "The CPU bound")."""
        per_call = self.cpu_per_call
        held = self._bound_held
        if per_call <= 0.0 or not (queued or held):
            self._bound_held = False
            return self.max_limit
        if self.busy < BUSY:
            # A lull (the callers paused, or load fell): let the bound go one
            # call a window, not at once; the burst after a lull meets it.
            if not held or self.cpu_bound >= self.max_limit - 1:
                self._bound_held = False
                return self.max_limit
            return self.cpu_bound + 1
        self._bound_held = True
        # (Busy over 1: threads running at once on several cores, as many more calls.)
        calls = self.no_load * self.tolerance / per_call * max(1.0, self.busy)
        return max(1, min(self.max_limit, int(calls + 1e-9)))
