"""The example callees, through twisted_rpc.testing (how users unit-test their services)."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred

from examples.chat import callee as chat_callee
from examples.chat import chat_pb2
from examples.chat.callee import ChatService
from examples.chat.caller import conversation
from examples.friend.callee import FriendService
from examples.friend.caller import watch_friends
from examples.protos import friend_pb2, user_pb2
from examples.user.callee import UserService
from twisted_rpc import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    StatusCode,
)
from twisted_rpc.testing import MemoryProvider


def settle(memory: MemoryProvider, d: Deferred, turns: int = 50):
    """Deliver bytes until ``d`` has a result (bounded), then that result."""
    for _ in range(turns):
        memory.flush()
        if d.called:
            break
    return memory.result(d)


def test_user_service():
    memory = MemoryProvider([UserService()])
    users = memory.proxy(UserService)
    good = users.Login(user_pb2.LoginRequest(name="zhang san", pwd="123456"))
    bad = users.Login(user_pb2.LoginRequest(name="zhang san", pwd="nope"))
    registered = users.Register(user_pb2.RegisterRequest(id=1, name="li si", pwd="pw"))
    memory.flush()
    assert memory.result(good).success
    assert not memory.result(bad).success
    assert memory.result(bad).result.errmsg == "bad name or pwd"
    assert memory.result(registered).success
    after = users.Login(user_pb2.LoginRequest(name="li si", pwd="pw"))
    memory.flush()
    assert memory.result(after).success


def test_friend_service():
    memory = MemoryProvider([FriendService()])
    friends = memory.proxy(FriendService)
    found = friends.GetFriendsList(friend_pb2.GetFriendsListRequest(userid=1000))
    missing = friends.GetFriendsList(friend_pb2.GetFriendsListRequest(userid=1))
    memory.flush()
    assert list(memory.result(found).friends) == ["gao yang", "liu hong", "wang shuo"]
    with pytest.raises(NotFoundError, match="no user 1"):
        memory.result(missing)


def test_time_moves_only_when_the_test_says_so():
    """Deadlines run on the provider's Clock: an async handler slower than the timeout."""
    from testbed.echo_service import EchoService
    from testbed.protos import echo_pb2
    from twisted_rpc import DeadlineExceededError

    memory = MemoryProvider([EchoService()], timeout=1.0, builtins=True)
    echo = memory.proxy(EchoService)
    slow = echo.AsyncEcho(echo_pb2.EchoRequest(payload=b"late", delay=5))
    quick = echo.AsyncEcho(echo_pb2.EchoRequest(payload=b"soon", delay=0.5))
    memory.flush()
    memory.advance(0.5)
    assert memory.result(quick).payload == b"soon"
    assert not slow.called  # nothing happens until the clock moves
    memory.advance(0.6)
    with pytest.raises(DeadlineExceededError):
        memory.result(slow)


def test_friend_watch_sends_the_list_then_changes_until_cancelled(capsys):
    service = FriendService()
    memory = MemoryProvider([service])
    friends = memory.proxy(FriendService)
    settle(memory, Deferred.fromCoroutine(watch_friends(friends, 2000, "li si")))
    assert capsys.readouterr().out.splitlines() == [
        "WatchFriends(2000) -> ['zhang san'], then changes as they happen",
        "AddFriend(2000, 'li si')",
        "WatchFriends(2000) -> added 'li si'",
        "WatchFriends(2000) cancelled: CANCELLED",
    ]
    assert service.friends[2000] == ["zhang san", "li si"]
    memory.flush()
    assert service.watchers[2000] == []  # the generator was closed: its finally ran
    # A second run against the same provider finds li si listed and stops there.
    settle(memory, Deferred.fromCoroutine(watch_friends(friends, 2000, "li si")))
    assert capsys.readouterr().out.splitlines() == [
        "WatchFriends(2000) -> ['zhang san', 'li si'], then changes as they happen",
        "WatchFriends(2000) cancelled: CANCELLED",
    ]


