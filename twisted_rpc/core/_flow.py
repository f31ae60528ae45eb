"""Per-stream, credit-based flow control, the same on both sides.

Credit is counted in **bytes of MESSAGE frames as they are on the wire**
(the 18-byte header included), so it bounds memory whatever the messages'
sizes, and a stream of empty messages still uses some. A sender may send a
MESSAGE while its credit is above zero, and spends the frame's size (its
credit may go below zero by less than one message: a message larger than
the window still goes, alone). So a receiver holds at most its window plus
one message per stream. The receiver grants credit back (a WINDOW frame) as
the application *takes* messages, in batches of a quarter of the window, not
per message; a paused or slow reader takes nothing, grants nothing, and its
sender waits.

:class:`Inbox` is the receiving half, :class:`SendCredit` the sending half.
This module knows nothing of frames beyond their sizes: the connections
send the WINDOW frames (``grant``) and wake readers (``wake``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred

from twisted_rpc.core._codec import HEADER_SIZE, ProtocolError
from twisted_rpc.core._status import RpcError

__all__ = [
    "DEFAULT_STREAM_WINDOW",
    "MAX_STREAM_WINDOW",
    "MIN_STREAM_WINDOW",
    "Inbox",
    "SendCredit",
    "UNANNOUNCED_WINDOW",
    "check_window",
    "fire_woken",
    "message_cost",
    "peer_setting",
]

DEFAULT_STREAM_WINDOW = 1024 * 1024
"""A consumer's default receive window per stream (bytes)."""
UNANNOUNCED_WINDOW = 64 * 1024
"""The window of a peer whose settings name none (docs/protocol.md)."""
MIN_STREAM_WINDOW = 1024
MAX_STREAM_WINDOW = 2**31 - 1
"""Credit never exceeds this (a WINDOW taking it past is a protocol error)."""


def message_cost(payload_size: int) -> int:
    """Credit a MESSAGE frame of ``payload_size`` bytes of payload spends."""
    return payload_size + HEADER_SIZE


def peer_setting(settings: Mapping[str, str] | None, key: str, default: int) -> int:
    """A whole-number setting a peer sent, within 1 and :data:`MAX_STREAM_WINDOW`
    (``default`` if it sent none, or something that is not a number)."""
    try:
        value = int((settings or {}).get(key, default))
    except ValueError:
        return default
    return max(1, min(value, MAX_STREAM_WINDOW))


def check_window(value: Any, name: str = "stream_window") -> int:
    """``value`` as a window size, or ValueError naming ``name``."""
    if type(value) is not int or not MIN_STREAM_WINDOW <= value <= MAX_STREAM_WINDOW:
        raise ValueError(
            f"{name}: expected a whole number of bytes from {MIN_STREAM_WINDOW} to "
            f"{MAX_STREAM_WINDOW}, got {value!r}"
        )
    return value


class SendCredit:
    """A sender's credit on one stream, and who waits for more."""

    __slots__ = ("credit", "waiter")

    def __init__(self, window: int) -> None:
        self.credit = window
        self.waiter: Deferred[None] | None = None

    def spend(self, cost: int) -> None:
        self.credit -= cost

    def add(self, increment: int) -> None:
        """A WINDOW arrived; raise ProtocolError past :data:`MAX_STREAM_WINDOW`."""
        credit = self.credit + increment
        if credit > MAX_STREAM_WINDOW or increment <= 0:
            raise ProtocolError(f"WINDOW increment {increment} takes credit to {credit}")
        self.credit = credit
        if credit > 0 and self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.callback(None)

    def wait(self) -> Deferred[None]:
        """A Deferred firing once credit is above zero (cancellable)."""
        if self.waiter is None:
            self.waiter = Deferred(self._forget)
        return self.waiter

    def _forget(self, d: Deferred[None]) -> None:
        if self.waiter is d:
            self.waiter = None


_END = object()


