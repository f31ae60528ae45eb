"""ZooKeeperRegistry logic on a Clock with an in-memory ZooKeeper (see fake_zookeeper.py)."""

from __future__ import annotations

import json

import pytest
from kazoo.security import Permissions
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tests.fake_zookeeper import FakeZooKeeper
from twisted_rpc import (
    IServiceDiscovery,
    IServiceRegistry,
    ProviderAddress,
    Registration,
    ZooKeeperRegistry,
)
from twisted_rpc.discovery._kazoo import digest_acls

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


def test_a_watch_firing_after_close_schedules_no_read():
    # (A watch or a read's end that comes after close must leave no timer:
    # the reactor would be unclean.)
    clock, zk, registry = make()
    registry.subscribe(SERVICE, lambda addresses: None)
    clock.advance(0)
    follower = registry._follower
    (watched,) = follower._watched.values()
    registry.close()
    follower._read_soon(watched)  # what a late children watch, or a read's end, does
    assert [c for c in clock.getDelayedCalls() if c.func.__name__ == "_read"] == []


# ----------------------------------------------------------------- hardening


def test_unregister_all_leaves_a_node_another_session_holds():
    """A standby for an mprpc method must not delete the live provider's node."""
    _, zk, registry = make()
    zk.server_create("/UserServiceRpc/Login", b"10.0.0.9:8000", owner=0x77)
    registry.register_cpp("UserServiceRpc", "Login", ProviderAddress("127.0.0.1", 9000))
    registry.register(registration())
    assert zk.nodes["/UserServiceRpc/Login"] == (b"10.0.0.9:8000", 0x77)  # standing by
    registry.unregister_all()
    assert zk.nodes["/UserServiceRpc/Login"] == (b"10.0.0.9:8000", 0x77)
    assert f"{PROVIDERS}/127.0.0.1:8000" not in zk.nodes  # its own node is gone


def test_unregister_all_deletes_its_own_node_even_after_a_change():
    _, zk, registry = make()
    registry.register(registration())
    path = f"{PROVIDERS}/127.0.0.1:8000"
    zk.set(path, b"{}")  # the registry sets its data back: version 2
    version = zk.versions[path]
    deletes = []
    delete = zk.delete

    def recorded(p, version=-1):
        deletes.append((p, version))
        return delete(p, version)

    zk.delete = recorded
    registry.unregister_all()
    assert path not in zk.nodes
    assert version == 2 and deletes == [(path, version)]  # only that version of the node


def test_unregister_all_looks_again_when_the_node_changed_meanwhile():
    _, zk, registry = make()
    registry.register(registration())
    path = f"{PROVIDERS}/127.0.0.1:8000"
    exists = zk.exists
    changed = []

    def exists_then_change(p, watch=None):
        d = exists(p, watch)
        if p == path and not changed:
            changed.append(p)
            zk.set(path, b"{}")  # between the read and the delete
        return d

    zk.exists = exists_then_change
    registry.unregister_all()
    assert changed and path not in zk.nodes


def test_without_auth_created_nodes_grant_admin_to_nobody():
    _, zk, registry = make()
    registry.register(registration())
    registry.register_cpp("UserServiceRpc", "Login", ProviderAddress("127.0.0.1", 9000))
    for path in (
        "/mprpc",
        f"/mprpc/{SERVICE}",
        PROVIDERS,
        f"{PROVIDERS}/127.0.0.1:8000",
        "/UserServiceRpc",
        "/UserServiceRpc/Login",
    ):
        (acl,) = zk.acls[path]
        assert (acl.id.scheme, acl.id.id) == ("world", "anyone")
        assert acl.perms == Permissions.ALL & ~Permissions.ADMIN, path


AUTH = "digest:provider:secret"


def make_secured():
    clock = Clock()
    zk = FakeZooKeeper(clock, auth=AUTH)
    registry = ZooKeeperRegistry(clock, "unused", zk=zk, session_timeout=10)
    registry.start()
    return clock, zk, registry


