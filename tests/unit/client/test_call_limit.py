"""The consumer under its provider's limit of calls per connection: the
provider announces ``max_calls``; calls past it wait (bounded, within their
deadlines, cancellable) and go out as calls finish."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from tests.helpers import failure_of, frames_of, result
from twisted_rpc import ClientOptions, ServerLimits, StatusCode, load_consumer_config
from twisted_rpc.client import ClientConnection
from twisted_rpc.client._held import NO_LIMIT
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._codec import FrameKind
from twisted_rpc.testing import MemoryProvider

ASYNC = describe(ECHO).methods["AsyncEcho"]


def _memory(limit: int, **options: object) -> MemoryProvider:
    return MemoryProvider(
        [EchoService()],
        limits=ServerLimits(max_calls_per_connection=limit),
        client_options=ClientOptions(**options),  # type: ignore[arg-type]
    )


def _connections(memory: MemoryProvider) -> list[ClientConnection]:
    return [c.protocol for c in memory.client.channels.values() if c.protocol is not None]


def _slow(memory: MemoryProvider, n: int, **kw: object) -> list:
    echo = memory.proxy(ECHO)
    return [
        echo.AsyncEcho(echo_pb2.EchoRequest(delay=1, payload=b"%d" % i), **kw) for i in range(n)
    ]


def test_1500_calls_to_a_provider_taking_1000_per_connection_all_succeed():
    memory = _memory(1000, connections_per_provider=1)
    calls = _slow(memory, 1500)
    memory.flush()
    (connection,) = _connections(memory)
    assert connection.max_calls == 1000
    assert memory.factory.calls_in_flight == 1000
    assert (len(connection.outstanding), len(connection.held)) == (1000, 500)
    memory.advance(1)  # the first 1000 answered, the 500 held went out as they were
    assert memory.factory.calls_in_flight == 500 and not connection.held
    memory.advance(1)
    assert [result(d).payload for d in calls] == [b"%d" % i for i in range(1500)]
    assert connection.room_limit == 1000  # nothing held: new calls go straight out


def test_a_full_queue_fails_naming_both_settings():
    memory = _memory(3, connections_per_provider=1, max_queued_calls=2)
    calls = _slow(memory, 6)
    memory.flush()
    error = failure_of(calls[5])
    assert error.code == StatusCode.RESOURCE_EXHAUSTED
    assert "max_calls_per_connection" in error.message
    assert "max_queued_calls" in error.message
    assert "connections_per_provider" in error.message
    memory.advance(1)
    memory.advance(1)
    assert [result(d).payload for d in calls[:5]] == [b"0", b"1", b"2", b"3", b"4"]


def test_no_queue_at_all_fails_at_once_past_the_limit():
    memory = _memory(2, connections_per_provider=1, max_queued_calls=0)
    calls = _slow(memory, 3)
    memory.flush()
    assert "max_queued_calls" in failure_of(calls[2]).message
    memory.advance(1)
    assert result(calls[0]) and result(calls[1])


def test_held_calls_keep_their_deadline_and_can_be_cancelled():
    memory = _memory(1, connections_per_provider=1)
    echo = memory.proxy(ECHO)
    first = echo.AsyncEcho(echo_pb2.EchoRequest(delay=5))
    timed = echo.AsyncEcho(echo_pb2.EchoRequest(delay=1), timeout=2)
    cancelled = echo.AsyncEcho(echo_pb2.EchoRequest(delay=1))
    last = echo.AsyncEcho(echo_pb2.EchoRequest(delay=1, payload=b"last"))
    memory.flush()
    (connection,) = _connections(memory)
    assert len(connection.held) == 3
    cancelled.cancel()
    assert failure_of(cancelled).code == StatusCode.CANCELLED
    assert len(connection.held) == 2
    memory.advance(2)
    assert failure_of(timed).code == StatusCode.DEADLINE_EXCEEDED
    assert memory.factory.calls_in_flight == 1  # neither was ever sent
    memory.advance(3)
    assert result(first) is not None
    assert memory.factory.calls_in_flight == 1 and not connection.held  # `last` went out
    memory.advance(1)
    assert result(last).payload == b"last"


def test_calls_made_while_others_wait_queue_behind_them():
    memory = _memory(1, connections_per_provider=1)
    echo = memory.proxy(ECHO)
    order: list[bytes] = []

    def record(reply: echo_pb2.EchoReply) -> None:
        order.append(reply.payload)

    def again(reply: echo_pb2.EchoReply) -> None:
        record(reply)
        echo.AsyncEcho(echo_pb2.EchoRequest(delay=1, payload=b"D")).addCallback(record)

    echo.AsyncEcho(echo_pb2.EchoRequest(delay=1, payload=b"A")).addCallback(again)
    for name in (b"B", b"C"):
        echo.AsyncEcho(echo_pb2.EchoRequest(delay=1, payload=name)).addCallback(record)
    memory.flush()
    for _ in range(4):
        memory.advance(1)
    assert order == [b"A", b"B", b"C", b"D"]


def test_a_pool_spreads_calls_over_its_connections_before_holding_any():
    memory = _memory(3, connections_per_provider=2)
    calls = _slow(memory, 6)
    memory.flush()
    calls += _slow(memory, 6)  # (the first ones went out as the connections were made)
    memory.flush()
    connections = _connections(memory)
    assert len(connections) == 2
    assert memory.factory.calls_in_flight == 6
    assert sorted(len(c.held) for c in connections) == [3, 3]
    for _ in range(4):
        memory.advance(1)
    assert all(result(d) for d in calls)


def _connection(
    settings: dict[str, str], **options: object
) -> tuple[ClientConnection, StringTransport]:
    connection = ClientConnection(Clock(), ClientOptions(**options))  # type: ignore[arg-type]
    transport = StringTransport()
    connection.makeConnection(transport)
    connection.settings_received(settings)
    transport.clear()
    return connection, transport


def test_a_provider_announcing_no_limit_is_sent_every_call():
    connection, transport = _connection({"streams": "1"})
    calls = [connection.call(ASYNC, echo_pb2.EchoRequest()) for _ in range(2000)]
    assert connection.max_calls == NO_LIMIT
    assert len(frames_of(transport.value())) == 2000
    assert len(connection.outstanding) == 2000 and not connection.held
    assert not any(d.called for d in calls)


def test_held_calls_fail_not_sent_when_the_connection_is_lost():
    connection, transport = _connection({"max_calls": "1"})
    sent = connection.call(ASYNC, echo_pb2.EchoRequest())
    held = connection.call(ASYNC, echo_pb2.EchoRequest(), timeout=5)
    assert [f.kind for f in frames_of(transport.value())] == [FrameKind.REQUEST]
    connection.connectionLost()
    assert failure_of(sent).code == StatusCode.UNAVAILABLE
    assert "before sent" in failure_of(held).message
    assert connection.clock.getDelayedCalls() == []  # the held deadline's timer stopped


def test_a_goaway_takes_held_calls_back_to_be_sent_again():
    taken: list = []
    connection = ClientConnection(
        Clock(), on_goaway=lambda conn, reason, calls: taken.extend(calls)
    )
    connection.makeConnection(StringTransport())
    connection.settings_received({"max_calls": "1"})
    connection.call(ASYNC, echo_pb2.EchoRequest())
    held = connection.call(ASYNC, echo_pb2.EchoRequest(payload=b"held"))
    connection.dataReceived(wire.encode_goaway(1))
    assert [t[0] for t in taken] == [held] and not connection.held
    assert not held.called


def test_max_queued_calls_is_checked_and_read_from_the_ini(tmp_path: Path):
    assert ClientOptions().max_queued_calls == 10000
    with pytest.raises(ValueError, match="max_queued_calls"):
        ClientOptions(max_queued_calls=-1)
    with pytest.raises(TypeError, match="max_queued_calls"):
        ClientOptions(max_queued_calls="5")  # type: ignore[arg-type]
    path = tmp_path / "consumer.ini"
    path.write_text("[consumer]\nmax_queued_calls = 50\n[providers]\nx = 127.0.0.1:1\n")
    assert load_consumer_config(str(path)).options.max_queued_calls == 50
