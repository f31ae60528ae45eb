"""Calls a consumer connection holds back at its provider's limit.

A provider announces ``max_calls`` (its ``max_calls_per_connection``) in the
settings of its first PONG. A :class:`twisted_rpc.client.ClientConnection`
then never has more calls and streams in flight than that: a call beyond it
waits here (at most ``[consumer] max_queued_calls`` of them, each within its
deadline, cancellable) and goes out, first come first served, as calls in
flight finish. A provider that announces nothing is sent every call at once.

The hot path pays one comparison: ``call`` compares the calls in flight with
:attr:`HeldCalls.room_limit`, the announced limit while nothing waits and 0
while calls wait (so a new call queues behind them). While calls wait, the
connection's RESPONSE handler is one that sends the next ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from twisted.internet.defer import Deferred, fail

from twisted_rpc.client._calls import NotSentError, TakenBack, _Call, _cancel_call
from twisted_rpc.core._codec import FieldHandler, FrameKind
from twisted_rpc.core._deadlines import DeadlineQueue
from twisted_rpc.core._flow import peer_setting
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import DeadlineExceededError, ResourceExhaustedError, RpcError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from twisted_rpc.client._options import ClientOptions
    from twisted_rpc.client._states import ConnectionState

NO_LIMIT = 2**62
"""The limit of a provider that announces none: every call goes out at once."""


class HeldCalls:
    """The held-back calls of a consumer connection (a mixin of ClientConnection)."""

    max_calls = NO_LIMIT
    """Calls and streams in flight the provider takes on this connection."""
    room_limit = NO_LIMIT
    """What ``call`` compares the calls in flight with: ``max_calls``, or 0
    while calls are held (new ones queue behind them)."""
    _held_seq = 0
    _held_deadlines: DeadlineQueue | None = None

    # The connection's (ClientConnection):
    clock: IReactorTime
    options: ClientOptions
    peer: str
    state: ConnectionState
    outstanding: dict[int, TakenBack]
    streams: dict[int, Any]
    held: OrderedDict[int, TakenBack]
    _handlers: dict[int, FieldHandler]
    _response_received: Callable[..., None]
    _resume: Callable[[TakenBack], RpcError | None]

    def learn_limit(self, settings: Mapping[str, str]) -> None:
        """Take the provider's ``max_calls`` from its first settings."""
        if "max_calls" in settings:
            self.max_calls = self.room_limit = peer_setting(settings, "max_calls", NO_LIMIT)

    def hold_call(
        self,
        method: MethodInfo,
        payload: bytes,
        metadata: Mapping[str, str] | None,
        timeout: float | None,
    ) -> Deferred[Message]:
        """Hold back a new call (its timeout checked): sent when there is room."""
        if len(self.held) >= self.options.max_queued_calls:
            return fail(self.held_full())
        d = _Call(_cancel_call)
        self.keep(
            (d, method, payload, metadata, self.clock.seconds() + timeout if timeout else 0.0)
        )
        return d

    def held_full(self) -> ResourceExhaustedError:
        return ResourceExhaustedError(
            message=f"{self.peer}: {self.max_calls} calls in flight on this connection (the "
            f"provider's max_calls_per_connection) and {len(self.held)} more waiting "
            f"([consumer] max_queued_calls): raise either, or connections_per_provider"
        )

    def keep(self, call: TakenBack) -> None:
        """Put ``call`` at the back of the queue (it may be cancelled, its deadline runs)."""
        seq = self._held_seq = self._held_seq + 1
        d = call[0]
        d.call_id = -seq  # below 0: held, not in flight
        d.holder = self  # type: ignore[assignment]
        held = self.held
        held[seq] = call
        if call[4]:
            deadlines = self._held_deadlines
            if deadlines is None:
                deadlines = DeadlineQueue(self.clock, held, self._held_expired)
                self._held_deadlines = deadlines
            deadlines.add(call[4], seq)
        if len(held) == 1:
            self.room_limit = 0
            self._handlers[FrameKind.RESPONSE] = self._response_then_release

    def hold_taken(self, call: TakenBack) -> RpcError | None:
        """Hold back a call sent again (a GOAWAY's, a shed one); an error if full."""
        if len(self.held) >= self.options.max_queued_calls:
            return self.held_full()
        self.keep(call)
        return None

    def stream_cancelled(self, stream: Any) -> None:
        super().stream_cancelled(stream)  # type: ignore[misc]
        if self.held:
            self.release()

    def _response_then_release(self, *frame: Any) -> None:
        self._response_received(*frame)
        self.release()

    def release(self) -> None:
        """Send the held calls there is room for now (in the order they came)."""
        held = self.held
        # The room is counted again for each: a call whose deadline passed
        # as it waited ends unsent and takes none of it.
        while held and self.max_calls - len(self.outstanding) - len(self.streams) > 0:
            call = held.popitem(last=False)[1]
            call[0].holder = None
            error = self._resume(call)  # None: sent, or ended (its deadline passed)
            if error is not None:
                call[0].errback(error)
        if not held:
            self._held_done()

    def _held_done(self) -> None:
        if self.room_limit == 0:
            self.room_limit = self.max_calls
            if self._handlers.get(FrameKind.RESPONSE) == self._response_then_release:
                self._handlers[FrameKind.RESPONSE] = self._response_received

    def drop_held(self, d: _Call, error: RpcError) -> None:
        """End a held call (cancelled: ``d.call_id`` is minus its place)."""
        call = self.held.pop(-d.call_id, None)
        if call is not None:
            d.holder = None
            d.errback(error)
            if not self.held:
                self._held_done()

    def _held_expired(self, seq: int) -> None:
        call = self.held.get(seq)
        if call is not None:
            self.drop_held(call[0], DeadlineExceededError(message="deadline exceeded"))

    def take_held(self) -> list[TakenBack]:
        """Remove and return every held call (a GOAWAY, a lost connection)."""
        calls = list(self.held.values())
        self.held.clear()
        for call in calls:
            call[0].holder = None
        if self._held_deadlines is not None:
            self._held_deadlines.stop()
            self._held_deadlines = None
        self._held_done()
        return calls

    def fail_held(self) -> None:
        """The connection is lost: its held calls were never sent."""
        for call in self.take_held():
            call[0].errback(NotSentError(message=f"connection to {self.peer} lost before sent"))
