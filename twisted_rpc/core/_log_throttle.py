"""Events logged together, not one line each: :class:`LogThrottle`.

Under load, a line per refused connection or per shed call adds to the load
that caused it. A :class:`LogThrottle` counts the events and says when a line
is due: at the first, then at most one every ``interval`` seconds, carrying
the count since the last line.
"""

from __future__ import annotations

__all__ = ["LogThrottle"]


class LogThrottle:
    """Counts events; :meth:`due` says how many to log in one line now."""

    __slots__ = ("interval", "_logged_at", "_unlogged")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._logged_at: float | None = None
        self._unlogged = 0

    def due(self, now: float) -> int:
        """Count one event at ``now`` (the clock's seconds): the events to
        log in one line now, this one included, or 0 while a line is not due."""
        self._unlogged += 1
        if self._logged_at is not None and now - self._logged_at < self.interval:
            return 0
        count, self._unlogged, self._logged_at = self._unlogged, 0, now
        return count
