"""ZooKeeperRegistry logic on a Clock with an in-memory ZooKeeper (see fake_zookeeper.py)."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tests.fake_zookeeper import FakeZooKeeper
from twisted_rpc.interfaces import IServiceDiscovery, IServiceRegistry
from twisted_rpc.registry import ProviderAddress, Registration
from twisted_rpc.zkregistry import ZooKeeperRegistry

SERVICE = "example.UserService"
PROVIDERS = f"/mprpc/{SERVICE}/providers"


def make(start: bool = True):
    clock = Clock()
    zk = FakeZooKeeper(clock)
    registry = ZooKeeperRegistry(clock, "unused", zk=zk, session_timeout=10)
    if start:
        registry.start()
    return clock, zk, registry


def registration(port: int = 8000, weight: int = 100) -> Registration:
    return Registration(SERVICE, ProviderAddress("127.0.0.1", port, weight), {"pid": 1})


def test_interfaces():
    _, _, registry = make(start=False)
    verifyObject(IServiceRegistry, registry)
    verifyObject(IServiceDiscovery, registry)


def test_register_creates_an_ephemeral_node_with_json_data():
    _, zk, registry = make()
    registry.register(registration(weight=5))
    data, owner = zk.nodes[f"{PROVIDERS}/127.0.0.1:8000"]
    assert owner == zk.session_id != 0
    assert json.loads(data) == {"host": "127.0.0.1", "port": 8000, "weight": 5, "pid": 1}
    assert zk.nodes[PROVIDERS][1] == 0  # parents persistent


def test_register_before_connecting_happens_on_connect():
    _, zk, registry = make(start=False)
    registry.register(registration())  # starts the client: the fake connects at once
    assert f"{PROVIDERS}/127.0.0.1:8000" in zk.nodes
    zk.suspend()
    registry.register(registration(8001))
    assert f"{PROVIDERS}/127.0.0.1:8001" not in zk.nodes
    zk.connect()
    assert f"{PROVIDERS}/127.0.0.1:8001" in zk.nodes


def test_deleted_node_is_recreated():
    _, zk, registry = make()
    registry.register(registration())
    zk.delete(f"{PROVIDERS}/127.0.0.1:8000")
    assert f"{PROVIDERS}/127.0.0.1:8000" in zk.nodes
    assert registry.reregistrations == 1


def test_stale_node_of_another_session_is_replaced():
    _, zk, registry = make()
    zk.server_create(f"{PROVIDERS}/127.0.0.1:8000", b"old", owner=0x42)
    registry.register(registration())
    data, owner = zk.nodes[f"{PROVIDERS}/127.0.0.1:8000"]
    assert owner == zk.session_id and data != b"old"


def test_new_session_registers_everything_again():
    _, zk, registry = make()
    registry.register(registration(8000))
    registry.register(registration(8001))
    zk.expire()
    assert not [p for p in zk.nodes if p.startswith(PROVIDERS + "/")]
    zk.connect(new_session=True)
    assert sorted(p for p in zk.nodes if p.startswith(PROVIDERS + "/")) == [
        f"{PROVIDERS}/127.0.0.1:8000",
        f"{PROVIDERS}/127.0.0.1:8001",
    ]
    assert registry.reregistrations == 2


def test_unregister_all_deletes_nodes():
    _, zk, registry = make()
    registry.register(registration())
    registry.unregister_all()
    assert f"{PROVIDERS}/127.0.0.1:8000" not in zk.nodes
    assert registry.registrations == []


def _provider_node(zk: FakeZooKeeper, port: int, weight: int = 100) -> None:
    data = json.dumps({"host": "127.0.0.1", "port": port, "weight": weight}).encode()
    zk.server_create(f"{PROVIDERS}/127.0.0.1:{port}", data, owner=0x99)


def test_consumer_follows_changes_with_one_debounced_read():
    clock, zk, registry = make()
    _provider_node(zk, 8000, weight=3)
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    assert [(a.key, a.weight) for a in seen[-1]] == [("127.0.0.1:8000", 3)]
    before = zk.requests
    for port in (8001, 8002, 8003):
        _provider_node(zk, port)
    clock.advance(0.05)
    assert [a.port for a in seen[-1]] == [8000, 8001, 8002, 8003]
    assert len(seen) == 2
    # one children read (with its watch) plus one data read per new node
    assert zk.requests - before == 1 + 3
    zk.delete(f"{PROVIDERS}/127.0.0.1:8001")
    clock.advance(0.05)
    assert [a.port for a in seen[-1]] == [8000, 8002, 8003]


def test_outage_keeps_the_last_list_and_empty_is_applied_only_when_stable():
    clock, zk, registry = make()
    _provider_node(zk, 8000)
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    zk.suspend()
    clock.advance(30)
    assert [a.port for a in registry.providers(SERVICE)] == [8000]
    # Back with a new session, the providers not re-registered yet: empty list.
    zk.server_delete(f"{PROVIDERS}/127.0.0.1:8000")
    zk.connect(new_session=True)
    clock.advance(0.1)
    assert [a.port for a in registry.providers(SERVICE)] == [8000]
    assert len(seen) == 1
    clock.advance(10)  # the session has now been up for a whole session timeout
    assert registry.providers(SERVICE) == ()
    assert seen[-1] == ()


def test_service_path_created_later_is_noticed():
    clock, zk, registry = make()
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    assert seen == [()]
    _provider_node(zk, 8000)
    clock.advance(0.05)
    assert [a.port for a in seen[-1]] == [8000]


def test_unsubscribe_stops_following():
    clock, zk, registry = make()
    seen = []
    unsubscribe = registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    unsubscribe()
    _provider_node(zk, 8000)
    clock.advance(1)
    assert seen == [()]
