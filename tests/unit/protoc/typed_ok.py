"""A typed client and typed services over the generated stubs: mypy --strict
passes (test_stubs.py runs it beside the generated modules)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from twisted.internet.defer import Deferred

from examples.chat import chat_pb2
from examples.chat.chat_rpc import ChatServiceBase, ChatServiceStub
from examples.protos import friend_pb2, user_pb2
from examples.protos.friend_rpc import FriendServiceBase, FriendServiceStub
from examples.protos.user_rpc import UserServiceBase, UserServiceStub
from testbed.protos import echo_pb2
from testbed.protos.echo_rpc import (
    EchoServiceAsyncioStub,
    StreamServiceAsyncioStub,
    StreamServiceBase,
)
from twisted_rpc import CallContext, Client, RequestStream


class Users(UserServiceBase):
    def Login(self, request: user_pb2.LoginRequest, context: CallContext) -> user_pb2.LoginResponse:
        return user_pb2.LoginResponse(success=request.name == "zhang san")

    async def Register(
        self, request: user_pb2.RegisterRequest, context: CallContext
    ) -> user_pb2.RegisterResponse:
        return user_pb2.RegisterResponse(success=bool(request.name))


class Friends(FriendServiceBase):
    def GetFriendsList(
        self, request: friend_pb2.GetFriendsListRequest, context: CallContext
    ) -> Deferred[friend_pb2.GetFriendsListResponse]:
        return Deferred.fromCoroutine(self._friends())

    async def _friends(self) -> friend_pb2.GetFriendsListResponse:
        return friend_pb2.GetFriendsListResponse(friends=["li si"])

    async def WatchFriends(
        self, request: friend_pb2.WatchFriendsRequest, context: CallContext
    ) -> AsyncIterator[friend_pb2.FriendEvent]:
        yield friend_pb2.FriendEvent(name=f"friend of {request.userid}")


class Chat(ChatServiceBase):
    async def Chat(
        self, requests: AsyncIterator[chat_pb2.ChatMessage], context: CallContext
    ) -> AsyncIterator[chat_pb2.ChatMessage]:
        async for message in requests:
            yield chat_pb2.ChatMessage(user="room", text=message.text)


class Streams(StreamServiceBase):
    async def Sum(
        self, requests: RequestStream[echo_pb2.EchoRequest], context: CallContext
    ) -> echo_pb2.EchoReply:
        first = await requests.read()
        parts = [first.payload] if first is not None else []
        parts += [request.payload async for request in requests]
        return echo_pb2.EchoReply(payload=b"".join(parts))


def login(client: Client) -> Deferred[bool]:
    users = UserServiceStub(client, timeout=2.0)
    d = users.Login(user_pb2.LoginRequest(name="zhang san"), metadata={"trace": "1"})
    return d.addCallback(lambda reply: reply.success)


async def watch(client: Client) -> list[str]:
    stream = FriendServiceStub(client).WatchFriends(friend_pb2.WatchFriendsRequest(userid=1))
    return [event.name async for event in stream]


async def chat(client: Client) -> str:
    stream = ChatServiceStub(client).Chat([chat_pb2.ChatMessage(text="hi")])
    reply = await stream.read()
    return reply.text if reply is not None else ""


async def from_asyncio(client: Client) -> tuple[bytes, list[int]]:
    """An asyncio task's calls, on a client with awaitables="asyncio"."""
    echo = EchoServiceAsyncioStub(client, timeout=2.0)
    call: asyncio.Future[echo_pb2.EchoReply] = echo.Echo(echo_pb2.EchoRequest(payload=b"a"))
    reply = await call
    streams = StreamServiceAsyncioStub(client)
    counted = [r.call_id async for r in streams.Count(echo_pb2.CountRequest(count=2))]
    total = await streams.Sum([echo_pb2.EchoRequest(payload=b"b")])
    chat = streams.Chat()
    await chat.write(echo_pb2.EchoRequest(payload=b"c"))
    await chat.done_writing()
    back = await chat.read()
    return reply.payload + total.payload + (back.payload if back else b""), counted
