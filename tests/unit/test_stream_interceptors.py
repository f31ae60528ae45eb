"""Interceptors see streams: ``IServerStreamInterceptor`` and
``IClientStreamInterceptor`` see each stream start, can refuse it, add
metadata and wrap what the handler yields; the unary interfaces see no
stream and the stream interfaces no unary call. All in memory."""

from __future__ import annotations

import pytest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from testbed.echo_service import ECHO, STREAMS, EchoService, StreamService
from testbed.protos import echo_pb2
from twisted_rpc import (
    IClientInterceptor,
    IClientStreamInterceptor,
    IServerInterceptor,
    IServerStreamInterceptor,
    PermissionDeniedError,
    StatusCode,
    UnauthenticatedError,
)
from twisted_rpc.testing import MemoryProvider


async def _replies(stream) -> list:
    return [reply async for reply in stream]


# --------------------------------------------------------------------------- provider side


@implementer(IServerStreamInterceptor)
class StreamGate:
    """Sees each stream start; refuses one without a token; otherwise passes on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict, str]] = []

    def intercept_stream(self, request, context, proceed):
        self.seen.append((context.method.full_name, dict(context.metadata), type(request).__name__))
        if context.metadata.get("token") != "secret":
            raise UnauthenticatedError(message="no token")
        return proceed(request, context)


@implementer(IServerInterceptor)
class UnaryOnly:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def intercept(self, request, context, proceed):
        self.seen.append(context.method.full_name)
        return proceed(request, context)


@implementer(IServerInterceptor, IServerStreamInterceptor)
class Both:
    def __init__(self) -> None:
        self.unary: list[str] = []
        self.streams: list[str] = []

    def intercept(self, request, context, proceed):
        self.unary.append(context.method.name)
        return proceed(request, context)

    def intercept_stream(self, request, context, proceed):
        self.streams.append(context.method.name)
        return proceed(request, context)


def test_a_server_stream_interceptor_sees_each_stream_start_and_can_refuse_it():
    gate = StreamGate()
    verifyObject(IServerStreamInterceptor, gate)
    service = StreamService()
    memory = MemoryProvider([service], interceptors=[gate])
    proxy = memory.proxy(STREAMS)
    count = echo_pb2.CountRequest(count=3, tag="ok")
    assert len(memory.run(_replies(proxy.Count(count, metadata={"token": "secret"})))) == 3
    refused = proxy.Count(echo_pb2.CountRequest(count=3, tag="refused"))
    with pytest.raises(UnauthenticatedError, match="no token"):
        memory.run(refused.read())
    assert refused.code == StatusCode.UNAUTHENTICATED
    chat = proxy.Chat([echo_pb2.EchoRequest(payload=b"hi")], metadata={"token": "secret"})
    assert [r.payload for r in memory.run(_replies(chat))] == [b"hi"]
    total = proxy.Sum([echo_pb2.EchoRequest(payload=b"ab")] * 3)
    with pytest.raises(UnauthenticatedError):
        memory.run(total.response())
    assert gate.seen == [
        ("mprpc.test.StreamService/Count", {"token": "secret"}, "CountRequest"),
        ("mprpc.test.StreamService/Count", {}, "CountRequest"),
        ("mprpc.test.StreamService/Chat", {"token": "secret"}, "RequestStream"),
        ("mprpc.test.StreamService/Sum", {}, "RequestStream"),
    ]
    assert service.ends == {"ok": "done"}  # the refused stream's handler never ran
    assert memory.factory.streams_in_flight == 0


@implementer(IServerStreamInterceptor)
class Rewriter:
    """Wraps what the handler yields (and, for client streams, what it
    takes), closing the handler's generator however the stream ends."""

    def __init__(self) -> None:
        self.taken = 0

    def intercept_stream(self, request, context, proceed):
        if context.method.client_streaming:
            request = self._requests(request)
        result = proceed(request, context)
        if not context.method.server_streaming:
            return result  # client streaming: the response (a Deferred here)
        return self._replies(result)

    async def _requests(self, requests):
        async for request in requests:
            self.taken += 1
            yield echo_pb2.EchoRequest(payload=request.payload * 2)

    async def _replies(self, source):
        try:
            async for reply in source:
                yield echo_pb2.EchoReply(payload=b"<" + reply.payload + b">", call_id=reply.call_id)
        finally:
            await source.aclose()


