"""One timer per connection for all its call deadlines.

A ``callLater`` per call costs microseconds on the hot path and grows the
reactor's timer heap with the number of calls in flight. Instead each
connection keeps its deadlines in a queue and a single delayed call for the
earliest one. Calls usually share one timeout, so deadlines mostly arrive in
order: those go to a FIFO (O(1)); any earlier than the last one go to a heap.
Answered calls are not removed when answered: every 16th :meth:`DeadlineQueue.add`
drops those at the FIFO's front (a few dict lookups each), the
others are skipped when their deadline comes, and the queue is rebuilt when
stale entries still outnumber the live ones.

Where call ids can be reused while an old deadline is still queued (a
provider cannot choose the ids its peer sends), an entry names its call by id
*and* by the owner's record of it (the value in the ``live`` map when the
deadline was added: ``by_record=True``), so the deadline of a finished call
cannot expire a later call with the same id. The record is then held until
its deadline passes or the queue is compacted, so it must be small. A
consumer numbers its own calls and never reuses an id in flight: it matches
by id alone and its records (which hold the request, to send it again) are
not kept alive by the queue.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IDelayedCall, IReactorTime

# An entry: (deadline, sequence number, call id, the call's record in `live`).
# The sequence number keeps the heap from ever comparing two records.
_Entry = tuple[float, int, int, object]


_GONE = object()
"""What ``live.get`` gives for an id no longer there: matches no record."""

_ANY = object()
"""The record of an entry matched by id alone."""


def _nothing(call_id: int) -> None:
    """What a stopped queue calls (nothing: its connection is gone)."""


class DeadlineQueue:
    """Calls ``on_expired(call_id)`` for each live call whose deadline passed.

    ``live`` is the owner's map of calls in flight. :meth:`add` a deadline
    once the call is in it; an entry whose call is no longer there (or, with
    ``by_record``, whose id now names another call: another value) is an
    answered call, dropped.
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
        "_by_record",
    )

    def __init__(
        self,
        clock: IReactorTime,
        live: Mapping[int, object],
        on_expired: Callable[[int], object],
        *,
        by_record: bool = False,
    ) -> None:
        self._clock = clock
        self._by_record = by_record
        self._live = live
        self._on_expired = on_expired
        self._fifo: deque[_Entry] = deque()
        self._heap: list[_Entry] = []
        self._last = 0.0
        self._added = 0
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap)

    def add(self, deadline: float, call_id: int) -> None:
        """Track ``call_id`` (already in ``live``) until ``deadline`` (in the
        clock's seconds)."""
        self._added = added = self._added + 1
        if not added & 15:
            self._tidy(added)
        record = self._live[call_id] if self._by_record else _ANY
        entry = (deadline, added, call_id, record)
        if deadline >= self._last:
            # In order: the timer, if any, is already due no later than this.
            self._fifo.append(entry)
            self._last = deadline
            if self._timer is None:
                self._schedule(deadline)
            return
        heapq.heappush(self._heap, entry)
        if self._timer is None or deadline < self._timer_at:
            self._schedule(deadline)

    def _tidy(self, added: int) -> None:
        """Drop the answered calls at the FIFO's front (every 16 adds), and
        compact the queue (every 64) when stale entries outnumber the live."""
        live = self._live
        fifo = self._fifo
        if self._by_record:
            get = live.get
            while fifo and get(fifo[0][2], _GONE) is not fifo[0][3]:
                fifo.popleft()
        else:
            while fifo and fifo[0][2] not in live:
                fifo.popleft()
        if not added & 63 and len(self) > 2 * len(live):
            self._compact()  # (answered calls behind a live one, or in the heap)

    def stop(self) -> None:
        """Forget every deadline and cancel the timer (the connection is gone).
        References to the owner are dropped too: nothing is called after this."""
        self._fifo = deque()
        self._heap = []
        self._live = {}
        self._on_expired = _nothing
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _matcher(self) -> Callable[[int, object], bool]:
        """Whether an entry's ``(call_id, record)`` still names a live call."""
        live = self._live
        if self._by_record:
            get = live.get
            return lambda call_id, record: get(call_id, _GONE) is record
        return lambda call_id, record: call_id in live

    def _compact(self) -> None:
        alive = self._matcher()
        self._fifo = deque(entry for entry in self._fifo if alive(entry[2], entry[3]))
        self._heap = [entry for entry in self._heap if alive(entry[2], entry[3])]
        heapq.heapify(self._heap)

    def _schedule(self, deadline: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        alive = self._matcher()
        fifo, heap = self._fifo, self._heap
        expired = []
        while fifo and fifo[0][0] <= now:
            _, _, call_id, call = fifo.popleft()
            if alive(call_id, call):
                expired.append(call_id)
        while heap and heap[0][0] <= now:
            _, _, call_id, call = heapq.heappop(heap)
            if alive(call_id, call):
                expired.append(call_id)
        while fifo and not alive(fifo[0][2], fifo[0][3]):
            fifo.popleft()
        while heap and not alive(heap[0][2], heap[0][3]):
            heapq.heappop(heap)
        if fifo or heap:
            first = min(fifo[0][0] if fifo else float("inf"), heap[0][0] if heap else float("inf"))
            self._schedule(first)
        for call_id in expired:
            self._on_expired(call_id)
