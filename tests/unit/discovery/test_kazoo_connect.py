"""kazoo's TCP connect to one ZooKeeper server is bounded by session timeout / servers."""

from __future__ import annotations

from typing import Any

import pytest
from kazoo.handlers import utils
from twisted.internet.task import Clock

from twisted_rpc.discovery._kazoo import ZooKeeperClient


def test_each_server_gets_its_share_of_the_session_timeout(monkeypatch: pytest.MonkeyPatch):
    seen: list[Any] = []
    monkeypatch.setattr(utils, "create_tcp_connection", lambda *a, **kw: seen.append(kw))
    zk = ZooKeeperClient(Clock(), "10.0.0.1:2181,10.0.0.2:2181,10.0.0.3:2181", session_timeout=6)
    handler = zk.kazoo.handler
    # kazoo asks for the whole session timeout (6 s) for one server's TCP connect
    handler.create_connection(address=("10.0.0.1", 2181), timeout=6.0)
    handler.create_connection(address=("10.0.0.1", 2181), timeout=1.0)
    assert [kw["timeout"] for kw in seen] == [2.0, 1.0]


def test_a_single_server_keeps_the_whole_session_timeout(monkeypatch: pytest.MonkeyPatch):
    seen: list[Any] = []
    monkeypatch.setattr(utils, "create_tcp_connection", lambda *a, **kw: seen.append(kw))
    zk = ZooKeeperClient(Clock(), "127.0.0.1:2181", session_timeout=4)
    zk.kazoo.handler.create_connection(address=("127.0.0.1", 2181), timeout=4.0)
    assert seen[0]["timeout"] == 4.0
