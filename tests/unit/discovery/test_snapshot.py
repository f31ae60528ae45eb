"""The discovery snapshot: its file (atomic, corrupt, missing, too large) and the
Health-check gate on a Clock with an in-memory ZooKeeper."""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from examples.user.callee import UserService
from tests.fake_zookeeper import FakeZooKeeper
from twisted_rpc import ClientOptions, ProviderAddress, ZooKeeperRegistry, load_consumer_config
from twisted_rpc.client._config import snapshot_health_check
from twisted_rpc.discovery._kazoo import SUSPENDED
from twisted_rpc.discovery._snapshot import (
    Snapshot,
    decode_snapshot,
    encode_snapshot,
    read_snapshot,
    write_snapshot,
)
from twisted_rpc.ops import NOT_SERVING
from twisted_rpc.testing import MemoryProvider

SERVICE = "example.UserService"
PROVIDERS = f"/mprpc/{SERVICE}/providers"
A, B = ProviderAddress("127.0.0.1", 8000), ProviderAddress("127.0.0.1", 8001, 5, {"pid": 7})


def _messages(logged) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in logged]


# ------------------------------------------------------------------ the file


def test_encode_and_decode_round_trip():
    lists = decode_snapshot(encode_snapshot({SERVICE: (A, B)}))
    assert lists == {SERVICE: (A, B)}
    assert lists[SERVICE][1].weight == 5 and dict(lists[SERVICE][1].data) == {"pid": 7}


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2, "services": {}}',
        b'{"version": 1, "services": []}',
        b'{"version": 1, "services": {"s": [{"host": "bad host", "port": 1}]}}',
        b'{"version": 1, "services": {"s": [{"host": "h", "port": 0}]}}',
        b'{"version": 1, "services": {"s": [{"host": "h", "port": 1, "weight": true}]}}',
        b'{"version": 1, "services": {"s": ["h:1"]}}',
    ],
)
def test_decode_refuses_what_is_not_a_snapshot(raw):
    with pytest.raises(ValueError):
        decode_snapshot(raw)


