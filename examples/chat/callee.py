"""ChatService provider (the callee): a chat room, one bidi stream per member.

Each member's handler is an async generator that yields what the room has
for it, while a second coroutine reads what the member writes and hands it to
the room. A member whose backlog passes :data:`MAX_BACKLOG` (a reader too slow
for the room) is dropped with RESOURCE_EXHAUSTED, so one slow reader cannot
make the provider hold an unbounded backlog.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from examples.chat import chat_pb2
from twisted_rpc import CallContext, ResourceExhaustedError, RpcError, Service

log = Logger(namespace="examples.chat")

MAX_BACKLOG = 1000
"""Messages a member may have waiting before the room drops it."""


class _Member:
    """One member: what the room has for it, and the Deferred its stream
    waits on while there is nothing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.outbox: deque[chat_pb2.ChatMessage | None] = deque()  # None: done
        self.waiter: Deferred[None] | None = None
        self.overflowed = False

    def push(self, message: chat_pb2.ChatMessage | None) -> None:
        if len(self.outbox) >= MAX_BACKLOG:
            self.overflowed = True  # dropped: the stream ends at its next step
            return
        self.outbox.append(message)
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.callback(None)

    def wait(self) -> Deferred[None]:
        self.waiter = Deferred()
        return self.waiter


class ChatService(Service, descriptor=chat_pb2.DESCRIPTOR.services_by_name["ChatService"]):
    def __init__(self) -> None:
        self.members: list[_Member] = []
        self.guests = 0

    def _broadcast(self, message: chat_pb2.ChatMessage) -> None:
        for member in self.members:
            member.push(message)

    def _name(self, context: CallContext) -> str:
        name = context.metadata.get("user", "").strip()[:32]
        if not name or any(m.name == name for m in self.members):
            self.guests += 1
            name = f"guest-{self.guests}"
        return name

    async def Chat(
        self, requests: AsyncIterable[chat_pb2.ChatMessage], context: CallContext
    ) -> AsyncIterator[chat_pb2.ChatMessage]:
        """Join the room; leave when the caller is done writing (or goes away)."""
        member = _Member(self._name(context))
        self._broadcast(chat_pb2.ChatMessage(text=f"{member.name} joined"))
        self.members.append(member)
        context.send_initial_metadata({"user": member.name})
        member.push(
            chat_pb2.ChatMessage(text=f"welcome, {member.name}: {len(self.members)} in the room")
        )
        reader = Deferred.fromCoroutine(self._read(requests, member))
        reader.addErrback(self._reader_failed, member)
        try:
            while True:
                while member.outbox:
                    if member.overflowed:
                        raise ResourceExhaustedError(
                            message=f"over {MAX_BACKLOG} messages behind: too slow for the room"
                        )
                    message = member.outbox.popleft()
                    if message is None:
                        return
                    yield message
                await member.wait()
        finally:
            self.members.remove(member)
            reader.cancel()  # stops reading if the caller went away first
            self._broadcast(chat_pb2.ChatMessage(text=f"{member.name} left"))

    async def _read(self, requests: AsyncIterable[chat_pb2.ChatMessage], member: _Member) -> None:
        async for request in requests:
            if request.text == "/who":
                names = ", ".join(m.name for m in self.members)
                member.push(chat_pb2.ChatMessage(text=f"in the room: {names}"))
            else:
                self._broadcast(chat_pb2.ChatMessage(user=member.name, text=request.text))
        member.push(None)  # the caller is done writing: end its stream

    def _reader_failed(self, failure: Failure, member: _Member) -> None:
        if failure.check(CancelledError, RpcError):
            return  # the stream ended under the reader (cancelled, lost, deadline)
        log.failure("reading {name}'s messages", failure, name=member.name)
        member.push(None)
