"""A client's resilience observers (_events.py): optional methods, held weakly,
an observer that raises is logged and the others still told."""

from __future__ import annotations

import gc

from twisted.logger import globalLogPublisher

from twisted_rpc.client._events import Events


class Counts:
    def __init__(self) -> None:
        self.retried: list[tuple[str, int]] = []

    def retried_(self, method: str, code: int) -> None:
        self.retried.append((method, code))


class Told:
    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    def retried(self, *args: object) -> None:
        self.seen.append(args)


class Broken:
    def retried(self, *args: object) -> None:
        raise RuntimeError("broken observer")


def test_observers_are_told_and_one_that_raises_is_logged() -> None:
    events = Events()
    broken, told, silent = Broken(), Told(), Counts()
    for observer in (broken, told, silent, told):  # added twice: told once
        events.add(observer)
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        events("retried", "pkg.S/M", 14)
        events("hedged", "pkg.S/M")  # nobody counts hedges: nothing happens
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert told.seen == [("pkg.S/M", 14)]
    assert silent.retried == []  # it has no such method
    assert any(e.get("log_failure") is not None for e in logged)


def test_observers_are_held_weakly() -> None:
    events = Events()
    told = Told()
    events.add(told)
    events("retried", "pkg.S/M", 14)
    assert told.seen == [("pkg.S/M", 14)]
    del told
    gc.collect()
    events("retried", "pkg.S/M", 14)  # nobody left to tell
    assert [r() for r in events.observers] == [None]  # let go with its owner
