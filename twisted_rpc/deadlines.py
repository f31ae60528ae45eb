"""One timer per connection for all its call deadlines.

A ``callLater`` per call costs microseconds on the hot path and grows the
reactor's timer heap with the number of calls in flight. Instead each
connection keeps a heap of ``(deadline, call id)`` and a single delayed call
for the earliest one. Answered calls are not removed from the heap; they are
skipped when their deadline comes, and the heap is rebuilt when such stale
entries outnumber the live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class DeadlineQueue:
    """Calls ``on_expired(call_id)`` for each live call whose deadline passed.

    ``live`` is the owner's map of calls in flight: an id missing from it is
    an answered call, and its heap entry is dropped.
    """

    __slots__ = ("_clock", "_live", "_on_expired", "_heap", "_timer", "_timer_at")

    def __init__(
        self,
        clock: IReactorTime,
        live: Mapping[int, object],
        on_expired: Callable[[int], object],
    ) -> None:
        self._clock = clock
        self._live = live
        self._on_expired = on_expired
        self._heap: list[tuple[float, int]] = []
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, call_id: int) -> None:
        """Track ``call_id`` until ``deadline`` (in the clock's seconds)."""
        heap = self._heap
        if len(heap) > 64 and len(heap) > 2 * len(self._live):
            live = self._live
            self._heap = heap = [entry for entry in heap if entry[1] in live]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, call_id))
        if self._timer is None or deadline < self._timer_at:
            self._schedule(deadline)

    def stop(self) -> None:
        """Forget every deadline and cancel the timer (the connection is gone)."""
        self._heap.clear()
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _schedule(self, deadline: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._clock.seconds()
        live = self._live
        expired = []
        while heap and heap[0][0] <= now:
            _, call_id = heapq.heappop(heap)
            if call_id in live:
                expired.append(call_id)
        while heap and heap[0][1] not in live:
            heapq.heappop(heap)
        if heap:
            self._schedule(heap[0][0])
        for call_id in expired:
            self._on_expired(call_id)
