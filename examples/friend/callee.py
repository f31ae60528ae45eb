"""FriendService provider (the callee): a handler that returns a Deferred."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from protos import common_pb2, friend_pb2
from twisted_rpc import CallContext, NotFoundError, Service

FRIENDS = {
    1000: ["gao yang", "liu hong", "wang shuo"],
    2000: ["zhang san"],
}


class FriendService(Service, descriptor=friend_pb2.DESCRIPTOR.services_by_name["FriendService"]):
    def GetFriendsList(
        self, request: friend_pb2.GetFriendsListRequest, context: CallContext
    ) -> Deferred:
        friends = FRIENDS.get(request.userid)
        if friends is None:
            raise NotFoundError(message=f"no user {request.userid}")
        return succeed(
            friend_pb2.GetFriendsListResponse(
                result=common_pb2.ResultCode(errcode=0), friends=friends
            )
        )
