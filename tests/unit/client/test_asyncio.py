"""``awaitables="asyncio"``: asyncio Futures and stream adapters for asyncio tasks.

The adapters are driven on an asyncio loop run here directly (the streams
fed by hand, the client faked); one test runs ``asyncio_app.py`` in a
subprocess under Twisted's asyncio reactor, a real provider and client in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from testbed.echo_service import ECHO, STREAMS
from testbed.protos import echo_pb2
from tests.helpers import failure_of
from twisted_rpc import (
    AsyncioBidiStream,
    AsyncioClientStream,
    AsyncioServerStream,
    AsyncioServiceProxy,
    BidiStream,
    Client,
    ClientOptions,
    ClientStream,
    ConfigError,
    NotFoundError,
    ServerStream,
    StatusCode,
    load_consumer_config,
)
from twisted_rpc.client._asyncio import asyncio_loop
from twisted_rpc.core import describe

ROOT = Path(__file__).resolve().parents[3]
STREAM_METHODS = describe(STREAMS).methods
COUNT, SUM, CHAT = STREAM_METHODS["Count"], STREAM_METHODS["Sum"], STREAM_METHODS["Chat"]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _reply(n: int) -> bytes:
    return echo_pb2.EchoReply(call_id=n).SerializeToString()


# ------------------------------------------------------------------ settings


def test_awaitables_is_checked_and_read_from_an_ini_file(tmp_path: Path) -> None:
    assert ClientOptions().awaitables == "twisted"
    assert ClientOptions(awaitables="asyncio").awaitables == "asyncio"
    with pytest.raises(ValueError, match="awaitables must be one of twisted, asyncio"):
        ClientOptions(awaitables="trio")
    ini = tmp_path / "consumer.ini"
    ini.write_text("[consumer]\nawaitables = asyncio\n")
    assert load_consumer_config(str(ini)).options.awaitables == "asyncio"
    ini.write_text("[consumer]\nawaitables = gevent\n")
    with pytest.raises(ConfigError, match=r"\[consumer\] awaitables must be one of"):
        load_consumer_config(str(ini))


def test_asyncio_awaitables_without_the_asyncio_reactor_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"asyncioreactor\.install\(\)") as raised:
        Client(Clock(), awaitables="asyncio")
    assert "Clock" in str(raised.value)  # names the reactor it got
    client = Client(Clock())  # the default is unchanged: Deferreds, any reactor
    assert type(client.proxy(ECHO)) is not AsyncioServiceProxy


def test_the_asyncio_reactor_gives_its_loop(loop: asyncio.AbstractEventLoop) -> None:
    class Reactor:
        _asyncioEventloop = loop

    assert asyncio_loop(Reactor()) is loop


# ------------------------------------------------------------------ unary


class _FakeClient:
    """What a proxy calls: records each call, answers with a Deferred kept here."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.cancelled: list[str] = []
        self.pending: list[Deferred[Any]] = []
        self.streams: list[Any] = []

    def call(self, method: Any, request: Any, *args: Any) -> Deferred[Any]:
        self.calls.append((method.name, request, *args))
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(method.name))
        self.pending.append(d)
        return d

    def stream(self, method: Any, request: Any, *args: Any) -> Any:
        kind = {COUNT.name: ServerStream, SUM.name: ClientStream, CHAT.name: BidiStream}
        stream = kind[method.name](method, Clock())
        self.streams.append((stream, request))
        return stream


def _proxy(loop: asyncio.AbstractEventLoop, service: Any = ECHO) -> tuple[Any, _FakeClient]:
    client = _FakeClient()
    proxy = AsyncioServiceProxy(
        client,  # type: ignore[arg-type]
        describe(service).methods.values(),
        timeout=3,
        metadata={"a": "1"},
        loop=loop,
    )
    return proxy, client


