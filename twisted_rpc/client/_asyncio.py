"""asyncio awaitables: what proxies hand out with ``Client(..., awaitables="asyncio")``.

Under Twisted's asyncio reactor an asyncio task cannot ``await`` a Deferred
(asyncio refuses it: ``Task got bad yield``). A client built with
``awaitables="asyncio"`` gives :class:`AsyncioServiceProxy` objects instead:
a unary method returns an ``asyncio.Future`` (``Deferred.asFuture``:
cancelling the future cancels the call, and the provider is told), a
streaming one an :class:`AsyncioServerStream`, :class:`AsyncioClientStream`
or :class:`AsyncioBidiStream`, thin adapters over the Twisted stream that
asyncio tasks ``async for`` over, ``await stream.read()`` and
``await stream.write(m)``. See docs/asyncio.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._balancer import Balancer
from twisted_rpc.client._proxy import ServiceProxy
from twisted_rpc.client._streams import StreamCall
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import CancelledError, RpcError, StatusCode

if TYPE_CHECKING:
    from twisted_rpc.client._client import Client

__all__ = [
    "AsyncioBidiStream",
    "AsyncioClientStream",
    "AsyncioProxyMethod",
    "AsyncioServerStream",
    "AsyncioServiceProxy",
    "as_future",
    "asyncio_loop",
]

log = Logger(namespace="twisted_rpc.client")

T = TypeVar("T")
RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


def asyncio_loop(reactor: object) -> asyncio.AbstractEventLoop:
    """The asyncio event loop ``reactor`` runs on; a ValueError saying how
    to get one if ``reactor`` is not Twisted's asyncio reactor."""
    loop = getattr(reactor, "_asyncioEventloop", None)
    if not isinstance(loop, asyncio.AbstractEventLoop):
        raise ValueError(
            'awaitables="asyncio" needs Twisted\'s asyncio reactor: call '
            "twisted.internet.asyncioreactor.install() before the reactor is "
            "first imported (twistd: --reactor=asyncio); this client's reactor "
            f"is {reactor!r}"
        )
    return loop


def as_future(d: Deferred[T], loop: asyncio.AbstractEventLoop) -> asyncio.Future[T]:
    """An asyncio Future of ``d``'s result (``Deferred.asFuture``): cancelling
    the future cancels ``d``; ``d`` failing (a cancelled call with the typed
    ``CancelledError``) fails the future. ``d`` is consumed."""
    return d.asFuture(loop)


def _watch(d: Deferred[T], loop: asyncio.AbstractEventLoop) -> asyncio.Future[T]:
    """A future of ``d``'s result that leaves the result in ``d`` for its
    other readers; cancelling the future does not cancel ``d``."""
    future: asyncio.Future[T] = loop.create_future()

    def done(result: object) -> object:
        if not future.done():
            if isinstance(result, Failure):
                future.set_exception(cast(BaseException, result.value))
            else:
                future.set_result(result)  # type: ignore[arg-type]
        return result

    d.addBoth(done)
    return future


class AsyncioProxyMethod(Protocol):
    """A method of an :class:`AsyncioServiceProxy`, as type checkers see it:
    the request message, then ``timeout`` and ``metadata`` by keyword; an
    asyncio Future of the response (a streaming method returns its adapter)."""

    def __call__(
        self,
        request: Message,
        *,
        timeout: float | None = ...,
        metadata: Mapping[str, str] | None = ...,
    ) -> asyncio.Future[Any]: ...


