"""Several connections to one provider (issue 18, item 1, consumer side):
``connections_per_provider``, pools of channels, one per worker.

Providers here are in memory (iosim): their connections report ``workers``
and a ``worker`` id in their settings as a provider of several worker
processes does; which worker a connection lands on is the test's choice
(the kernel's, for a real one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred, succeed

from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import result
from twisted_rpc import (
    Channel,
    Client,
    ClientOptions,
    ConfigError,
    ProviderAddress,
    load_consumer_config,
)
from twisted_rpc.client import ChannelState
from twisted_rpc.client._pool import MAX_WORKER_REDIALS, Pool
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.server import ServerConnection
from twisted_rpc.testing import MemoryProvider

SERVICE = "mprpc.test.EchoService"


def _workers(memory: MemoryProvider, workers: int | None, ids: Iterator[str]) -> list[str]:
    """Make ``memory``'s connections report ``workers`` and the next of
    ``ids`` as their worker; returns the ids handed out, in order."""
    given: list[str] = []

    class WorkerConnection(ServerConnection):
        def local_settings(self) -> dict[str, str]:
            settings = super().local_settings()
            if workers is not None:
                settings["workers"] = str(workers)
            worker = self.__dict__.setdefault("worker", next(ids))
            given.append(worker)
            settings["worker"] = worker
            return settings

    memory.factory.protocol = WorkerConnection
    return given


def _provider(
    workers: int | None, ids: Iterator[str], **options: object
) -> tuple[MemoryProvider, list[str]]:
    memory = MemoryProvider([EchoService()], client_options=ClientOptions(**options))  # type: ignore[arg-type]
    return memory, _workers(memory, workers, ids)


def _settle(memory: MemoryProvider, seconds: float = 0.0) -> None:
    for _ in range(20):
        memory.flush()
    if seconds:
        for _ in range(round(seconds / 0.05)):
            memory.advance(0.05)
            memory.flush()


def _route(client: Client):
    return client._routes[SERVICE]


def _call(memory: MemoryProvider, delay: float = 0.0) -> Deferred:
    echo = memory.proxy(ECHO)
    return echo.AsyncEcho(echo_pb2.EchoRequest(payload=b"x", delay=delay), timeout=10)


def _cycle(*names: str) -> Iterator[str]:
    while True:
        yield from names


def _worker_of(channel: Channel) -> str:
    assert channel.protocol is not None and channel.protocol.peer_settings is not None
    return channel.protocol.peer_settings["worker"]


def test_auto_opens_a_connection_per_worker_its_settings_report():
    memory, _ = _provider(3, _cycle("w1", "w2", "w3"))
    assert result(_ready(memory, _call(memory))).payload == b"x"
    (pool,) = _route(memory.client).pools
    assert _route(memory.client).channels == (pool,)  # the balancer sees one provider
    assert len(memory.client.channels) == 3 and len(pool.members) == 3
    assert all(m.state == ChannelState.READY for m in pool.members)
    assert sorted(_worker_of(m) for m in pool.members) == ["w1", "w2", "w3"]


def _ready(memory: MemoryProvider, d: Deferred) -> Deferred:
    _settle(memory)
    return d


def test_auto_with_no_workers_reported_keeps_one_plain_channel():
    memory = MemoryProvider([EchoService()])  # settings without workers
    assert result(_ready(memory, _call(memory))).payload == b"x"
    (channel,) = memory.client.channels.values()
    assert _route(memory.client).channels == (channel,)  # no pool on the call's path
    assert type(channel) is Channel


def test_a_fixed_count_opens_that_many_connections_whatever_is_reported():
    memory, _ = _provider(None, _cycle("w1", "w2", "w3", "w4"), connections_per_provider=4)
    result(_ready(memory, _call(memory)))
    (pool,) = _route(memory.client).pools
    assert len(pool.members) == 4 and all(m.ready for m in pool.members)
    one, _ = _provider(3, _cycle("w1", "w2", "w3"), connections_per_provider=1)
    result(_ready(one, _call(one)))
    assert len(one.client.channels) == 1  # 1: never more, whatever the provider says


def test_a_connection_landing_on_a_worker_another_holds_is_dialled_again():
    # The kernel gives the second connection to w1 again: it is redialled, lands on w2.
    memory, given = _provider(2, iter(["w1", "w1", "w2"]))
    result(_ready(memory, _call(memory)))
    _settle(memory, 1.0)
    (pool,) = _route(memory.client).pools
    assert sorted(_worker_of(m) for m in pool.members) == ["w1", "w2"]
    assert given == ["w1", "w1", "w2"]  # one connection more than workers
    assert all(m.ready for m in pool.members)


def test_no_call_is_given_to_a_connection_dialled_again_for_a_distinct_worker():
    memory, given = _provider(2, iter(["w1", "w1", "w2"]))
    first = _call(memory)
    (pool,) = _route(memory.client).pools
    calls: list[Deferred] = []
    ready = pool._member_ready

    def then_call(channel: Channel, protocol: object) -> None:
        ready(channel, protocol)  # type: ignore[arg-type]
        calls.extend(_call(memory) for _ in range(4))  # at once, as a busy caller does

    pool._member_ready = then_call  # type: ignore[method-assign]
    _settle(memory, 1.0)
    assert given == ["w1", "w1", "w2"]
    assert [result(d).payload for d in [first, *calls]] == [b"x"] * 9


def test_redials_for_a_distinct_worker_are_bounded_then_the_connection_is_kept():
    memory, given = _provider(2, _cycle("w1"))  # every connection lands on w1
    result(_ready(memory, _call(memory)))
    _settle(memory, 5.0)  # past the backoff of every redial
    (pool,) = _route(memory.client).pools
    assert len(given) == 2 + MAX_WORKER_REDIALS
    assert all(m.ready for m in pool.members)  # kept: both still serve
    calls = [_call(memory, 0.1) for _ in range(4)]
    _settle(memory, 0.2)
    assert [result(d).payload for d in calls] == [b"x"] * 4


def test_calls_spread_over_the_connections_least_outstanding_first():
    memory, _ = _provider(3, _cycle("w1", "w2", "w3"))
    result(_ready(memory, _call(memory)))
    calls = [_call(memory, 1.0) for _ in range(9)]
    _settle(memory)
    (pool,) = _route(memory.client).pools
    assert [m.load for m in pool.members] == [3, 3, 3]
    _settle(memory, 1.1)
    assert [result(d).payload for d in calls] == [b"x"] * 9


def test_one_connection_lost_keeps_the_provider_in_rotation_and_is_redialled():
    memory, _ = _provider(3, _cycle("w1", "w2", "w3"))
    result(_ready(memory, _call(memory)))
    (pool,) = _route(memory.client).pools
    lost = pool.members[1]
    assert lost.protocol is not None
    lost.protocol.transport.loseConnection()
    memory.flush()
    assert lost.protocol is None  # lost (and redialling)
    assert pool.ready  # the others serve
    calls = [_call(memory) for _ in range(4)]
    _settle(memory)
    assert [result(d).payload for d in calls] == [b"x"] * 4
    _settle(memory, 1.0)
    assert all(m.ready for m in pool.members) and len(pool.members) == 3


def test_a_duplicate_with_calls_in_flight_is_replaced_and_its_calls_finish():
    # w2's connection is busy when the primary comes back on w2 too (as after
    # a worker's restart): the busy one is replaced and retired, not cut.
    memory, given = _provider(2, iter(["w1", "w2", "w2", "w1"]))
    result(_ready(memory, _call(memory)))
    (pool,) = _route(memory.client).pools
    primary, busy = pool.members
    primary.protocol.transport.loseConnection()
    memory.flush()
    calls = [_call(memory, 2.0) for _ in range(3)]  # all on the busy one
    _settle(memory)
    assert busy.load == 3
    _settle(memory, 1.0)  # the primary redials, lands on w2
    assert given == ["w1", "w2", "w2", "w1"]
    assert pool.members[0] is primary and pool.members[1] is not busy
    assert sorted(_worker_of(m) for m in pool.members) == ["w1", "w2"]
    assert busy not in memory.client.channels.values()
    _settle(memory, 1.1)
    assert [result(d).payload for d in calls] == [b"x"] * 3  # none cut


def test_calls_a_shutdown_sends_back_go_to_another_provider_not_a_sibling_connection():
    memory, _ = _provider(2, _cycle("w1", "w2"))
    result(_ready(memory, _call(memory)))
    client = memory.client
    (pool,) = _route(client).pools
    member = pool.members[1]
    assert client._face_of(member) is pool
    tried: list[list[object]] = []
    client._resend_elsewhere = lambda route, t, call, error: tried.append(list(t))  # type: ignore[method-assign]
    call = (Deferred(), SimpleNamespace(service=SERVICE))
    client._resend(member, GoawayReason.SHUTDOWN, [call])  # type: ignore[list-item]
    assert tried == [[pool]]  # every connection to that provider excluded


class _Nodes:
    """A discovery whose list (with node data) the test sets."""

    def __init__(self, data: dict[str, object]) -> None:
        self.data = data
        self.listeners: list[Callable[[list[ProviderAddress]], None]] = []

    def subscribe(self, service, callback):
        self.listeners.append(callback)
        callback(self.addresses())
        return lambda: None

    def addresses(self) -> list[ProviderAddress]:
        return [ProviderAddress("127.0.0.1", MemoryProvider.port, data=dict(self.data))]

    def set(self, **data: object) -> None:
        self.data = data
        for listener in self.listeners:
            listener(self.addresses())

    def close(self) -> Deferred:
        return succeed(None)


def test_auto_follows_the_workers_its_node_says():
    memory = MemoryProvider([EchoService()])  # its settings say nothing of workers
    nodes = _Nodes({"workers": 2})
    client = memory.client = Client(memory.reactor, discovery=nodes)
    result(_ready(memory, _call(memory)))
    (pool,) = _route(client).pools
    assert len(pool.members) == 2 and all(m.ready for m in pool.members)
    nodes.set(workers=3)
    _settle(memory)
    assert len(pool.members) == 3 and all(m.ready for m in pool.members)
    assert _route(client).channels == (pool,)
    nodes.set(workers=1)
    _settle(memory)
    (channel,) = client.channels.values()
    assert _route(client).channels == (channel,) and channel is pool.members[0]
    memory.advance(0.6)  # the retired connections had no calls: closed
    assert len(memory.factory.connections) == 1


def test_a_pool_picks_the_least_loaded_ready_connection():
    memory, _ = _provider(2, _cycle("w1", "w2"))
    result(_ready(memory, _call(memory)))
    (pool,) = _route(memory.client).pools
    first, second = pool.members
    assert isinstance(pool, Pool)
    _call(memory, 1.0)
    _settle(memory)
    loaded = first if first.load else second
    idle = second if loaded is first else first
    assert pool.load == 1 and [pool.pick() for _ in range(3)] == [idle] * 3


def test_calls_made_one_at_a_time_take_the_idle_connections_in_turn():
    memory, _ = _provider(3, _cycle("w1", "w2", "w3"))
    result(_ready(memory, _call(memory)))
    (pool,) = _route(memory.client).pools
    before = [m.protocol._next_id for m in pool.members if m.protocol]
    for _ in range(6):  # each answered before the next is made
        d = _call(memory)
        _settle(memory)
        assert result(d).payload == b"x"
    after = [m.protocol._next_id for m in pool.members if m.protocol]
    assert [b - a for a, b in zip(before, after, strict=True)] == [2, 2, 2]


def test_looking_at_a_pool_does_not_take_its_turn():
    # The balancer's cost and the channel-like properties only look: the
    # calls still take the idle connections in turn.
    memory, _ = _provider(3, _cycle("w1", "w2", "w3"))
    result(_ready(memory, _call(memory)))
    (pool,) = _route(memory.client).pools
    turn = pool._turn
    for _ in range(5):
        assert pool.state and pool.last_error == "" and pool.protocol is not None
    assert pool._turn == turn
    pool.pick()  # a call's pick takes the next turn
    assert pool._turn == (turn + 1) % 3


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (65, ValueError), ("many", TypeError), (True, TypeError), (2.0, TypeError)],
)
def test_connections_per_provider_is_checked(value, error):
    with pytest.raises(error):
        ClientOptions(connections_per_provider=value)


def test_connections_per_provider_from_an_ini_file(tmp_path):
    ini = tmp_path / "c.ini"
    ini.write_text("[consumer]\nconnections_per_provider = 4\n")
    assert load_consumer_config(str(ini)).options.connections_per_provider == 4
    ini.write_text("[consumer]\nconnections_per_provider = auto\n")
    assert load_consumer_config(str(ini)).options.connections_per_provider == "auto"
    assert ClientOptions().connections_per_provider == "auto"
    for bad in ("lots", "0", "100"):
        ini.write_text(f"[consumer]\nconnections_per_provider = {bad}\n")
        with pytest.raises(ConfigError, match="connections_per_provider"):
            load_consumer_config(str(ini))