def test_a_unary_call_is_an_asyncio_future(loop: asyncio.AbstractEventLoop) -> None:
    proxy, client = _proxy(loop)
    future = proxy.Echo(echo_pb2.EchoRequest(payload=b"x"))
    assert isinstance(future, asyncio.Future)
    assert client.calls[0][0] == "Echo" and client.calls[0][2:4] == (3, {"a": "1"})
    client.pending[0].callback(echo_pb2.EchoReply(payload=b"y"))
    assert loop.run_until_complete(future).payload == b"y"
    assert "asyncio.Future[mprpc.test.EchoReply]" in (proxy.Echo.__doc__ or "")


def test_a_failed_call_raises_its_typed_error(loop: asyncio.AbstractEventLoop) -> None:
    proxy, client = _proxy(loop)
    future = proxy.Echo(echo_pb2.EchoRequest())
    client.pending[0].errback(NotFoundError(message="gone"))
    with pytest.raises(NotFoundError, match="gone"):
        loop.run_until_complete(future)


def test_cancelling_the_future_cancels_the_call(loop: asyncio.AbstractEventLoop) -> None:
    proxy, client = _proxy(loop)

    async def give_up() -> None:
        await asyncio.wait_for(proxy.Echo(echo_pb2.EchoRequest()), 0.01)

    with pytest.raises(TimeoutError):
        loop.run_until_complete(give_up())
    assert client.cancelled == ["Echo"]  # the call's own canceller: CANCEL on the wire


# ------------------------------------------------------------------ streams


def test_async_for_and_read_over_a_server_stream(loop: asyncio.AbstractEventLoop) -> None:
    proxy, client = _proxy(loop, STREAMS)
    stream = proxy.Count(echo_pb2.CountRequest(count=3))
    assert isinstance(stream, AsyncioServerStream)
    call = stream.call
    call.message_received(_reply(0))

    async def read_all() -> list[int]:
        first = await stream.read()
        assert first is not None
        return [first.call_id] + [reply.call_id async for reply in stream]

    task = loop.create_task(read_all())
    loop.run_until_complete(asyncio.sleep(0))
    assert not task.done()  # waiting for the next reply
    call.message_received(_reply(1))
    call.message_received(_reply(2))
    call.end(None)
    assert loop.run_until_complete(task) == [0, 1, 2]
    assert stream.code == StatusCode.OK and stream.ended
    assert loop.run_until_complete(stream.read()) is None


def test_a_cancelled_read_takes_nothing(loop: asyncio.AbstractEventLoop) -> None:
    proxy, _ = _proxy(loop, STREAMS)
    stream = proxy.Count(echo_pb2.CountRequest(count=1))

    async def impatient() -> None:
        await asyncio.wait_for(stream.read(), 0.01)

    with pytest.raises(TimeoutError):
        loop.run_until_complete(impatient())
    assert stream.call.inbox.waiter is None  # the wait was withdrawn
    assert not stream.ended  # the stream goes on
    stream.call.message_received(_reply(7))
    reply = loop.run_until_complete(stream.read())
    assert reply is not None and reply.call_id == 7


def test_a_stream_that_fails_raises_after_its_replies(loop: asyncio.AbstractEventLoop) -> None:
    proxy, _ = _proxy(loop, STREAMS)
    stream = proxy.Count(echo_pb2.CountRequest(count=2))
    stream.call.message_received(_reply(0))
    stream.call.end(NotFoundError(message="no more"))
    got: list[int] = []

    async def read_all() -> None:
        async for reply in stream:
            got.append(reply.call_id)

    with pytest.raises(NotFoundError, match="no more"):
        loop.run_until_complete(read_all())
    assert got == [0]
    assert stream.code == StatusCode.NOT_FOUND and stream.details == "no more"


def test_cancel_ends_the_stream_cancelled(loop: asyncio.AbstractEventLoop) -> None:
    proxy, _ = _proxy(loop, STREAMS)
    stream = proxy.Count(echo_pb2.CountRequest(count=2))
    task = loop.create_task(stream.read())
    loop.run_until_complete(asyncio.sleep(0))
    stream.cancel()
    with pytest.raises(Exception, match="cancelled by the caller"):
        loop.run_until_complete(task)
    assert stream.code == StatusCode.CANCELLED


