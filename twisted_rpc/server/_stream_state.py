"""The state of one stream on a provider (:class:`_Stream`) and what a
client-streaming or bidi handler iterates (:class:`RequestStream`); the
runner's streaming half is in :mod:`twisted_rpc.server._streams`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from twisted_rpc.core._flow import Inbox, SendCredit
from twisted_rpc.server._context import CallContext
from twisted_rpc.server._dispatcher import ServerMethod

RequestT = TypeVar("RequestT", bound=Message)


class RequestStream(Generic[RequestT]):
    """The requests of a client-streaming or bidi call, as its handler sees
    them: ``async for request in requests``, or ``await requests.read()``
    (None after the last one). Credit goes back to the consumer as they are
    taken, so a handler that reads slowly slows its consumer down.

    Generic in the request type for type checkers only
    (``RequestStream[ChatMessage]``, as the generated ``<Service>Base``
    types a handler's ``requests``); every instance is the same at run time."""

    __slots__ = ("_inbox", "_stream")

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        assert stream.inbox is not None
        self._inbox = stream.inbox

    def __aiter__(self) -> RequestStream[RequestT]:
        return self

    async def __anext__(self) -> RequestT:
        inbox = self._inbox
        if not inbox.messages and not inbox.ended:
            await inbox.wait()
        message = inbox.take()
        if message is None:
            raise StopAsyncIteration
        self._stream.received += 1
        return message  # type: ignore[no-any-return]

    def read(self) -> Deferred[RequestT | None]:
        """A Deferred of the next request, None after the last one."""

        async def read() -> RequestT | None:
            try:
                return await self.__anext__()
            except StopAsyncIteration:
                return None

        return Deferred.fromCoroutine(read())


class _Stream:
    """One stream in flight on a provider connection."""

    __slots__ = (
        "call_id",
        "method",
        "context",
        "started",
        "inbox",
        "credit",
        "task",
        "ended",
        "sent",
        "received",
        "last_active",
        "idle_timer",
        "headers_sent",
        "trailers",
    )

    def __init__(self, call_id: int, method: ServerMethod, started: float, window: int) -> None:
        self.call_id = call_id
        self.method = method
        self.started = started
        self.context: CallContext | None = None
        self.inbox: Inbox | None = None
        self.credit = SendCredit(window)
        self.task: Deferred[Any] | None = None
        self.ended = False
        self.sent = 0
        self.received = 0
        self.last_active = started
        self.idle_timer: IDelayedCall | None = None
        self.headers_sent = False
        self.trailers: Mapping[str, str] | None = None
