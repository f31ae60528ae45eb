"""Deadline, cancellation and metadata propagation from an inbound call to
the calls its handler makes.

While an ``async def`` handler (or a streaming handler) runs, the call it
serves is the value of :data:`CURRENT_CALL` (a ``contextvars.ContextVar``;
Twisted runs each coroutine driven by ``Deferred.fromCoroutine`` in a copy of
the context it was started in, so the value holds across ``await``). A
client call made there (see ``Client.call`` and ``Client.stream``):

- gets the inbound call's remaining deadline, less a small margin, when that
  is sooner than its own (a deadline already passed fails the call at once,
  DEADLINE_EXCEEDED, nothing sent);
- carries the inbound metadata whose keys start with one of the client's
  ``propagate_metadata`` prefixes (the call's own metadata wins);
- is cancelled when the inbound call is (cancelled by its caller, or past
  its deadline) if the handler is awaiting it: the provider cancels the
  handler's Deferred, which cancels the Deferred it awaits.

The server layer sets the value; the client layer reads it; neither imports
the other, so the value is typed here by what is read of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Protocol

from twisted_rpc.core._status import DeadlineExceededError

__all__ = ["CURRENT_CALL", "DEFAULT_DEADLINE_MARGIN", "InboundCall", "inherit"]

DEFAULT_DEADLINE_MARGIN = 0.005
"""Seconds kept back from an inherited deadline, for the answer's way back."""


class InboundCall(Protocol):
    """What propagation reads of the call a handler serves (a ``CallContext``)."""

    @property
    def metadata(self) -> Mapping[str, str]: ...

    def time_remaining(self) -> float | None: ...


CURRENT_CALL: ContextVar[InboundCall | None] = ContextVar("twisted_rpc.inbound_call", default=None)


def inherit(
    parent: InboundCall,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
    prefixes: Sequence[str],
    margin: float = DEFAULT_DEADLINE_MARGIN,
) -> tuple[float | None, Mapping[str, str] | None]:
    """The timeout and metadata of a call made while serving ``parent``.

    The timeout is the sooner of ``timeout`` and what is left of the
    parent's deadline less ``margin``; DeadlineExceededError when that has
    passed. Metadata keys of the parent that start with one of ``prefixes``
    are added under the call's own.
    """
    left = parent.time_remaining()
    if left is not None:
        left -= margin
        if left <= 0:
            raise DeadlineExceededError(
                message="the deadline of the call being served has passed (not sent)"
            )
        if not timeout or left < timeout:
            timeout = left
    if prefixes:
        carried = {k: v for k, v in parent.metadata.items() if k.startswith(tuple(prefixes))}
        if carried:
            metadata = {**carried, **(metadata or {})}
    return timeout, metadata
