"""The Channel's one transition table: every (state, event) pair is either
allowed, with its target, or rejected; and the Channel moves only through it."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from twisted_rpc.client import (
    Channel,
    ChannelEvent,
    ChannelState,
    ConnectionState,
    InvalidTransition,
)
from twisted_rpc.client._states import DIALLING, TRANSITIONS, transition
from twisted_rpc.discovery import ProviderAddress

S, E = ChannelState, ChannelEvent

ALLOWED = {
    (S.IDLE, E.DIAL): S.QUEUED,
    (S.FAILED, E.DIAL): S.QUEUED,
    (S.QUEUED, E.SLOT): S.CONNECTING,
    (S.CONNECTING, E.CONNECTED): S.PROVING,
    (S.CONNECTING, E.FAIL): S.FAILED,
    (S.PROVING, E.PROVEN): S.READY,
    (S.PROVING, E.FAIL): S.FAILED,
    (S.PROVING, E.GOAWAY_IDLE_EARLY): S.BACKOFF,
    (S.PROVING, E.GOAWAY_OVERLOAD): S.OVERLOADED,
    (S.PROVING, E.GOAWAY_SHUTDOWN): S.DRAINING,
    (S.READY, E.FAIL): S.FAILED,
    (S.READY, E.LOST): S.IDLE,
    (S.READY, E.GOAWAY_IDLE): S.IDLE,
    (S.READY, E.GOAWAY_IDLE_EARLY): S.BACKOFF,
    (S.READY, E.GOAWAY_OVERLOAD): S.OVERLOADED,
    (S.READY, E.GOAWAY_SHUTDOWN): S.DRAINING,
    (S.DRAINING, E.FAIL): S.FAILED,
    (S.BACKOFF, E.PAUSE_OVER): S.IDLE,
    (S.OVERLOADED, E.PAUSE_OVER): S.IDLE,
    **{(state, E.CLOSE): S.CLOSED for state in S},
}


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("event", list(E))
def test_every_pair_is_allowed_with_its_target_or_rejected(
    state: ChannelState, event: ChannelEvent
) -> None:
    if (state, event) in ALLOWED:
        assert transition(state, event) is ALLOWED[state, event]
    else:
        with pytest.raises(InvalidTransition, match=f"{event}.*{state}"):
            transition(state, event)


def test_the_table_is_exactly_the_allowed_pairs() -> None:
    assert dict(TRANSITIONS) == ALLOWED


def test_closed_and_refused_are_left_only_by_close() -> None:
    for state in (S.CLOSED, S.REFUSED):
        assert {e for (s, e) in TRANSITIONS if s == state} == {E.CLOSE}


def test_states_equal_their_names_as_text() -> None:
    assert S.READY == "ready" and f"{S.BACKOFF}" == "backoff"
    assert "proving" in DIALLING and "ready" not in DIALLING


def test_a_channel_moves_only_through_the_table() -> None:
    reactor = MemoryReactorClock()
    channel = Channel(reactor, ProviderAddress("127.0.0.1", 1))
    assert channel.state is S.IDLE
    channel.connect()
    assert channel.state is S.CONNECTING  # DIAL then SLOT (no dial queue)
    with pytest.raises(InvalidTransition):
        channel._to(E.PROVEN)  # not proving yet
    assert channel.state is S.CONNECTING
    channel.close()
    assert channel.state is S.CLOSED
    channel.connect()  # no DIAL from closed: nothing happens
    assert channel.state is S.CLOSED and len(reactor.tcpClients) == 1


# ------------------------------------------------------- the connection's state


def _open_connection(**settings):
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twisted_rpc.client import ClientConnection

    clock = Clock()
    connection = ClientConnection(clock, **settings)
    assert connection.state is ConnectionState.NEW and not connection.available
    connection.makeConnection(StringTransport())
    return clock, connection


def test_connection_open_goaway_closed() -> None:
    from twisted_rpc.core import _codec as wire
    from twisted_rpc.core._codec import GoawayReason

    _clock, connection = _open_connection()
    assert connection.state is ConnectionState.OPEN and connection.available
    connection.dataReceived(wire.encode_goaway(0, reason=GoawayReason.SHUTDOWN))
    assert connection.state is ConnectionState.GOAWAY
    assert connection.goaway_received and not connection.available
    assert not connection.keepalive_failed
    connection.connectionLost(Failure(ConnectionDone()))
    assert connection.state is ConnectionState.CLOSED and connection.goaway_received


def test_connection_unresponsive_stays_so_once_lost() -> None:
    clock, connection = _open_connection(
        keepalive_interval=1, keepalive_timeout=1, keepalive_without_calls=True
    )
    clock.advance(1)  # PING sent
    clock.advance(1)  # unanswered: aborted
    assert connection.state is ConnectionState.UNRESPONSIVE and connection.keepalive_failed
    assert not connection.available and connection.transport.disconnecting
    connection.connectionLost(Failure(ConnectionDone()))
    assert connection.state is ConnectionState.UNRESPONSIVE and connection.keepalive_failed


# ------------------------------------------------------------- the fast path


def test_client_call_goes_through_channel_call(monkeypatch) -> None:
    from testbed.protos import echo_pb2
    from twisted_rpc import Client
    from twisted_rpc.core import describe

    service = describe(echo_pb2.DESCRIPTOR.services_by_name["EchoService"])
    method = service.methods["Echo"]
    client = Client(MemoryReactorClock(), providers={service.name: ["127.0.0.1:1"]})
    client._route(service.name)
    (channel,) = client.channels.values()
    _clock, connection = _open_connection()
    channel.state, channel.protocol = S.READY, connection
    seen = []
    real = Channel.call

    def spy(self, *args):
        seen.append(args[4:])
        return real(self, *args)

    monkeypatch.setattr(Channel, "call", spy)
    d = client.call(method, echo_pb2.EchoRequest(payload=b"x"), timeout=1)
    assert seen == [(False,)] and list(connection.outstanding) == [1]
    assert connection.outstanding[1][0] is d
    # Not ready: wait=False answers None at once, and the client fails over.
    connection.connectionLost(Failure(ConnectionDone()))
    assert channel.call(method, echo_pb2.EchoRequest(), 1, None, False) is None


def test_by_default_only_a_connection_with_calls_in_flight_is_pinged() -> None:
    from testbed.echo_service import ECHO
    from testbed.protos import echo_pb2
    from tests.helpers import frames_of
    from twisted_rpc.core import _codec as wire
    from twisted_rpc.core import describe

    clock, connection = _open_connection(keepalive_interval=10, keepalive_timeout=20)
    transport = connection.transport
    transport.clear()
    clock.advance(10)  # idle: no PING, so a provider's idle_timeout can close it
    assert transport.value() == b""
    connection.call(describe(ECHO).methods["Echo"], echo_pb2.EchoRequest())
    transport.clear()
    clock.advance(10)  # a call in flight: PING
    (ping,) = frames_of(transport.value())
    assert ping.kind == wire.PING
    clock.advance(20)  # unanswered: the connection (and the call) is given up
    assert connection.state is ConnectionState.UNRESPONSIVE
    assert transport.disconnecting
