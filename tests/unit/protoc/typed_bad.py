"""Mistakes mypy --strict must report, each on a line marked with its error code."""

from __future__ import annotations

from examples.protos import friend_pb2, user_pb2
from examples.protos.friend_rpc import FriendServiceStub
from examples.protos.user_rpc import UserServiceBase, UserServiceStub
from twisted_rpc import CallContext, Client


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