def test_initial_metadata_is_a_future_and_the_deferred_keeps_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    proxy, _ = _proxy(loop, STREAMS)
    stream = proxy.Chat()
    assert isinstance(stream, AsyncioBidiStream)
    future = stream.initial_metadata()
    stream.call.headers_received({"hello": "there"})
    assert loop.run_until_complete(future) == {"hello": "there"}
    assert loop.run_until_complete(stream.initial_metadata()) == {"hello": "there"}
    seen: list[Any] = []
    stream.call.initial_metadata.addCallback(seen.append)
    assert seen == [{"hello": "there"}]


def test_writes_before_the_stream_is_open_wait_and_fail_at_its_end(
    loop: asyncio.AbstractEventLoop,
) -> None:
    proxy, _ = _proxy(loop, STREAMS)
    stream = proxy.Sum()
    assert isinstance(stream, AsyncioClientStream)
    write = loop.create_task(stream.write(echo_pb2.EchoRequest(payload=b"a")))
    loop.run_until_complete(asyncio.sleep(0))
    assert not write.done()  # no connection yet: held
    with pytest.raises(TypeError, match="takes mprpc.test.EchoRequest, not CountRequest"):
        loop.run_until_complete(stream.write(echo_pb2.CountRequest()))  # type: ignore[arg-type]
    stream.cancel()
    with pytest.raises(Exception, match="cancelled"):
        loop.run_until_complete(write)


def test_an_async_iterable_of_requests_is_written_by_an_asyncio_task(
    loop: asyncio.AbstractEventLoop,
) -> None:
    proxy, client = _proxy(loop, STREAMS)

    async def requests() -> AsyncIterator[echo_pb2.EchoRequest]:
        await asyncio.sleep(0)  # an asyncio await: a Twisted coroutine could not run this
        if stream.ended:  # pragma: no cover - never: to make this a generator
            yield echo_pb2.EchoRequest(payload=b"a")
        raise RuntimeError("out of requests")

    stream = proxy.Sum(requests())
    assert client.streams[-1][1] is None  # the stream itself got no iterable
    loop.run_until_complete(asyncio.wait_for(stream._sender, 5))
    assert stream.code == StatusCode.CANCELLED
    assert "out of requests" in stream.details
    assert isinstance(failure_of(stream.call.done_writing()), Exception)


def test_a_client_stream_awaits_its_response(loop: asyncio.AbstractEventLoop) -> None:
    proxy, client = _proxy(loop, STREAMS)
    requests = [echo_pb2.EchoRequest(payload=b"a")]
    stream = proxy.Sum(requests)
    assert client.streams[-1][1] is requests  # a plain iterable goes as it is
    payload = echo_pb2.EchoReply(payload=b"1", call_id=1).SerializeToString()
    stream.call.response_received(0, "", None, payload)
    reply = loop.run_until_complete(_await(stream))
    assert reply.payload == b"1"


async def _await(stream: AsyncioClientStream[Any, Any]) -> Any:
    return await stream


# ------------------------------------------------------------------ the real thing


def test_an_asyncio_application_under_the_asyncio_reactor() -> None:
    """A provider and an asyncio task calling it, in a process of their own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    app = Path(__file__).with_name("asyncio_app.py")
    process = subprocess.Popen(
        [sys.executable, str(app)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {
        "unary_is_future": True,
        "unary": "hi",
        "error": ["NotFoundError", "nope"],
        "stream_is_adapter": True,
        "async_for": [0, 1, 2],
        "stream_code": "OK",
        "reads": [0, 1, None],
        "client_stream": ["12", 3],
        "bidi": ["one", "two"],
        "handler_started": True,
        "cancel_reached_provider": True,
        "wait_for": "timeout",
        "wait_for_reached_provider": True,
        "stream_cancel_reached_provider": "closed",
        "stream_cancel_code": "CANCELLED",
    }
