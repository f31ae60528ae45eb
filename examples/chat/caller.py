"""ChatService consumer (the caller): python -m examples.chat.caller [--config ...].

Two members, alice and bob, each on a bidi stream driven by hand: write() a
message, read() what the room sends (None at the end), done_writing() to leave.
"""

from __future__ import annotations

from examples.chat import chat_pb2
from examples.cli import run
from twisted_rpc import BidiStream, Client, RpcError


def show(who: str, message: chat_pb2.ChatMessage | None) -> None:
    if message is None:
        print(f"{who} <- (end of stream)")
    else:
        print(f"{who} <- {message.user or 'room'}: {message.text}")


async def join(room, name: str) -> BidiStream:
    """A member's stream (at most 30 s), once the room has welcomed it."""
    member = room.Chat(metadata={"user": name}, timeout=30)
    show(name, await member.read())  # the welcome
    headers = await member.initial_metadata
    print(f"{name} joined as {headers['user']!r}")
    return member


async def say(member: BidiStream, name: str, text: str) -> None:
    print(f"{name} -> {text}")
    await member.write(chat_pb2.ChatMessage(text=text))


async def conversation(room) -> None:
    """alice and bob join ``room`` (a ChatService proxy), talk and leave."""
    alice = await join(room, "alice")
    bob = await join(room, "bob")
    show("alice", await alice.read())  # bob joined
    await say(alice, "alice", "hi bob")
    show("alice", await alice.read())  # everyone gets every message, the sender too
    show("bob", await bob.read())
    await say(bob, "bob", "/who")
    show("bob", await bob.read())
    await bob.done_writing()  # bob leaves: his stream ends, alice is told
    show("bob", await bob.read())
    show("alice", await alice.read())
    await alice.done_writing()
    show("alice", await alice.read())
    print(f"streams ended: alice {alice.code.name}, bob {bob.code.name}")


async def main(reactor, config: str) -> None:
    client = Client.from_config(config, reactor)
    room = client.proxy(chat_pb2.DESCRIPTOR.services_by_name["ChatService"])
    try:
        await conversation(room)
    except RpcError as e:
        print(f"ChatService call failed: {e}")
        raise SystemExit(1) from None
    finally:
        await client.close()


if __name__ == "__main__":
    run(main, __doc__)
