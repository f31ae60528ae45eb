"""One timer per connection for all its call deadlines.

A ``callLater`` per call costs microseconds on the hot path and grows the
reactor's timer heap with the number of calls in flight. Instead each
connection keeps its deadlines in a queue and a single delayed call for the
earliest one. Calls usually share one timeout, so deadlines mostly arrive in
order: those go to a FIFO (O(1)); any earlier than the last one go to a heap.
Answered calls are not removed; they are skipped when their deadline comes,
and the queue is rebuilt when such stale entries outnumber the live ones.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class DeadlineQueue:
    """Calls ``on_expired(call_id)`` for each live call whose deadline passed.

    ``live`` is the owner's map of calls in flight: an id missing from it is
    an answered call, and its entry is dropped.
    """

    __slots__ = (
        "_clock",
        "_live",
        "_on_expired",
        "_fifo",
        "_heap",
        "_last",
        "_timer",
        "_timer_at",
        "_added",
    )

    def __init__(
        self,
        clock: IReactorTime,
        live: Mapping[int, object],
        on_expired: Callable[[int], object],
    ) -> None:
        self._clock = clock
        self._live = live
        self._on_expired = on_expired
        self._fifo: deque[tuple[float, int]] = deque()
        self._heap: list[tuple[float, int]] = []
        self._last = 0.0
        self._added = 0
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap)

    def add(self, deadline: float, call_id: int) -> None:
        """Track ``call_id`` until ``deadline`` (in the clock's seconds)."""
        self._added += 1
        if not self._added & 63 and len(self) > 2 * len(self._live):
            self._compact()
        if deadline >= self._last:
            # In order: the timer, if any, is already due no later than this.
            self._fifo.append((deadline, call_id))
            self._last = deadline
            if self._timer is None:
                self._schedule(deadline)
            return
        heapq.heappush(self._heap, (deadline, call_id))
        if self._timer is None or deadline < self._timer_at:
            self._schedule(deadline)

    def stop(self) -> None:
        """Forget every deadline and cancel the timer (the connection is gone)."""
        self._fifo.clear()
        self._heap.clear()
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _compact(self) -> None:
        live = self._live
        self._fifo = deque(entry for entry in self._fifo if entry[1] in live)
        self._heap = [entry for entry in self._heap if entry[1] in live]
        heapq.heapify(self._heap)

    def _schedule(self, deadline: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        live = self._live
        fifo, heap = self._fifo, self._heap
        expired = []
        while fifo and fifo[0][0] <= now:
            call_id = fifo.popleft()[1]
            if call_id in live:
                expired.append(call_id)
        while heap and heap[0][0] <= now:
            call_id = heapq.heappop(heap)[1]
            if call_id in live:
                expired.append(call_id)
        while fifo and fifo[0][1] not in live:
            fifo.popleft()
        while heap and heap[0][1] not in live:
            heapq.heappop(heap)
        if fifo or heap:
            first = min(fifo[0][0] if fifo else float("inf"), heap[0][0] if heap else float("inf"))
            self._schedule(first)
        for call_id in expired:
            self._on_expired(call_id)
