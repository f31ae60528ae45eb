"""The sending half of a provider's streams: :class:`StreamPump` drives a
handler's generator while the consumer's credit lasts, and shares the
connection's turns between its streams (round robin, a slice each, at most
:data:`TURN_BYTES` a turn, what they write going out in one batch)."""

from __future__ import annotations

import inspect
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_rpc.core._codec import HEADER_SIZE
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import InternalError
from twisted_rpc.server._stream_state import _Stream

if TYPE_CHECKING:
    from twisted_rpc.server._listener import ListenerFactory

log = Logger(namespace="twisted_rpc.server")

TURN_BYTES = 256 * 1024
"""Bytes a connection's streams write in one turn of the reactor; then they
wait for the next (and the reactor sends them): however fast a handler
yields, it cannot hold the reactor."""

SLICE_BYTES = 64 * 1024
"""Bytes one stream writes before it lets the next stream waiting on its
connection write (round robin)."""


class StreamPump:
    """Mixed into the call runner (through ``StreamRunner``)."""

    factory: ListenerFactory[Any]
    clock: IReactorTime
    peer: str
    call_label: ClassVar[str]
    write_blocked: bool
    connected: int
    _batch: list[bytes] | None
    _turn_bytes: int
    _turn_waiters: deque[Deferred[None]]
    _turn_timer: bool

    if TYPE_CHECKING:

        def open_batch(self) -> list[bytes]: ...
        def close_batch(self, batch: list[bytes]) -> None: ...
        def _write_message(self, call_id: int, payload: bytes) -> None: ...

    def wrong_result(
        self, call_id: int, info: MethodInfo, did: str, result: object, expected: str = ""
    ) -> InternalError:
        """Log a handler's result of the wrong type (``did``: "returned" or
        "yielded"); the error to end its call with (INTERNAL: the provider's bug)."""
        log.error(
            self.call_label + " {method} from {peer}: handler " + did + " {kind}, "
            "expected {expected}",
            call_id=call_id,
            method=info.full_name,
            peer=self.peer,
            kind=type(result).__name__,
            expected=expected or info.response_class.DESCRIPTOR.full_name,
        )
        return InternalError(message="internal error")

    async def _pump(self, stream: _Stream, source: Any) -> None:
        """Send what ``source`` yields while there is credit; the handler's
        generator is closed however the stream ends."""
        response_class = stream.method.response_class
        call_id = stream.call_id
        write = self._write_message
        clock = self.clock if self.factory.limits.stream_idle_timeout else None
        agen: Any = None
        try:
            anext_ = None
            if hasattr(source, "__aiter__"):
                agen = source.__aiter__()
                anext_ = agen.__anext__
            else:
                agen = iter(source)
            credit = stream.credit
            waiting = self._turn_waiters
            sliced = 0  # bytes written since this stream last waited for its turn
            # A new stream queues behind those waiting on its connection (the
            # streams opened in one read take their turns in order).
            await self._next_turn()
            while not stream.ended:
                if credit.credit <= 0:
                    await credit.wait()
                    continue
                if (
                    self._turn_bytes >= TURN_BYTES
                    or self.write_blocked
                    or (sliced >= SLICE_BYTES and waiting)
                ):
                    await self._next_turn()
                    sliced = 0
                    continue
                if anext_ is not None:
                    try:
                        message = await anext_()
                    except StopAsyncIteration:
                        return
                else:
                    try:
                        message = next(agen)
                    except StopIteration:
                        return
                if stream.ended:
                    return
                if type(message) is not response_class:
                    raise self.wrong_result(call_id, stream.method.info, "yielded", message)
                payload = message.SerializeToString()
                cost = len(payload) + HEADER_SIZE  # message_cost(), inline: per message
                credit.credit -= cost
                stream.sent += 1
                self._turn_bytes += cost
                sliced += cost
                if clock is not None:
                    stream.last_active = clock.seconds()
                write(call_id, payload)
        finally:
            close = getattr(agen, "aclose", None) or getattr(agen, "close", None)
            # (A generator still running is being torn down from inside: the
            # GeneratorExit thrown through it has closed it already.)
            if close is not None and not getattr(agen, "ag_running", False):
                closing = close()
                if inspect.isawaitable(closing):
                    await closing

    def _next_turn(self) -> Deferred[None]:
        """A Deferred firing when this stream may write again: streams queue
        for their turn on the connection, and :meth:`turn_over` lets them
        write one after the other (a slice each) on the reactor's next turn."""
        d: Deferred[None] = Deferred(self._forget_turn)
        self._turn_waiters.append(d)
        if not self._turn_timer:
            self._turn_timer = True
            self.clock.callLater(0, self.turn_over)
        return d

    def _forget_turn(self, d: Deferred[None]) -> None:
        if d in self._turn_waiters:
            self._turn_waiters.remove(d)

    def turn_over(self) -> None:
        """A new turn: let the streams waiting for one write, in order, while
        the turn's bytes last (also called when the write buffer drains).
        What they write goes out in one batch."""
        self._turn_timer = False
        if self.write_blocked or not self.connected:
            return  # the write buffer's drain calls this again
        self._turn_bytes = 0
        waiting = self._turn_waiters
        batch = self.open_batch() if self._batch is None else None
        try:
            while waiting and self._turn_bytes < TURN_BYTES and not self.write_blocked:
                waiting.popleft().callback(None)
        finally:
            if batch is not None:
                self.close_batch(batch)
        if waiting and not self._turn_timer and not self.write_blocked:
            self._turn_timer = True
            self.clock.callLater(0, self.turn_over)
