"""The Channel's one transition table: every (state, event) pair is either
allowed, with its target, or rejected; and the Channel moves only through it."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from twisted_rpc.client import Channel, ChannelEvent, ChannelState, InvalidTransition
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