class AsyncioServiceProxy(ServiceProxy):
    """A :class:`ServiceProxy` for asyncio tasks: what ``client.proxy()``
    builds when the client has ``awaitables="asyncio"``.

    ``await proxy.Login(request, timeout=2)`` in an asyncio task; the call
    is an ``asyncio.Future`` (``future.cancel()`` cancels the call: CANCEL
    to the provider). Streaming methods return :class:`AsyncioServerStream`,
    :class:`AsyncioClientStream` or :class:`AsyncioBidiStream`. Narrow a
    proxy's type with ``assert isinstance(proxy, AsyncioServiceProxy)``.
    """

    def __init__(
        self,
        client: Client,
        methods: Iterable[MethodInfo],
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: Balancer | None = None,
        idempotent: set[str] | frozenset[str] = frozenset(),
        *,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        methods = list(methods)
        super().__init__(client, methods, timeout, metadata, balancer, idempotent)
        self.loop = loop
        for method in methods:
            stub = getattr(self, method.name)
            if method.client_streaming or method.server_streaming:
                wrapped = _stream_stub(stub, method, loop)
            else:
                wrapped = _unary_stub(stub, loop)
            wrapped.__name__ = stub.__name__
            wrapped.__qualname__ = stub.__qualname__
            wrapped.__doc__ = stub.__doc__.replace("Deferred[", "asyncio.Future[").replace(
                "Stream[", "Stream (asyncio)["
            )
            setattr(self, method.name, wrapped)

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> AsyncioProxyMethod:  # type: ignore[override]
            ...


def _unary_stub(stub: Callable[..., Deferred[Any]], loop: asyncio.AbstractEventLoop) -> Any:
    def call(request: Message, **kw: Any) -> asyncio.Future[Any]:
        return stub(request, **kw).asFuture(loop)

    return call


def _stream_stub(
    stub: Callable[..., Any], method: MethodInfo, loop: asyncio.AbstractEventLoop
) -> Any:
    kind: type[_Stream[Any, Any]] = (
        AsyncioBidiStream
        if method.client_streaming and method.server_streaming
        else AsyncioClientStream
        if method.client_streaming
        else AsyncioServerStream
    )

    def start(request: Any = None, **kw: Any) -> _Stream[Any, Any]:
        if method.client_streaming and hasattr(request, "__aiter__"):
            # An async iterable may await asyncio things: an asyncio task
            # writes it, not the Twisted coroutine send_all would run.
            adapter = kind(stub(None, **kw), loop)
            adapter.send_all(request)
            return adapter
        return kind(stub(request, **kw), loop)

    return start


class _Stream(Generic[RequestT, ResponseT]):
    """What every adapter has: the Twisted stream (``call``), its end, cancel."""

    def __init__(self, call: StreamCall[RequestT, ResponseT], loop: asyncio.AbstractEventLoop):
        self.call = call
        self.loop = loop
        self._sender: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.call!r}>"

    @property
    def ended(self) -> bool:
        return self.call.ended

    @property
    def code(self) -> StatusCode | None:
        """The final status once the stream ended (see :class:`StreamCall`)."""
        return self.call.code

    @property
    def details(self) -> str:
        return self.call.details

    @property
    def trailing_metadata(self) -> Mapping[str, str] | None:
        return self.call.trailing_metadata

    def initial_metadata(self) -> asyncio.Future[Mapping[str, str]]:
        """A future of what the provider sent first (``{}`` if nothing)."""
        return _watch(self.call.initial_metadata, self.loop)

    def cancel(self) -> None:
        """Give up: the provider is told (CANCEL), the stream ends CANCELLED."""
        self.call.cancel()

    # ----------------------------------------------------------------- replies

    def __aiter__(self) -> _Stream[RequestT, ResponseT]:
        return self

    async def __anext__(self) -> ResponseT:
        reply = await self.read()
        if reply is None:
            raise StopAsyncIteration
        return reply

    async def read(self) -> ResponseT | None:
        """The next reply; None at the end; raises the typed ``RpcError``
        when the stream ends with an error. Cancelling the read (its task)
        takes nothing: the stream goes on."""
        inbox = self.call.inbox
        while not inbox.ready():
            await as_future(inbox.wait(), self.loop)
        return inbox.take()  # type: ignore[no-any-return]

    # ----------------------------------------------------------------- requests

    async def write(self, message: RequestT) -> None:
        """Send ``message``, once the provider's window allows."""
        await as_future(self.call.write(message), self.loop)

    async def done_writing(self) -> None:
        """No more requests (once those written are sent)."""
        await as_future(self.call.done_writing(), self.loop)

    def send_all(
        self, requests: Iterable[RequestT] | AsyncIterable[RequestT]
    ) -> asyncio.Task[None]:
        """Write every request of ``requests`` from an asyncio task, then
        :meth:`done_writing`; if the iterable raises, the stream is
        cancelled with that error's text."""
        self._sender = self.loop.create_task(self._send_all(requests))
        return self._sender

    async def _send_all(self, requests: Iterable[RequestT] | AsyncIterable[RequestT]) -> None:
        try:
            if isinstance(requests, AsyncIterable):
                async for message in requests:
                    await self.write(message)
            else:
                for message in requests:
                    await self.write(message)
        except RpcError:
            return  # the stream ended: its readers see why
        except Exception as e:
            if self.call.code is None:
                log.failure(
                    "stream {method}: its requests' iterator failed",
                    method=self.call.method.full_name,
                )
                self.call._cancel(CancelledError(message=f"the requests' iterator raised {e!r}"))
            return
        try:
            await self.done_writing()
        except RpcError:
            return


class AsyncioServerStream(_Stream[Message, ResponseT]):
    """A server-streaming call for asyncio tasks: ``async for reply in
    stream``, ``await stream.read()`` (None at the end), ``stream.cancel()``;
    ``stream.call`` is the Twisted :class:`ServerStream`."""


class AsyncioClientStream(_Stream[RequestT, ResponseT]):
    """A client-streaming call for asyncio tasks: ``await stream.write(m)``,
    ``await stream.done_writing()``, then ``await stream`` for the response
    (or the typed ``RpcError``)."""

    async def response(self) -> ResponseT:
        reply = await self.read()
        if reply is None:  # pragma: no cover - an OK end always has one
            raise RpcError(StatusCode.INTERNAL, "the stream ended without a response")
        return reply

    def __await__(self) -> Generator[Any, Any, ResponseT]:
        return self.response().__await__()


class AsyncioBidiStream(_Stream[RequestT, ResponseT]):
    """A bidirectional stream for asyncio tasks: ``write``/``done_writing``
    (or ``send_all``) and ``async for``/``read`` at once."""
