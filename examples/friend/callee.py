"""FriendService provider (the callee): a handler that returns a Deferred, and a
server stream (WatchFriends: an async generator that waits for changes)."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator

from twisted.internet.defer import Deferred, succeed

from examples.protos import common_pb2, friend_pb2
from twisted_rpc import CallContext, InvalidArgumentError, NotFoundError, Service

FRIENDS = {
    1000: ["gao yang", "liu hong", "wang shuo"],
    2000: ["zhang san"],
}

ADDED = friend_pb2.FriendEvent.ADDED
SYNCED = friend_pb2.FriendEvent.SYNCED


class _Watcher:
    """One WatchFriends stream: the events not yet yielded, and the Deferred
    its generator waits on while there are none."""

    def __init__(self) -> None:
        self.events: deque[friend_pb2.FriendEvent] = deque()
        self.waiter: Deferred[None] | None = None

    def push(self, event: friend_pb2.FriendEvent) -> None:
        self.events.append(event)
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.callback(None)

    def wait(self) -> Deferred[None]:
        self.waiter = Deferred()
        return self.waiter


class FriendService(Service, descriptor=friend_pb2.DESCRIPTOR.services_by_name["FriendService"]):
    def __init__(self) -> None:
        self.friends = {userid: list(names) for userid, names in FRIENDS.items()}
        self.watchers: dict[int, list[_Watcher]] = {}

    def GetFriendsList(
        self, request: friend_pb2.GetFriendsListRequest, context: CallContext
    ) -> Deferred[friend_pb2.GetFriendsListResponse]:
        friends = self.friends.get(request.userid)
        if friends is None:
            raise NotFoundError(message=f"no user {request.userid}")
        return succeed(
            friend_pb2.GetFriendsListResponse(
                result=common_pb2.ResultCode(errcode=0), friends=friends
            )
        )

    def AddFriend(
        self, request: friend_pb2.AddFriendRequest, context: CallContext
    ) -> friend_pb2.AddFriendResponse:
        friends = self.friends.get(request.userid)
        if friends is None:
            raise NotFoundError(message=f"no user {request.userid}")
        if not request.name:
            raise InvalidArgumentError(message="name is empty")
        if request.name not in friends:
            friends.append(request.name)
            for watcher in self.watchers.get(request.userid, []):
                watcher.push(friend_pb2.FriendEvent(kind=ADDED, name=request.name))
        return friend_pb2.AddFriendResponse(result=common_pb2.ResultCode(errcode=0))

    async def WatchFriends(
        self, request: friend_pb2.WatchFriendsRequest, context: CallContext
    ) -> AsyncIterator[friend_pb2.FriendEvent]:
        """The list as it is, SYNCED, then each friend added, until the caller
        goes away (then the generator is closed: ``finally`` runs)."""
        friends = self.friends.get(request.userid)
        if friends is None:
            raise NotFoundError(message=f"no user {request.userid}")
        watcher = _Watcher()
        watchers = self.watchers.setdefault(request.userid, [])
        watchers.append(watcher)
        try:
            for name in list(friends):
                yield friend_pb2.FriendEvent(kind=ADDED, name=name)
            yield friend_pb2.FriendEvent(kind=SYNCED)
            while True:
                while watcher.events:
                    yield watcher.events.popleft()
                await watcher.wait()
        finally:
            watchers.remove(watcher)
