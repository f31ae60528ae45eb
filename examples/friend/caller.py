"""FriendService consumer (the caller): python -m examples.friend.caller [--config ...].

A unary call, a typed error, then a server stream: WatchFriends sends the list,
the caller adds a friend and sees the change arrive on the stream, then cancels it.
"""

from __future__ import annotations

from examples.cli import run
from examples.protos import friend_pb2
from twisted_rpc import Client, NotFoundError, RpcError

SYNCED = friend_pb2.FriendEvent.SYNCED


async def main(reactor, config: str) -> None:
    client = Client.from_config(config, reactor)
    friends = client.proxy(friend_pb2.DESCRIPTOR.services_by_name["FriendService"])
    try:
        reply = await friends.GetFriendsList(friend_pb2.GetFriendsListRequest(userid=1000))
        print(f"GetFriendsList(1000) -> {list(reply.friends)}")
        try:
            await friends.GetFriendsList(friend_pb2.GetFriendsListRequest(userid=7))
        except NotFoundError as e:
            print(f"GetFriendsList(7) -> {type(e).__name__}: {e}")
        await watch_friends(friends, userid=2000, new_friend="li si")
    except RpcError as e:
        print(f"FriendService call failed: {e}")
        raise SystemExit(1) from None
    finally:
        await client.close()


async def watch_friends(friends, userid: int, new_friend: str) -> None:
    """Watch ``userid``'s list (the stream runs for 30 s at most), add
    ``new_friend``, stop at its event."""
    stream = friends.WatchFriends(friend_pb2.WatchFriendsRequest(userid=userid), timeout=30)
    listed: list[str] = []
    synced = False
    async for event in stream:
        if event.kind == SYNCED:
            synced = True
            print(f"WatchFriends({userid}) -> {listed}, then changes as they happen")
            if new_friend in listed:
                break  # added by an earlier run against the same provider
            await friends.AddFriend(friend_pb2.AddFriendRequest(userid=userid, name=new_friend))
            print(f"AddFriend({userid}, {new_friend!r})")
        elif not synced:
            listed.append(event.name)
        else:
            print(f"WatchFriends({userid}) -> added {event.name!r}")
            if event.name == new_friend:
                break
    stream.cancel()  # the provider's generator is closed; the stream ends CANCELLED
    print(f"WatchFriends({userid}) cancelled: {stream.code.name}")


if __name__ == "__main__":
    run(main, __doc__)