def test_with_auth_parents_get_the_digest_acl_and_world_only_reads():
    _, zk, registry = make_secured()
    registry.register(registration())
    for path in ("/mprpc", f"/mprpc/{SERVICE}", PROVIDERS, f"{PROVIDERS}/127.0.0.1:8000"):
        assert zk.acls[path] == zk.acl
        world = [a for a in zk.acls[path] if a.id.scheme == "world"]
        assert [a.perms for a in world] == [Permissions.READ]


def test_with_auth_a_squatted_parent_is_refused_once_and_others_still_register(logged):
    clock, zk, registry = make_secured()
    other = "example.OtherService"
    registry.register(Registration(other, ProviderAddress("127.0.0.1", 8000), {}))
    # An anonymous client created the service's nodes first, open to all.
    zk.server_create(f"{PROVIDERS}/decoy:1", b"{}", owner=0x66)
    registry.register(registration())
    assert f"{PROVIDERS}/127.0.0.1:8000" not in zk.nodes
    assert f"/mprpc/{other}/providers/127.0.0.1:8000" in zk.nodes  # not affected
    errors = [e for e in logged if "not registering" in e.get("log_format", "")]
    assert len(errors) == 1
    assert errors[0]["parent"] == f"/mprpc/{SERVICE}"
    assert errors[0]["acl"] == "world:anyone:cdrw"
    clock.advance(30 * 3)  # checked again, not logged again
    assert len([e for e in logged if "not registering" in e.get("log_format", "")]) == 1
    # The operator fixes the ACLs: the next check registers.
    for path in ("/mprpc", f"/mprpc/{SERVICE}", PROVIDERS):
        zk.acls[path] = list(zk.acl)
    clock.advance(30)
    assert zk.nodes[f"{PROVIDERS}/127.0.0.1:8000"][1] == zk.session_id


def test_with_auth_a_parent_writable_by_another_identity_is_refused():
    _, zk, registry = make_secured()
    squatter, _ = digest_acls("digest:mallory:x")
    zk.server_create(f"{PROVIDERS}/decoy:1", b"{}", owner=0x66, parent_acl=squatter)
    zk.acls["/mprpc"] = list(zk.acl)
    registry.register(registration())
    assert f"{PROVIDERS}/127.0.0.1:8000" not in zk.nodes


def test_with_auth_a_consumer_ignores_providers_others_may_write(logged):
    clock, zk, registry = make_secured()
    _provider_node(zk, 8000)  # parents open to all
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    assert seen == [()]
    assert len([e for e in logged if "not using the providers" in e.get("log_format", "")]) == 1
    for path in ("/mprpc", f"/mprpc/{SERVICE}", PROVIDERS):
        zk.acls[path] = list(zk.acl)
    _provider_node(zk, 8001)
    clock.advance(0.05)
    assert [a.port for a in seen[-1]] == [8000, 8001]


def test_with_auth_a_consumer_ignores_persistent_provider_nodes():
    clock, zk, registry = make_secured()
    registry.register(registration(8000))
    zk.server_create(f"{PROVIDERS}/127.0.0.1:8001", b"", owner=0)
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    assert [a.port for a in seen[-1]] == [8000]


BAD_NODES = {
    "garbage": b"\xff\x00 not json",  # neither JSON nor a host:port name
    "[::1]:8001": json.dumps({"host": "::1", "port": 8001}).encode(),  # fine: IPv6
    "127.0.0.1:70000": json.dumps({"host": "127.0.0.1", "port": 70000}).encode(),
    "127.0.0.1:0": b"not json",  # port 0 in the name
    "spaces:1": json.dumps({"host": "evil host", "port": 1}).encode(),
    "inf:1": b'{"host": "10.0.0.1", "port": 1, "weight": Infinity}',
    "str-port:1": json.dumps({"host": "10.0.0.1", "port": "1"}).encode(),
    "bool-port:1": json.dumps({"host": "10.0.0.1", "port": True}).encode(),
    "deep": b"[" * 5000 + b"]" * 5000,
    "huge:1": json.dumps({"host": "10.0.0.2", "port": 1, "pad": "x" * 20000}).encode(),
    "list": b"[1, 2]",
}