def test_write_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "snap.json")
    write_snapshot(path, b"one")
    write_snapshot(path, b"two")
    assert open(path, "rb").read() == b"two"
    assert os.listdir(tmp_path) == ["snap.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch):
    path = str(tmp_path / "snap.json")
    write_snapshot(path, b"old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_snapshot(path, b"new")
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["snap.json"]


def test_missing_file_is_quietly_empty(tmp_path, logged):
    assert read_snapshot(str(tmp_path / "none.json")) == {}
    assert not [m for m in _messages(logged) if "snapshot" in m]


def test_corrupt_file_is_ignored_with_a_warning(tmp_path, logged):
    path = tmp_path / "snap.json"
    path.write_bytes(b'{"version": 1, "serv')
    assert read_snapshot(str(path)) == {}
    assert any("is corrupt" in m for m in _messages(logged))


def test_oversized_file_is_ignored_with_a_warning_and_not_read_whole(tmp_path, logged):
    path = tmp_path / "snap.json"
    path.write_bytes(encode_snapshot({SERVICE: (A,)}) + b" " * 100)
    assert read_snapshot(str(path), max_bytes=64) == {}
    assert any("longer than 64 bytes" in m for m in _messages(logged))


def test_oversized_snapshot_is_not_written(tmp_path, logged):
    written = []
    snap = Snapshot(
        Clock(), str(tmp_path / "s.json"), max_bytes=40, writer=lambda p, r: written.append(r)
    )
    snap._answered(SERVICE, (A, B))
    snap.write()
    assert written == []
    assert any("not writing it" in m for m in _messages(logged))


def test_ini_snapshot_is_relative_to_the_ini_file(tmp_path):
    ini = tmp_path / "consumer.ini"
    ini.write_text(
        "[consumer]\nsnapshot = state/snap.json\n[registry]\nkind = zookeeper\nhosts = h:2181\n"
    )
    assert load_consumer_config(str(ini)).snapshot == str(tmp_path / "state" / "snap.json")
    ini.write_text("[consumer]\ntimeout = 1\n")
    assert load_consumer_config(str(ini)).snapshot == ""


# ------------------------------------------------------------------ the gate


class Checks:
    """A health check whose answers the test gives."""

    def __init__(self) -> None:
        self.asked: dict[tuple[str, int], Deferred[bool]] = {}
        self.services: list[str] = []

    def __call__(self, service: str, address: ProviderAddress, timeout: float) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.asked[(address.host, address.port)] = d
        self.services.append(service)
        return d


def make(tmp_path, lists=None, reachable=False):
    path = str(tmp_path / "snap.json")
    if lists is not None:
        write_snapshot(path, encode_snapshot(lists))
    clock = Clock()
    zk = FakeZooKeeper(clock)
    if not reachable:
        zk.state = SUSPENDED  # start() does not connect: ZooKeeper is unreachable
    checks = Checks()
    registry = ZooKeeperRegistry(
        clock, "unused", zk=zk, snapshot=path, health_check=checks, check_timeout=2
    )
    return clock, zk, registry, checks, path


def _provider_node(zk: FakeZooKeeper, port: int) -> None:
    data = json.dumps({"host": "127.0.0.1", "port": port}).encode()
    zk.server_create(f"{PROVIDERS}/127.0.0.1:{port}", data, owner=0x99)


def test_snapshot_providers_are_unused_until_their_check_passes(tmp_path):
    clock, _, registry, checks, _ = make(tmp_path, {SERVICE: (A, B)})
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(1)
    assert seen == [] and registry.providers(SERVICE) == ()
    assert set(checks.asked) == {("127.0.0.1", 8000), ("127.0.0.1", 8001)}
    assert checks.services == [SERVICE, SERVICE]
    checks.asked[("127.0.0.1", 8001)].callback(True)
    assert seen == [(B,)] and registry.providers(SERVICE) == (B,)


def test_a_failing_or_silent_check_keeps_a_provider_out(tmp_path, logged):
    clock, _, registry, checks, _ = make(tmp_path, {SERVICE: (A, B)})
    seen = []
    registry.subscribe(SERVICE, seen.append)
    checks.asked[("127.0.0.1", 8000)].callback(False)  # NOT_SERVING
    clock.advance(2)  # 8001 never answers: cancelled at the check timeout
    assert checks.asked[("127.0.0.1", 8001)].called
    assert seen == [] and registry.providers(SERVICE) == ()
    text = "\n".join(_messages(logged))
    assert "8000 is not serving" in text and "8001 failed its Health check" in text


def test_zookeepers_first_answer_replaces_the_snapshot_list(tmp_path):
    clock, zk, registry, checks, _ = make(tmp_path, {SERVICE: (A, B)})
    seen = []
    registry.subscribe(SERVICE, seen.append)
    checks.asked[("127.0.0.1", 8000)].callback(True)
    assert seen == [(A,)]
    _provider_node(zk, 9000)
    zk.connect(new_session=True)
    clock.advance(0)
    assert [a.port for a in seen[-1]] == [9000]
    assert [a.port for a in registry.providers(SERVICE)] == [9000]
    pending = checks.asked[("127.0.0.1", 8001)]
    assert pending.called  # cancelled: ZooKeeper answered
    count = len(seen)
    clock.advance(5)
    assert len(seen) == count  # no snapshot list after ZooKeeper's


def test_a_check_passing_after_zookeeper_answered_is_not_used(tmp_path):
    clock, zk, registry, checks, _ = make(tmp_path, {SERVICE: (A,)})
    seen = []
    registry.subscribe(SERVICE, seen.append)
    late = checks.asked[("127.0.0.1", 8000)]
    zk.connect(new_session=True)
    clock.advance(0)
    assert seen == [()]
    assert late.called  # cancelled; answering now changes nothing
    assert registry.providers(SERVICE) == ()


def test_zookeepers_lists_are_written_after_the_delay(tmp_path):
    clock, zk, registry, _, path = make(tmp_path, {"other.Service": (B,)}, reachable=True)
    _provider_node(zk, 9000)
    registry.subscribe(SERVICE, lambda addresses: None)
    clock.advance(0)
    assert read_snapshot(path) == {"other.Service": (B,)}  # not yet
    clock.advance(1)
    assert read_snapshot(path) == {
        "other.Service": (B,),
        SERVICE: (ProviderAddress("127.0.0.1", 9000),),
    }


def test_no_snapshot_file_and_a_reachable_zookeeper_behave_as_before(tmp_path):
    clock, zk, registry, checks, _ = make(tmp_path, None, reachable=True)
    _provider_node(zk, 9000)
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    assert checks.asked == {} and [a.port for a in seen[-1]] == [9000]


def test_close_cancels_checks_and_writes_what_is_pending(tmp_path):
    clock, zk, registry, checks, path = make(tmp_path, {SERVICE: (A,)})
    registry.subscribe("other.Service", lambda addresses: None)
    registry.subscribe(SERVICE, lambda addresses: None)
    zk.connect(new_session=True)
    clock.advance(0)
    registry.close()
    assert read_snapshot(path) == {SERVICE: (), "other.Service": ()}


# ------------------------------------------------------------------ the client's check


def test_the_clients_check_asks_health_about_the_service():

    memory = MemoryProvider([UserService()], builtins=True)
    check = snapshot_health_check(memory.reactor, ClientOptions())
    address = ProviderAddress("127.0.0.1", memory.port)
    assert memory.run(check("example.UserService", address, 2)) is True
    assert memory.run(check("example.Unknown", address, 2)) is False  # SERVICE_UNKNOWN
    memory.health.set("example.UserService", NOT_SERVING)
    assert memory.run(check("example.UserService", address, 2)) is False
