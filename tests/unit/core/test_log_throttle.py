"""LogThrottle: a line at the first event, then at most one per interval with the count."""

from twisted_rpc.core._log_throttle import LogThrottle


def test_events_are_counted_into_one_line_per_interval():
    throttle = LogThrottle(10.0)
    assert throttle.due(100.0) == 1  # the first at once
    assert [throttle.due(t) for t in (101.0, 105.0, 109.9)] == [0, 0, 0]
    assert throttle.due(110.0) == 4  # the three held back and this one
    assert throttle.due(110.5) == 0
    assert throttle.due(200.0) == 2
