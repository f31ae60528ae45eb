"""A consumer's call in flight, as the connections and channels hold it:
its Deferred (:class:`_Call`), what it takes to send it again
(:data:`TakenBack`), and the errors saying it was never run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, cast

from google.protobuf.message import Message
from twisted.internet.defer import Deferred

from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import UnavailableError

MAX_RESENDS = 1
"""Times a call is sent again after a GOAWAY showed it was never run. Past
it the call fails with NotSentError: a provider that says GOAWAY to every
call cannot keep one going round."""


class NotSentError(UnavailableError):
    """UNAVAILABLE before the call was written to any connection: safe to send elsewhere."""


class ShedError(NotSentError):
    """A provider answered the call "not run" (shed): safe to send elsewhere,
    but a retry all the same (it draws from the retry budget)."""


class _Holder(Protocol):
    """What holds a call in flight (a connection, or a parked call)."""

    def _cancel(self, d: _Call, /) -> None: ...


class _Call(Deferred[Message]):
    """A call's Deferred, which knows its call id and who holds it, so
    cancelling it is one lookup.

    ``holder`` is the connection whose outstanding map holds it, or, when a
    GOAWAY took the call back and its channel is dialling, the
    :class:`_Parked` entry that waits for the connection; None in between.
    A call sent again keeps its Deferred: it moves, nothing is chained to it.
    ``resends`` counts the times it was sent again (see MAX_RESENDS).
    """

    __slots__ = ("call_id", "holder")
    call_id: int
    holder: _Holder | None
    resends = 0


def _cancel_call(d: Deferred[Message]) -> None:
    call = cast(_Call, d)  # the canceller of a _Call, given only that _Call
    holder = call.holder
    if holder is not None:
        holder._cancel(call)


TakenBack = tuple[_Call, MethodInfo, bytes, "Mapping[str, str] | None", float]
"""A call a GOAWAY showed was never run: its Deferred, method, serialized
request, metadata and absolute deadline (0: none)."""
