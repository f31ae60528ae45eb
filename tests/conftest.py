"""Shared fixtures: a real ZooKeeper server for the tests that need one."""

from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher

from testbed.zkserver import ZooKeeperCluster


@pytest.fixture(scope="session")
def zookeeper_server():
    """One standalone ZooKeeper for the session (each test uses its own root path)."""
    cluster = ZooKeeperCluster(1).start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def logged():
    """The log events emitted during the test."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
