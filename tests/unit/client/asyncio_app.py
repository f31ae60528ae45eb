"""An asyncio application, run in a subprocess by test_asyncio.py.

Under Twisted's asyncio reactor it starts a provider on 127.0.0.1:0 in
this process and calls it from an asyncio task through a client with
``awaitables="asyncio"``: plain ``await``, ``async for``, ``read()`` and
``write()``, cancellation. It prints one JSON object of what it saw (and
exits 1 if the task failed or took over 30 seconds).
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from typing import Any

from twisted.internet import asyncioreactor

asyncioreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, maybeDeferred  # noqa: E402

from testbed.echo_service import ECHO, STREAMS, EchoService, StreamService  # noqa: E402
from testbed.protos import echo_pb2  # noqa: E402
from twisted_rpc import (  # noqa: E402
    AsyncioServerStream,
    AsyncioServiceProxy,
    CallContext,
    Client,
    NotFoundError,
)
from twisted_rpc.server import Dispatcher, ServerFactory  # noqa: E402

seen: dict[str, Any] = {}
handler_cancelled = asyncio.Event()


class Echo(EchoService):
    async def AsyncEcho(
        self, request: echo_pb2.EchoRequest, context: CallContext
    ) -> echo_pb2.EchoReply:
        seen["handler_started"] = True
        try:
            await Deferred()  # answered never: cancelled when the caller gives up
        finally:
            handler_cancelled.set()
        raise AssertionError("not reached")


async def requests(n: int) -> Any:
    for i in range(n):
        await asyncio.sleep(0)  # an asyncio await inside the requests' iterator
        yield echo_pb2.EchoRequest(payload=b"ab" * (i + 1))


async def main() -> None:
    streams_service = StreamService()
    port = reactor.listenTCP(
        0, ServerFactory(Dispatcher([Echo(), streams_service]), reactor), interface="127.0.0.1"
    )
    address = f"127.0.0.1:{port.getHost().port}"
    client = Client(
        reactor,
        providers={ECHO.full_name: [address], STREAMS.full_name: [address]},
        awaitables="asyncio",
    )
    echo = client.proxy(ECHO)
    streams = client.proxy(STREAMS)
    assert isinstance(echo, AsyncioServiceProxy)
    call = echo.Echo(echo_pb2.EchoRequest(payload=b"hi"))
    seen["unary_is_future"] = isinstance(call, asyncio.Future)
    seen["unary"] = (await call).payload.decode()
    try:
        await echo.Echo(echo_pb2.EchoRequest(fail_code=5, fail_message="nope"))
    except NotFoundError as e:
        seen["error"] = [type(e).__name__, e.message]

    count = streams.Count(echo_pb2.CountRequest(count=3, payload_size=1))
    seen["stream_is_adapter"] = isinstance(count, AsyncioServerStream)
    seen["async_for"] = [reply.call_id async for reply in count]
    seen["stream_code"] = count.code.name
    two = streams.Count(echo_pb2.CountRequest(count=2))
    seen["reads"] = [
        r if r is None else r.call_id
        for r in [await two.read(), await two.read(), await two.read()]
    ]
    total = await streams.Sum(requests(3))
    seen["client_stream"] = [total.payload.decode(), total.call_id]
    chat: Any = streams.Chat()
    await chat.write(echo_pb2.EchoRequest(payload=b"one"))
    first = await chat.read()
    await chat.write(echo_pb2.EchoRequest(payload=b"two"))
    await chat.done_writing()
    seen["bidi"] = [first.payload.decode()] + [r.payload.decode() async for r in chat]

    # Cancelling the future cancels the call: the provider's handler is cancelled.
    pending = echo.AsyncEcho(echo_pb2.EchoRequest())
    for _ in range(200):
        if seen.get("handler_started"):
            break
        await asyncio.sleep(0.01)
    pending.cancel()
    await asyncio.wait_for(handler_cancelled.wait(), 5)
    seen["cancel_reached_provider"] = handler_cancelled.is_set()
    # asyncio.wait_for on a call: its timeout cancels the call the same way.
    handler_cancelled.clear()
    try:
        await asyncio.wait_for(echo.AsyncEcho(echo_pb2.EchoRequest()), 0.2)
    except TimeoutError:
        seen["wait_for"] = "timeout"
    await asyncio.wait_for(handler_cancelled.wait(), 5)
    seen["wait_for_reached_provider"] = handler_cancelled.is_set()

    # A stream cancelled from its asyncio task: the provider's generator is closed.
    forever: Any = streams.Count(echo_pb2.CountRequest(forever=True, tag="t", delay=0.01))
    await forever.read()
    forever.cancel()
    for _ in range(500):
        if "t" in streams_service.ends:
            break
        await asyncio.sleep(0.01)
    seen["stream_cancel_reached_provider"] = streams_service.ends.get("t")
    seen["stream_cancel_code"] = forever.code.name

    loop = asyncio.get_running_loop()
    await client.close().asFuture(loop)
    await maybeDeferred(port.stopListening).asFuture(loop)


def run() -> int:
    status = [1]

    def finished(result: object) -> None:
        if isinstance(result, BaseException):
            traceback.print_exception(result, file=sys.stderr)
        else:
            status[0] = 0
        reactor.stop()

    def start() -> None:
        task = asyncio.ensure_future(main())
        task.add_done_callback(lambda t: finished(t.exception() or None))

    def too_long() -> None:
        print("the asyncio application took over 30 s", file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(start)
    guard = reactor.callLater(30, too_long)
    reactor.run()
    if guard.active():
        guard.cancel()
    print(json.dumps(seen))
    return status[0]


if __name__ == "__main__":
    sys.exit(run())
