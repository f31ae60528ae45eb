"""FriendService consumer (the caller): python -m examples.friend.caller [--config ...]."""

from __future__ import annotations

import argparse

from twisted.internet.defer import Deferred
from twisted.internet.task import react

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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="etc/consumer.ini")
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, args.config)))
