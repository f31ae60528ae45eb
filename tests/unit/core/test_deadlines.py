"""DeadlineQueue: what an entry of an answered call keeps alive, and reused ids."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock

from twisted_rpc.core._deadlines import DeadlineQueue


class Record:
    """A call's record in its owner's map (weakly referenceable, unlike a tuple)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


def test_answered_calls_records_are_not_kept_by_id_matching_queue():
    """A consumer's records hold the request (to send it again after a GOAWAY):
    once answered, the queue must not keep them alive until their deadline."""
    clock = Clock()
    live: dict[int, Record] = {}
    queue = DeadlineQueue(clock, live, lambda i: None)
    live[0] = Record(b"")  # one call in flight throughout: the entries behind it stay
    queue.add(60.0, 0)
    refs = []
    for call_id in range(1, 61):
        live[call_id] = record = Record(b"x" * 1024)
        refs.append(weakref.ref(record))
        queue.add(60.0, call_id)
        del live[call_id], record  # answered
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert len(queue) == 61  # the entries are there, holding ids only


def test_reused_id_is_not_expired_by_an_earlier_calls_deadline_when_matching_records():
    clock = Clock()
    live: dict[int, Record] = {}
    expired: list[int] = []
    queue = DeadlineQueue(clock, live, expired.append, by_record=True)
    live[7] = Record(b"first")
    queue.add(1.0, 7)
    del live[7]  # answered
    live[7] = Record(b"second")  # the peer reuses the id, with a later deadline
    queue.add(10.0, 7)
    clock.advance(1.0)
    assert expired == []
    clock.advance(9.0)
    assert expired == [7]


def test_id_matching_queue_expires_a_live_call():
    clock = Clock()
    live = {3: Record(b"")}
    expired: list[int] = []
    queue = DeadlineQueue(clock, live, expired.append)
    queue.add(2.0, 3)
    clock.advance(2.0)
    assert expired == [3]


def test_answered_calls_at_the_front_go_as_new_calls_come():
    """Calls answered in order leave the FIFO at every 16th add, matched by id or by record."""
    for by_record in (False, True):
        clock = Clock()
        live: dict[int, Record] = {}
        queue = DeadlineQueue(clock, live, lambda i: None, by_record=by_record)
        for call_id in range(1, 17):
            live[call_id] = Record(b"")
            queue.add(30.0 + call_id, call_id)
            if call_id > 2:
                del live[call_id - 2]  # two in flight at a time
            if call_id == 15:
                assert len(queue._fifo) == 15  # (none gone before the 16th add)
        assert sorted(e[2] for e in queue._fifo) == [14, 15, 16]  # 13 answered ones gone
        del live[15]
        live[16] = Record(b"reused")  # the id names another call now: stale by record only
        for call_id in range(17, 33):
            live[call_id] = Record(b"")
            queue.add(50.0 + call_id, call_id)
        assert queue._fifo[0][2] == (17 if by_record else 16)
        assert len(queue._fifo) == (16 if by_record else 17)
