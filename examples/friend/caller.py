"""FriendService consumer (the caller): python -m examples.friend.caller [--config ...]."""

from __future__ import annotations

from examples.cli import run
from protos import friend_pb2
from twisted_rpc import Client, NotFoundError, RpcError


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
    except RpcError as e:
        print(f"FriendService call failed: {e}")
        raise SystemExit(1) from None
    finally:
        await client.close()


if __name__ == "__main__":
    run(main, __doc__)
