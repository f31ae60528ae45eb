"""Mistakes mypy --strict must report, each on a line marked with its error code."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from examples.protos import friend_pb2, user_pb2
from examples.protos.friend_rpc import FriendServiceStub
from examples.protos.user_rpc import UserServiceBase, UserServiceStub
from testbed.protos import echo_pb2
from testbed.protos.echo_rpc import (
    EchoServiceAsyncioStub,
    StreamServiceAsyncioStub,
    StreamServiceBase,
)
from twisted_rpc import CallContext, Client, RequestStream


def calls(client: Client) -> None:
    users = UserServiceStub(client)
    users.Login(user_pb2.RegisterRequest(name="x"))  # E: arg-type
    users.Logout(user_pb2.LoginRequest(name="x"))  # E: attr-defined
    friends = FriendServiceStub(client)
    friends.WatchFriends(friend_pb2.AddFriendRequest())  # E: arg-type


async def replies(client: Client) -> None:
    reply = await UserServiceStub(client).Login(user_pb2.LoginRequest())
    print(reply.no_such_field)  # E: attr-defined


class Users(UserServiceBase):
    def Login(
        self,
        request: user_pb2.RegisterRequest,  # E: override
        context: CallContext,
    ) -> user_pb2.LoginResponse:
        return user_pb2.LoginResponse()


async def from_asyncio(client: Client) -> None:
    echo = EchoServiceAsyncioStub(client)
    echo.Echo(echo_pb2.CountRequest())  # E: arg-type
    reply = await echo.Echo(echo_pb2.EchoRequest())
    print(reply.no_such_field)  # E: attr-defined
    chat = StreamServiceAsyncioStub(client).Chat()
    await chat.write(echo_pb2.CountRequest())  # E: arg-type


def as_deferred(client: Client) -> Deferred[echo_pb2.EchoReply]:
    return EchoServiceAsyncioStub(client).Echo(echo_pb2.EchoRequest())  # E: return-value


class Streams(StreamServiceBase):
    async def Sum(
        self,
        requests: RequestStream[echo_pb2.CountRequest],  # E: override
        context: CallContext,
    ) -> echo_pb2.EchoReply:
        return echo_pb2.EchoReply()