def test_friend_watch_many_watchers_and_errors():
    service = FriendService()
    memory = MemoryProvider([service])
    friends = memory.proxy(FriendService)
    watches = [friends.WatchFriends(friend_pb2.WatchFriendsRequest(userid=1000)) for _ in range(3)]
    memory.flush()
    assert len(service.watchers[1000]) == 3
    added = friends.AddFriend(friend_pb2.AddFriendRequest(userid=1000, name="li si"))
    again = friends.AddFriend(friend_pb2.AddFriendRequest(userid=1000, name="li si"))
    empty = friends.AddFriend(friend_pb2.AddFriendRequest(userid=1000, name=""))
    nobody = friends.AddFriend(friend_pb2.AddFriendRequest(userid=7, name="x"))
    memory.flush()
    assert memory.result(added).result.errcode == 0
    assert memory.result(again).result.errcode == 0  # already a friend: no event
    with pytest.raises(InvalidArgumentError, match="name is empty"):
        memory.result(empty)
    with pytest.raises(NotFoundError, match="no user 7"):
        memory.result(nobody)
    for watch in watches:
        events = [settle(memory, watch.read()) for _ in range(5)]
        assert [(e.kind, e.name) for e in events] == [
            (friend_pb2.FriendEvent.ADDED, "gao yang"),
            (friend_pb2.FriendEvent.ADDED, "liu hong"),
            (friend_pb2.FriendEvent.ADDED, "wang shuo"),
            (friend_pb2.FriendEvent.SYNCED, ""),
            (friend_pb2.FriendEvent.ADDED, "li si"),
        ]
        watch.cancel()
    memory.flush()
    assert service.watchers[1000] == []
    missing = friends.WatchFriends(friend_pb2.WatchFriendsRequest(userid=7))
    with pytest.raises(NotFoundError, match="no user 7"):
        settle(memory, missing.read())
    assert missing.code == StatusCode.NOT_FOUND


def test_chat_room_two_members(capsys):
    service = ChatService()
    memory = MemoryProvider([service])
    settle(memory, Deferred.fromCoroutine(conversation(memory.proxy(ChatService))))
    assert capsys.readouterr().out.splitlines() == [
        "alice <- room: welcome, alice: 1 in the room",
        "alice joined as 'alice'",
        "bob <- room: welcome, bob: 2 in the room",
        "bob joined as 'bob'",
        "alice <- room: bob joined",
        "alice -> hi bob",
        "alice <- alice: hi bob",
        "bob <- alice: hi bob",
        "bob -> /who",
        "bob <- room: in the room: alice, bob",
        "bob <- (end of stream)",
        "alice <- room: bob left",
        "alice <- (end of stream)",
        "streams ended: alice OK, bob OK",
    ]
    assert service.members == []


def test_chat_member_who_goes_away_leaves_the_room():
    service = ChatService()
    memory = MemoryProvider([service])
    room = memory.proxy(ChatService)
    alice = room.Chat(metadata={"user": "alice"})
    guest = room.Chat(metadata={"user": "alice"})  # the name is taken: a guest name
    assert settle(memory, alice.read()).text == "welcome, alice: 1 in the room"
    assert settle(memory, guest.read()).text == "welcome, guest-1: 2 in the room"
    assert settle(memory, alice.read()).text == "guest-1 joined"
    guest.cancel()
    assert settle(memory, alice.read()).text == "guest-1 left"
    assert [m.name for m in service.members] == ["alice"]
    alice.cancel()
    memory.flush()
    assert service.members == []


def test_chat_drops_a_member_too_slow_for_the_room(monkeypatch):
    """A member that never reads: its window fills, its backlog reaches
    MAX_BACKLOG and the room ends its stream instead of holding more."""
    monkeypatch.setattr(chat_callee, "MAX_BACKLOG", 5)
    service = ChatService()
    memory = MemoryProvider([service])
    slow_client = Client(
        memory.reactor,
        providers={"example.ChatService": ["127.0.0.1:4321"]},
        stream_window=1024,
    )
    slow = slow_client.proxy(ChatService).Chat(metadata={"user": "slow"})
    talker = memory.proxy(ChatService).Chat(metadata={"user": "talker"})
    memory.flush()
    sent = 0
    for sent in range(1, 200):  # bounded: the window alone holds about 30 of them
        settle(memory, talker.write(chat_pb2.ChatMessage(text=f"message {sent:03}")))
        if slow.inbox.ended or service.members[0].overflowed:
            break
    slow_member = service.members[0]
    assert slow_member.overflowed and len(slow_member.outbox) == 5
    received = []
    with pytest.raises(ResourceExhaustedError, match="too slow for the room"):
        for _ in range(300):
            message = settle(memory, slow.read())
            received.append(message.text)
    assert "message 001" in received
    assert [m.name for m in service.members] == ["talker"]
    talker.cancel()
    memory.flush()
    assert service.members == []
