"""An asyncio application on generated stubs, run in a subprocess by test_stubs.py.

Under Twisted's asyncio reactor it serves services built on the generated
``EchoServiceBase`` and ``StreamServiceBase`` on 127.0.0.1:0 and calls them
from an asyncio task through ``EchoServiceAsyncioStub`` and
``StreamServiceAsyncioStub`` (``protos.echo_rpc``, generated into a
directory on PYTHONPATH). It prints one JSON object of what it saw (and
exits 1 if the task failed or took over 30 seconds).
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import AsyncIterator
from typing import Any

from twisted.internet import asyncioreactor

asyncioreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, maybeDeferred  # noqa: E402

from testbed.protos import echo_pb2  # noqa: E402
from testbed.protos.echo_rpc import (  # noqa: E402
    EchoServiceAsyncioStub,
    EchoServiceBase,
    EchoServiceStub,
    StreamServiceAsyncioStub,
    StreamServiceBase,
)
from twisted_rpc import (  # noqa: E402
    AsyncioBidiStream,
    AsyncioClientStream,
    AsyncioServerStream,
    CallContext,
    Client,
    DeadlineExceededError,
    NotFoundError,
    RequestStream,
    RpcError,
)
from twisted_rpc.server import Dispatcher, ServerFactory  # noqa: E402

seen: dict[str, Any] = {}


class Echo(EchoServiceBase):
    def Echo(self, request: echo_pb2.EchoRequest, context: CallContext) -> echo_pb2.EchoReply:
        if request.fail_code:
            raise RpcError(request.fail_code, request.fail_message)
        return echo_pb2.EchoReply(payload=request.payload, metadata=dict(context.metadata))

    def AsyncEcho(
        self, request: echo_pb2.EchoRequest, context: CallContext
    ) -> Deferred[echo_pb2.EchoReply]:
        return Deferred()  # never answered: the stub's timeout ends it


class Streams(StreamServiceBase):
    async def Count(
        self, request: echo_pb2.CountRequest, context: CallContext
    ) -> AsyncIterator[echo_pb2.EchoReply]:
        for n in range(request.count):
            yield echo_pb2.EchoReply(call_id=n)

    async def Sum(
        self, requests: RequestStream[echo_pb2.EchoRequest], context: CallContext
    ) -> echo_pb2.EchoReply:
        seen["handler_requests"] = type(requests).__name__
        parts = [request.payload async for request in requests]
        return echo_pb2.EchoReply(payload=b"".join(parts), call_id=len(parts))

    async def Chat(
        self, requests: RequestStream[echo_pb2.EchoRequest], context: CallContext
    ) -> AsyncIterator[echo_pb2.EchoReply]:
        first = await requests.read()  # one at a time, then the rest
        if first is not None:
            yield echo_pb2.EchoReply(payload=first.payload.upper())
        async for request in requests:
            yield echo_pb2.EchoReply(payload=request.payload.upper())


async def chunks(n: int) -> AsyncIterator[echo_pb2.EchoRequest]:
    for i in range(n):
        await asyncio.sleep(0)  # an asyncio await inside the requests' iterator
        yield echo_pb2.EchoRequest(payload=str(i).encode())


async def main() -> None:
    port = reactor.listenTCP(
        0, ServerFactory(Dispatcher([Echo(), Streams()]), reactor), interface="127.0.0.1"
    )
    address = f"127.0.0.1:{port.getHost().port}"
    providers = {"mprpc.test.EchoService": address, "mprpc.test.StreamService": address}
    client = Client(reactor, providers=providers, awaitables="asyncio")
    echo = EchoServiceAsyncioStub(client, timeout=0.3, metadata={"app": "stub"})
    streams = StreamServiceAsyncioStub(client)

    call = echo.Echo(echo_pb2.EchoRequest(payload=b"hi"))
    seen["unary_is_future"] = isinstance(call, asyncio.Future)
    reply = await call
    seen["unary"] = [reply.payload.decode(), reply.metadata["app"]]
    try:
        await echo.Echo(echo_pb2.EchoRequest(fail_code=5, fail_message="nope"))
    except NotFoundError as e:
        seen["error"] = [type(e).__name__, e.message]
    try:
        await echo.AsyncEcho(echo_pb2.EchoRequest())  # the stub's timeout: 0.3 s
    except DeadlineExceededError:
        seen["stub_timeout"] = "DEADLINE_EXCEEDED"

    count = streams.Count(echo_pb2.CountRequest(count=3))
    seen["server_stream"] = [type(count).__name__] + [r.call_id async for r in count]
    upload = streams.Sum(chunks(3))
    seen["client_stream_type"] = type(upload).__name__
    total = await upload
    seen["client_stream"] = [total.payload.decode(), total.call_id]
    chat = streams.Chat()
    seen["bidi_type"] = type(chat).__name__
    await chat.write(echo_pb2.EchoRequest(payload=b"one"))
    first = await chat.read()
    await chat.write(echo_pb2.EchoRequest(payload=b"two"))
    await chat.done_writing()
    rest = [r.payload.decode() async for r in chat]
    seen["bidi"] = [first.payload.decode() if first else None, *rest]
    seen["adapters"] = [
        isinstance(count, AsyncioServerStream),
        isinstance(upload, AsyncioClientStream),
        isinstance(chat, AsyncioBidiStream),
    ]

    plain = Client(reactor, providers=providers)  # hands out Deferreds
    try:
        EchoServiceAsyncioStub(plain)
    except ValueError as e:
        seen["refused"] = str(e)
    seen["plain_stub"] = type(EchoServiceStub(plain)).__name__  # the Twisted stub still works

    loop = asyncio.get_running_loop()
    await client.close().asFuture(loop)
    await plain.close().asFuture(loop)
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
