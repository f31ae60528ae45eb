"""The example callees, through twisted_rpc.testing (how users unit-test their services)."""

from __future__ import annotations

import pytest

from examples.friend.callee import FriendService
from examples.user.callee import UserService
from protos import friend_pb2, user_pb2
from twisted_rpc import NotFoundError
from twisted_rpc.testing import MemoryProvider


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
    from protos import echo_pb2
    from testbed.echo_service import EchoService
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