def test_bad_nodes_are_skipped_with_a_warning_and_the_others_listed(logged):
    clock, zk, registry = make()
    _provider_node(zk, 8000)
    for name, data in BAD_NODES.items():
        zk.server_create(f"{PROVIDERS}/{name}", data, owner=0x99)
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    assert [(a.host, a.port) for a in seen[-1]] == [("127.0.0.1", 8000), ("::1", 8001)]
    warned = {e["name"] for e in logged if e.get("log_format", "").startswith("ignoring")}
    assert warned == set(BAD_NODES) - {"[::1]:8001"}
    # Skipped nodes are not read (nor warned about) again on the next change.
    before = zk.requests
    _provider_node(zk, 8002)
    clock.advance(0.05)
    assert sorted(a.port for a in seen[-1]) == [8000, 8001, 8002]
    assert zk.requests - before == 1 + 1
    assert len([e for e in logged if e.get("log_format", "").startswith("ignoring")]) == len(warned)


def test_a_failing_listener_does_not_stop_the_others_or_the_watch(logged):
    clock, zk, registry = make()
    _provider_node(zk, 8000)

    def broken(addresses):
        raise ValueError("unusable address")

    seen = []
    registry.subscribe(SERVICE, broken)
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    _provider_node(zk, 8001)
    clock.advance(0.05)
    assert [a.port for a in seen[-1]] == [8000, 8001]
    assert any("listener failed" in e.get("log_format", "") for e in logged)


def test_a_service_with_too_many_nodes_is_listed_up_to_the_cap(logged):
    clock = Clock()
    zk = FakeZooKeeper(clock)
    registry = ZooKeeperRegistry(clock, "unused", zk=zk, max_providers=50)
    registry.start()
    _provider_node(zk, 8000)
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    for port in range(9000, 9200):
        _provider_node(zk, port)
    clock.advance(0.05)
    ports = [a.port for a in seen[-1]]
    assert len(ports) == 50 and 8000 in ports  # the known provider is kept
    assert any("skipping the rest" in e.get("log_format", "") for e in logged)


def test_registry_limits_must_be_positive():
    for kw in ({"max_providers": 0}, {"max_node_data": 0}):
        with pytest.raises(ValueError, match="positive"):
            ZooKeeperRegistry(Clock(), "unused", zk=FakeZooKeeper(Clock()), **kw)


def test_a_node_gone_while_read_is_read_again_when_it_comes_back():
    clock, zk, registry = make()
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    get = zk.get

    def get_after_delete(path, watch=None):
        if path == f"{PROVIDERS}/127.0.0.1:8000" and path in zk.nodes:
            zk.server_delete(path)  # gone between the children read and the data read
        return get(path, watch)

    zk.get = get_after_delete
    _provider_node(zk, 8000)
    clock.advance(0.05)
    zk.get = get
    _provider_node(zk, 8000)
    clock.advance(0.05)
    assert [a.port for a in seen[-1]] == [8000]


def test_a_skipped_node_is_read_again_once_it_changes(logged):
    """A bad node replaced by a good one under the same name (its data set,
    or deleted and created again within one debounce) is used then."""
    clock, zk, registry = make()
    path = f"{PROVIDERS}/127.0.0.1:8000"
    zk.server_create(path, b'{"host": "127.0.0.1", "port": 0}', owner=0x99)
    seen = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    assert seen == [] or list(seen[-1]) == []
    zk.set(path, json.dumps({"host": "127.0.0.1", "port": 8000}).encode())
    clock.advance(0.05)
    assert [a.port for a in seen[-1]] == [8000]