def test_a_server_stream_interceptor_can_wrap_the_handlers_iterators():
    rewriter = Rewriter()
    service = StreamService()
    memory = MemoryProvider([service], interceptors=[rewriter])
    proxy = memory.proxy(STREAMS)
    replies = memory.run(_replies(proxy.Count(echo_pb2.CountRequest(count=2, payload_size=1))))
    assert [r.payload for r in replies] == [b"<x>", b"<x>"]
    chat = proxy.Chat([echo_pb2.EchoRequest(payload=b"a"), echo_pb2.EchoRequest(payload=b"b")])
    assert [r.payload for r in memory.run(_replies(chat))] == [b"<aa>", b"<bb>"]
    total = memory.run(proxy.Sum([echo_pb2.EchoRequest(payload=b"abc")] * 4).response())
    assert total.payload == b"24" and rewriter.taken == 6
    # Cancelled through the wrapper: the handler's generator is closed too.
    stream = proxy.Count(echo_pb2.CountRequest(forever=True, tag="wrapped"))
    assert memory.run(stream.read()).payload == b"<>"
    stream.cancel()
    memory.settle()
    assert service.ends == {"wrapped": "closed"}


def test_unary_interceptors_see_no_stream_and_stream_interceptors_no_unary_call():
    unary, gate, both = UnaryOnly(), StreamGate(), Both()
    memory = MemoryProvider([EchoService(), StreamService()], interceptors=[unary, gate, both])
    echo = memory.proxy(ECHO)
    streams = memory.proxy(STREAMS)
    d = echo.Echo(echo_pb2.EchoRequest(payload=b"u"), metadata={"token": "secret"})
    assert memory.run(d).payload == b"u"
    count = streams.Count(echo_pb2.CountRequest(count=1), metadata={"token": "secret"})
    assert len(memory.run(_replies(count))) == 1
    assert unary.seen == ["mprpc.test.EchoService/Echo"]
    assert [name for name, _, _ in gate.seen] == ["mprpc.test.StreamService/Count"]
    assert (both.unary, both.streams) == (["Echo"], ["Count"])


def test_server_stream_interceptors_run_in_the_order_given():
    order: list[str] = []

    @implementer(IServerStreamInterceptor)
    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def intercept_stream(self, request, context, proceed):
            order.append(self.name)
            return proceed(request, context)

    memory = MemoryProvider([StreamService()], interceptors=[Named("outer"), Named("inner")])
    memory.run(_replies(memory.proxy(STREAMS).Count(echo_pb2.CountRequest(count=1))))
    assert order == ["outer", "inner"]


# --------------------------------------------------------------------------- consumer side


@implementer(IClientStreamInterceptor)
class Stamper:
    """Sees each stream start and adds metadata; refuses Sum."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict, float | None]] = []

    def intercept_stream(self, call, request, proceed):
        self.seen.append((call.method.full_name, dict(call.metadata), call.timeout))
        if call.method.name == "Sum":
            raise PermissionDeniedError(message="uploads are off")
        call.metadata["stamp"] = "added"
        return proceed(call, request)


@implementer(IClientInterceptor)
class ClientUnaryOnly:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def intercept(self, call, request, proceed):
        self.seen.append(call.method.full_name)
        return proceed(call, request)


def test_a_client_stream_interceptor_sees_stream_starts_and_adds_metadata():
    stamper = Stamper()
    verifyObject(IClientStreamInterceptor, stamper)
    unary = ClientUnaryOnly()
    gate = StreamGate()  # the provider sees what the consumer's interceptor added
    memory = MemoryProvider(
        [EchoService(), StreamService()],
        interceptors=[gate],
        client_interceptors=[unary, stamper],
    )
    streams = memory.proxy(STREAMS)
    chat = streams.Chat([echo_pb2.EchoRequest(payload=b"1")], metadata={"token": "secret"})
    (reply,) = memory.run(_replies(chat))
    assert reply.metadata == {"token": "secret", "stamp": "added"}
    count = streams.Count(echo_pb2.CountRequest(count=2), timeout=30, metadata={"token": "secret"})
    assert len(memory.run(_replies(count))) == 2
    with pytest.raises(PermissionDeniedError, match="uploads are off"):
        streams.Sum([echo_pb2.EchoRequest()])
    assert memory.run(memory.proxy(ECHO).Echo(echo_pb2.EchoRequest(payload=b"u"))).metadata == {}
    assert stamper.seen == [
        ("mprpc.test.StreamService/Chat", {"token": "secret"}, None),
        ("mprpc.test.StreamService/Count", {"token": "secret"}, 30),
        ("mprpc.test.StreamService/Sum", {}, None),
    ]
    assert unary.seen == ["mprpc.test.EchoService/Echo"]
    assert [metadata for _, metadata, _ in gate.seen] == [
        {"token": "secret", "stamp": "added"},
        {"token": "secret", "stamp": "added"},
    ]