class Inbox:
    """The messages received on one stream's direction, until taken.

    ``grant(increment)`` sends a WINDOW frame; ``wake(inbox)`` is asked to
    fire :attr:`waiter` once the received chunk is handled (so a reader
    takes every message of a chunk in one go: no reactor turn and no
    Deferred per message), or None to fire it at once.
    """

    __slots__ = (
        "messages",
        "waiter",
        "window",
        "available",
        "consumed",
        "threshold",
        "grant",
        "wake",
        "ended",
        "error",
        "paused",
        "waking",
        "held",
        "release",
    )

    def __init__(
        self,
        window: int,
        grant: Callable[[int], object],
        wake: Callable[[Inbox], object] | None = None,
    ) -> None:
        self.messages: deque[tuple[Any, int]] = deque()
        self.waiter: Deferred[None] | None = None
        self.window = window
        self.available = window
        """The sender's credit as this side sees it (grants in flight counted)."""
        self.consumed = 0
        """Bytes taken by the application and not granted back yet."""
        self.threshold = max(1, window // 4)
        self.grant = grant
        self.wake = wake
        self.ended = False
        """No more messages will come (those in :attr:`messages` still count)."""
        self.error: RpcError | None = None
        """Why the stream ended, if not cleanly: raised after the last message."""
        self.paused = False
        self.waking = False
        self.held = 0
        """Bytes of the messages held (received, not taken)."""
        self.release: Callable[[int], object] | None = None
        """Told the bytes of each message taken or dropped (an owner's count of
        what its inboxes hold)."""

    def put(self, message: Any, cost: int) -> None:
        """A message arrived; ProtocolError if the sender had no credit."""
        if self.available <= 0:
            raise ProtocolError(
                f"stream message of {cost} bytes sent without credit (window {self.window} bytes)"
            )
        if self.ended:
            return  # the stream ended here already (cancelled, say): dropped
        self.available -= cost
        self.held += cost
        self.messages.append((message, cost))
        if self.waiter is not None:
            self._wake()

    def finish(self, error: RpcError | None = None) -> None:
        """No more messages: the sender ended its direction (``error`` None)
        or the stream ended with ``error`` (taken after the messages held)."""
        if self.ended:
            return
        self.ended = True
        self.error = error
        if self.waiter is not None:
            self._wake()

    def abort(self, error: RpcError) -> None:
        """End now: drop what is held, ``error`` is the next thing taken."""
        self.messages.clear()
        held, self.held = self.held, 0
        if held and self.release is not None:
            self.release(held)
        self.ended = True
        self.error = error
        if self.waiter is not None:
            self._wake()

    def _wake(self) -> None:
        if self.wake is not None:
            if not self.waking:
                self.waking = True
                self.wake(self)
        else:
            self.fire()

    def fire(self) -> None:
        """Fire the waiter (the connection calls this after the chunk)."""
        self.waking = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.callback(None)

    def ready(self) -> bool:
        """Whether :meth:`take` returns at once (a message, the end or an error)."""
        return bool(self.messages) or self.ended

    def take(self) -> Any:
        """The next message; None at a clean end; raise the error at a bad
        one. Call only when :meth:`ready`."""
        messages = self.messages
        if messages:
            message, cost = messages.popleft()
            self.held -= cost
            if self.release is not None:
                self.release(cost)
            consumed = self.consumed + cost
            if consumed >= self.threshold and not self.ended:
                self.available += consumed
                self.consumed = 0
                self.grant(consumed)
            else:
                self.consumed = consumed
            return message
        if self.error is not None:
            raise self.error
        return None

    def wait(self) -> Deferred[None]:
        """A Deferred firing once :meth:`ready` (at once if it is)."""
        d: Deferred[None] = Deferred(self._forget)
        if self.ready():
            d.callback(None)
            return d
        self.waiter = d
        return d

    def _forget(self, d: Deferred[None]) -> None:
        if self.waiter is d:
            self.waiter = None


def fire_woken(owner: Any) -> None:
    """Fire the readers a connection put in its ``_woken`` list while it
    handled a received chunk (see :meth:`Inbox.wake`), and those they wake in
    turn."""
    woken = owner._woken
    while woken:
        owner._woken = []
        for inbox in woken:
            inbox.fire()
        woken = owner._woken
