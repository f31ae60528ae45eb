"""The states of a :class:`twisted_rpc.client.Channel` and its one
transition table.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

__all__ = [
    "DIALLING",
    "TRANSITIONS",
    "ChannelEvent",
    "ChannelState",
    "ConnectionState",
    "InvalidTransition",
    "transition",
]


class ChannelState(StrEnum):
    """The states of a :class:`Channel` (equal to their names as text).

    - ``idle``: no connection and none wanted yet; a call dials.
    - ``queued``: waiting for the client's dial slot (``max_concurrent_dials``).
    - ``connecting``: TCP (and TLS) connection under way.
    - ``proving``: connected, the first PING sent: a connection takes calls
      only once it has answered a frame (within connect_timeout), so a port
      that accepts and says nothing, or speaks something else, never does.
    - ``ready``: proven; calls go to ``protocol``.
    - ``failed``: the last attempt failed (refused, lost or closed before it
      was proven, no answer to keepalive pings, lost again soon after a
      prompt redial, or the provider shut down); calls fail at once with
      UNAVAILABLE until the redial, which waits ``backoff(failures)``.
    - ``backoff``: a GOAWAY (idle) ended a connection before it had lasted
      ``stable_after``: a failed attempt. Calls wait; after
      ``backoff(failures)`` the channel is idle, and redials if calls wait.
    - ``draining``: GOAWAY (shutdown): out of rotation, calls in flight
      finish; once that connection has closed, ``failed``.
    - ``overloaded``: GOAWAY (overload): out of rotation for
      ``backoff(failures)`` (at least ``overload_pause``), then idle: the
      next call redials.
    - ``refused``: never dialled (the registry entry asks for what this
      client refuses, such as TLS off when the client requires it).
    - ``closed``: final.

    Calls wait for a connection while queued, connecting, proving or in
    backoff (:data:`DIALLING`).
    """

    IDLE = "idle"
    QUEUED = "queued"
    CONNECTING = "connecting"
    PROVING = "proving"
    READY = "ready"
    FAILED = "failed"
    BACKOFF = "backoff"
    DRAINING = "draining"
    OVERLOADED = "overloaded"
    REFUSED = "refused"
    CLOSED = "closed"


class ChannelEvent(StrEnum):
    """What moves a :class:`Channel` from one state to another."""

    DIAL = "dial"
    """A call, the client or the redial timer wants a connection."""
    SLOT = "slot"
    """The dial queue gave the channel a slot: the attempt starts."""
    CONNECTED = "connected"
    """The connection is made: its first PING is sent."""
    PROVEN = "proven"
    """The first PING was answered."""
    FAIL = "fail"
    """A failed attempt: cannot connect, lost or closed before it was proven,
    no answer to keepalive pings, lost again soon after a prompt redial, or
    the connection that said GOAWAY (shutdown) has closed."""
    LOST = "lost"
    """A proven connection was lost: redialled at once (once in a row)."""
    GOAWAY_IDLE = "goaway_idle"
    """GOAWAY (idle) on a connection that had lasted ``stable_after``."""
    GOAWAY_IDLE_EARLY = "goaway_idle_early"
    """GOAWAY (idle) on a connection that had not lasted: a failed attempt."""
    GOAWAY_OVERLOAD = "goaway_overload"
    """GOAWAY (overload)."""
    GOAWAY_SHUTDOWN = "goaway_shutdown"
    """GOAWAY (shutdown, or a reason this client does not know)."""
    PAUSE_OVER = "pause_over"
    """The backoff or overload pause is over."""
    CLOSE = "close"
    """The channel is closed (by its client, or by code)."""


class InvalidTransition(RuntimeError):
    """An event a channel's state has no transition for (a bug, not a peer's doing)."""


_S = ChannelState
_E = ChannelEvent
TRANSITIONS: Mapping[tuple[ChannelState, ChannelEvent], ChannelState] = {
    (_S.IDLE, _E.DIAL): _S.QUEUED,
    (_S.FAILED, _E.DIAL): _S.QUEUED,
    (_S.QUEUED, _E.SLOT): _S.CONNECTING,
    (_S.CONNECTING, _E.CONNECTED): _S.PROVING,
    (_S.CONNECTING, _E.FAIL): _S.FAILED,
    (_S.PROVING, _E.PROVEN): _S.READY,
    (_S.PROVING, _E.FAIL): _S.FAILED,
    (_S.PROVING, _E.GOAWAY_IDLE_EARLY): _S.BACKOFF,
    (_S.PROVING, _E.GOAWAY_OVERLOAD): _S.OVERLOADED,
    (_S.PROVING, _E.GOAWAY_SHUTDOWN): _S.DRAINING,
    (_S.READY, _E.FAIL): _S.FAILED,
    (_S.READY, _E.LOST): _S.IDLE,
    (_S.READY, _E.GOAWAY_IDLE): _S.IDLE,
    (_S.READY, _E.GOAWAY_IDLE_EARLY): _S.BACKOFF,
    (_S.READY, _E.GOAWAY_OVERLOAD): _S.OVERLOADED,
    (_S.READY, _E.GOAWAY_SHUTDOWN): _S.DRAINING,
    (_S.DRAINING, _E.FAIL): _S.FAILED,
    (_S.BACKOFF, _E.PAUSE_OVER): _S.IDLE,
    (_S.OVERLOADED, _E.PAUSE_OVER): _S.IDLE,
    **{(state, _E.CLOSE): _S.CLOSED for state in ChannelState},
}
"""The one transition table of :class:`Channel`: (state, event) -> next
state. A pair not in it is a bug (:class:`InvalidTransition`)."""


def transition(state: ChannelState, event: ChannelEvent) -> ChannelState:
    """The state after ``event`` in ``state``, or InvalidTransition."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise InvalidTransition(f"channel: no transition for {event} in state {state}") from None


DIALLING = frozenset((_S.QUEUED, _S.CONNECTING, _S.PROVING, _S.BACKOFF))
"""States in which calls wait for the connection under way."""


_READY = frozenset((_S.READY, _S.IDLE))


_USABLE = _READY | DIALLING


class ConnectionState(StrEnum):
    """The states of a :class:`twisted_rpc.client.ClientConnection`.

    - ``new``: not connected yet.
    - ``open``: takes calls (``available``).
    - ``goaway``: the provider said GOAWAY: no new calls; the calls it did
      not run were handed back, the others finish, then the connection closes.
    - ``unresponsive``: a keepalive PING went unanswered: the connection is
      aborted, and stays so once lost (its channel backs off).
    - ``closed``: lost or closed.

    new -> open -> (goaway ->) closed; open or goaway -> unresponsive.
    """

    NEW = "new"
    OPEN = "open"
    GOAWAY = "goaway"
    UNRESPONSIVE = "unresponsive"
    CLOSED = "closed"
