"""A provider-published service config: written into its ZooKeeper node,
applied by consumers as the service's default, clamped, taken only from
nodes written under the consumer's auth, never over the consumer's own
entries (see docs/resilience.md, "A config providers publish")."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from tests.fake_zookeeper import FakeZooKeeper
from twisted_rpc import (
    Client,
    ClientOptions,
    ProviderAddress,
    Registration,
    StaticRegistry,
    ZooKeeperRegistry,
)
from twisted_rpc.client import ServiceConfigError
from twisted_rpc.client._service_config import (
    MIN_PUBLISHED_TIMEOUT,
    PublishedConfigs,
    published_entries,
)
from twisted_rpc.core import describe
from twisted_rpc.discovery._kazoo import open_acl

SERVICE = "mprpc.test.EchoService"
OTHER = "example.OtherService"
ECHO_M = describe(ECHO).methods["Echo"]
ASYNC = describe(ECHO).methods["AsyncEcho"]
PROVIDERS = f"/mprpc/{SERVICE}/providers"
AUTH = "digest:provider:secret"


def _retry(**changes: Any) -> dict[str, Any]:
    policy = {
        "maxAttempts": 3,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return {**policy, **changes}


PUBLISHED = {
    "methodConfig": [
        {"name": [{"service": SERVICE, "method": "Echo"}], "timeout": "0.5s"},
        {"name": [{"service": SERVICE}], "timeout": "3s", "retryPolicy": _retry()},
        {"name": [{"service": OTHER}], "timeout": "9s"},
    ]
}


def _address(port: int, published: object = None) -> ProviderAddress:
    data = {} if published is None else {"serviceConfig": published}
    return ProviderAddress("127.0.0.1", port, data=data)


def _client(*addresses: ProviderAddress, **options: Any) -> Client:
    client = Client(MemoryReactorClock(), discovery=StaticRegistry({SERVICE: addresses}), **options)
    client.proxy(ECHO)  # follows the service: the published config is read
    return client


def _timeout(client: Client, method: Any = ECHO_M, default: float | None = None) -> Any:
    config = client.service_config
    return default if config is None else config.timeout_for(method, default)


# ---------------------------------------------------------------- applied


def test_a_published_config_is_the_services_default() -> None:
    seen: list[float | None] = []

    class Record:
        def intercept(self, call: Any, request: Any, proceed: Any) -> Any:
            seen.append(call.timeout)
            return proceed(call, request)

    client = _client(_address(8000, PUBLISHED), timeout=10, interceptors=[Record()])
    assert _timeout(client, ECHO_M, 10) == 0.5
    assert _timeout(client, ASYNC, 10) == 3.0  # the service's entry
    client.call(ECHO_M, echo_pb2.EchoRequest()).addErrback(lambda _: None)
    assert seen == [0.5]
    policy = client._retries.policy_for(ASYNC, False)
    assert policy is not None and policy.max_attempts == 3
    assert client.service_config is not None
    assert client.service_config.policy_for(OTHER, "X") is None  # another service's: not taken


def test_without_a_published_config_nothing_changes() -> None:
    client = _client(_address(8000))
    assert client.service_config is None
    assert client._retries.policy_for(ECHO_M, False) is None


def test_a_new_list_without_the_config_withdraws_it() -> None:
    registry = StaticRegistry({SERVICE: [_address(8000, PUBLISHED)]})
    client = Client(MemoryReactorClock(), discovery=registry, timeout=10)
    route = client._route(SERVICE)
    assert _timeout(client, ECHO_M, 10) == 0.5
    assert client._retries.policy_for(ASYNC, False) is not None
    client._providers_changed(route, SERVICE, [_address(8000)])
    assert _timeout(client, ECHO_M, 10) == 10
    assert client._retries.policy_for(ASYNC, False) is None
    assert ASYNC.route in client._plain  # the fast path is back


def test_the_callers_config_object_is_not_changed() -> None:
    own = ClientOptions(service_config={"methodConfig": []})
    client = _client(_address(8000, PUBLISHED), options=own)
    assert own.service_config is not client.service_config
    assert own.service_config.policy_for(SERVICE, "Echo") is None  # type: ignore[union-attr]
    assert _timeout(client) == 0.5


# ---------------------------------------------------------------- clamped


def test_published_values_are_clamped_to_sane_bounds() -> None:
    greedy = {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": "Echo"}, {}],
                "timeout": "0.001s",
                "retryPolicy": _retry(
                    maxAttempts=100,
                    initialBackoff="0.000001s",
                    maxBackoff="100000s",
                    backoffMultiplier=1000,
                ),
            },
            {
                "name": [{"service": SERVICE, "method": "AsyncEcho"}],
                "hedgingPolicy": {"maxAttempts": 50, "hedgingDelay": "0s"},
            },
        ],
        "retryThrottling": {"maxTokens": 1000, "tokenRatio": 1000},
    }
    echo, hedged = published_entries(SERVICE, greedy)
    assert [(n.service, n.method) for n in echo.names] == [(SERVICE, "Echo")]  # no default {}
    assert echo.timeout == MIN_PUBLISHED_TIMEOUT
    retry = echo.retry_policy
    assert retry is not None
    assert (retry.max_attempts, retry.initial_backoff, retry.max_backoff) == (5, 0.05, 30.0)
    assert retry.backoff_multiplier == 10.0
    assert hedged.hedging_policy is not None
    assert (hedged.hedging_policy.max_attempts, hedged.hedging_policy.hedging_delay) == (5, 0.05)
    client = _client(_address(8000, greedy))
    assert _timeout(client) == MIN_PUBLISHED_TIMEOUT
    assert client._retries.config is not None
    assert client._retries.config.retry_throttling is None  # the budget is not loosened
    assert type(client._retries.budget).__name__ == "WindowBudget"


# ---------------------------------------------------------------- the consumer's wins


def test_the_consumers_own_entries_win_per_method() -> None:
    own = {
        "methodConfig": [
            {"name": [{"service": SERVICE, "method": "Echo"}], "timeout": "2s"},
            {"name": [{}], "timeout": "30s"},
        ]
    }
    client = _client(_address(8000, PUBLISHED), service_config=own)
    assert _timeout(client, ECHO_M) == 2.0  # named by the consumer: its entry, whole
    assert client._retries.policy_for(ECHO_M, False) is None
    assert _timeout(client, ASYNC) == 3.0  # published, over the consumer's default
    assert client.service_config is not None
    assert client.service_config.timeout_for(describe(ECHO).methods["Echo"], None) == 2.0
    service_wide = {"methodConfig": [{"name": [{"service": SERVICE}], "timeout": "4s"}]}
    client = _client(_address(8000, PUBLISHED), service_config=service_wide)
    assert (_timeout(client, ECHO_M), _timeout(client, ASYNC)) == (4.0, 4.0)


# ---------------------------------------------------------------- providers disagree


def _one(port: int) -> dict[str, Any]:
    return {"methodConfig": [{"name": [{"service": SERVICE}], "timeout": f"{port}s"}]}


def test_disagreeing_providers_most_common_wins_ties_to_the_smallest_address() -> None:
    chooser = PublishedConfigs()
    most = [_address(1, _one(1)), _address(2, _one(2)), _address(3, _one(2)), _address(4)]
    assert chooser.choose(SERVICE, most)[0].timeout == 2.0
    tie = [_address(9, _one(9)), _address(5, _one(5)), _address(7, _one(7))]
    assert chooser.choose(SERVICE, tie)[0].timeout == 5.0
    as_text = [_address(6, json.dumps(_one(6))), _address(8, _one(8))]
    assert chooser.choose(SERVICE, as_text)[0].timeout == 6.0


# ---------------------------------------------------------------- bad configs


BAD = [
    "{not json",
    {"methodConfig": [{"name": [{"service": SERVICE}], "timeout": "1ms"}]},
    {"methodConfig": "no"},
    {"unknownKey": 1},
    [1, 2],
    42,
]


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_config_is_refused(bad: object) -> None:
    with pytest.raises(ServiceConfigError):
        published_entries(SERVICE, bad)


def test_a_bad_config_in_a_node_is_ignored_with_one_log_line(logged: list[dict[str, Any]]) -> None:
    registry = StaticRegistry({SERVICE: [_address(8000, "{not json"), _address(8001, _one(1))]})
    client = Client(MemoryReactorClock(), discovery=registry)
    route = client._route(SERVICE)
    for _ in range(3):  # read again and again: logged once
        client._providers_changed(route, SERVICE, registry.providers(SERVICE))
    warnings = [e for e in logged if "ignoring the service config" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["address"] == "127.0.0.1:8000"
    assert _timeout(client) == 1.0  # the good one is used
    assert len(route.channels) == 2  # both providers still serve
    only_bad = [_address(8000, {"methodConfig": [{"name": "x"}]})]
    client._providers_changed(route, SERVICE, only_bad)
    assert _timeout(client) is None
    assert len(route.channels) == 1


# ---------------------------------------------------------------- through ZooKeeper


def _zk(auth: str = "") -> tuple[Clock, FakeZooKeeper, ZooKeeperRegistry]:
    clock = Clock()
    zk = FakeZooKeeper(clock, auth=auth)
    registry = ZooKeeperRegistry(clock, "unused", zk=zk, session_timeout=10)
    registry.start()
    return clock, zk, registry


def _follow(clock: Clock, registry: ZooKeeperRegistry) -> list[tuple[ProviderAddress, ...]]:
    seen: list[tuple[ProviderAddress, ...]] = []
    registry.subscribe(SERVICE, seen.append)
    clock.advance(0)
    return seen


def test_a_provider_node_publishes_only_its_services_entries() -> None:
    clock, zk, registry = _zk()
    address = ProviderAddress("127.0.0.1", 8000)
    registry.register(Registration(SERVICE, address, {"serviceConfig": PUBLISHED}))
    registry.register(Registration("example.Bare", address, {"serviceConfig": PUBLISHED}))
    data = json.loads(zk.nodes[f"{PROVIDERS}/127.0.0.1:8000"][0])
    names = [n for entry in data["serviceConfig"]["methodConfig"] for n in entry["name"]]
    assert {n["service"] for n in names} == {SERVICE}
    assert len(data["serviceConfig"]["methodConfig"]) == 2
    bare = json.loads(zk.nodes["/mprpc/example.Bare/providers/127.0.0.1:8000"][0])
    assert "serviceConfig" not in bare  # nothing of its own to publish
    (listed,) = _follow(clock, registry)[-1]
    assert [e.timeout for e in published_entries(SERVICE, listed.data["serviceConfig"])] == [
        0.5,
        3.0,
    ]


def test_with_auth_a_config_is_taken_only_from_nodes_written_under_it(
    logged: list[dict[str, Any]],
) -> None:
    clock, zk, registry = _zk(AUTH)
    registry.register(
        Registration(SERVICE, ProviderAddress("127.0.0.1", 8000), {"serviceConfig": _one(1)})
    )
    # Another node in the (safe) providers node, its ACL open to all: anyone
    # may have rewritten its data since.
    zk.server_create(
        f"{PROVIDERS}/127.0.0.1:8001",
        json.dumps({"host": "127.0.0.1", "port": 8001, "serviceConfig": _one(7)}).encode(),
        owner=0x77,
        acl=open_acl(),
    )
    listed = {a.port: a for a in _follow(clock, registry)[-1]}
    assert set(listed) == {8000, 8001}  # both still serve
    assert "serviceConfig" in listed[8000].data
    assert "serviceConfig" not in listed[8001].data
    warnings = [e for e in logged if "ignoring the service config" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["acl"] == "world:anyone:cdrw"


def test_without_auth_any_nodes_config_is_taken() -> None:
    clock, zk, registry = _zk()
    zk.server_create(
        f"{PROVIDERS}/127.0.0.1:8001",
        json.dumps({"host": "127.0.0.1", "port": 8001, "serviceConfig": _one(7)}).encode(),
        owner=0x77,
    )
    (listed,) = _follow(clock, registry)[-1]
    assert listed.data["serviceConfig"] == _one(7)


def test_a_changed_published_config_reaches_the_consumer() -> None:
    clock, zk, registry = _zk()
    path = f"{PROVIDERS}/127.0.0.1:8001"
    node = {"host": "127.0.0.1", "port": 8001, "serviceConfig": _one(7)}
    zk.server_create(path, json.dumps(node).encode(), owner=0x77)
    seen = _follow(clock, registry)
    zk.set(path, json.dumps({**node, "serviceConfig": _one(8)}).encode())
    clock.advance(1)
    assert [a.data["serviceConfig"] for a in seen[-1]] == [_one(8)]
    assert len(seen) == 2
