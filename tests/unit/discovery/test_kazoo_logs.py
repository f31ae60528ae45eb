"""kazoo's stdlib logging goes into twisted.logger while a client is open,
never to stderr, and nothing is logged after close()."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher

from twisted_rpc.discovery import _kazoo
from twisted_rpc.discovery._kazoo import ZooKeeperClient


class ThreadlessReactor(Clock):
    """callFromThread runs at once (as the reactor thread would, later)."""

    def __init__(self) -> None:
        super().__init__()
        self.handed_over = 0

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.handed_over += 1
        f(*args, **kw)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[LogEvent]]:
    monkeypatch.setattr(_kazoo, "deferToThread", lambda f: succeed(f()))
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)
    logging.getLogger("kazoo").removeHandler(_kazoo._KAZOO_MODULES)
    _kazoo._KAZOO_MODULES.reactors.clear()


def started(
    monkeypatch: pytest.MonkeyPatch, handlers: list[logging.Handler] | None = None
) -> tuple[ZooKeeperClient, ThreadlessReactor]:
    """A started client in a process whose logging has ``handlers`` at its
    root (none: nobody configured it; pytest's capture set aside)."""
    monkeypatch.setattr(logging.getLogger(), "handlers", handlers or [])
    reactor = ThreadlessReactor()
    client = ZooKeeperClient(reactor, "127.0.0.1:1")  # type: ignore[arg-type]
    for name in ("start_async", "stop", "close"):
        monkeypatch.setattr(client.kazoo, name, lambda: None)
    client.start()
    return client, reactor


def kazoo_events(events: list[LogEvent]) -> list[tuple[str, LogLevel, str]]:
    return [
        (e["log_namespace"], e["log_level"], formatEvent(e))
        for e in events
        if str(e.get("log_namespace", "")).startswith(("kazoo", "twisted_rpc.zookeeper"))
    ]


def test_kazoo_records_become_twisted_log_events_not_stderr(monkeypatch, events, capsys):
    client, reactor = started(monkeypatch)
    client.kazoo.logger.warning("Connection dropped: %s", "socket closed")
    client.kazoo.logger.debug("every packet")  # below INFO: not even handed over
    logging.getLogger("kazoo.client").error("from a kazoo module")
    assert kazoo_events(events) == [
        ("twisted_rpc.zookeeper", LogLevel.warn, "Connection dropped: socket closed"),
        ("kazoo.client", LogLevel.error, "from a kazoo module"),
    ]
    assert reactor.handed_over == 2
    assert capsys.readouterr().err == ""


def test_nothing_after_close(monkeypatch, events, capsys):
    client, reactor = started(monkeypatch)
    client.close()
    client.kazoo.logger.warning("Connection dropped: late")
    logging.getLogger("kazoo.protocol.connection").warning("late too")
    assert kazoo_events(events) == [] and reactor.handed_over == 0
    assert capsys.readouterr().err == ""


def test_a_process_that_configured_logging_keeps_kazoos_module_records(monkeypatch, events):
    started(monkeypatch, [logging.Handler()])
    assert _kazoo._KAZOO_MODULES not in logging.getLogger("kazoo").handlers
