"""Proxies: Deferred-returning methods named as in the service."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.message import Message
from twisted.internet.defer import Deferred

from twisted_rpc.client._balancer import Balancer
from twisted_rpc.core._service import MethodInfo

if TYPE_CHECKING:
    from twisted_rpc.client._client import Client


class ProxyMethod(Protocol):
    """A proxy's method, as type checkers see it: the request message, then
    ``timeout`` and ``metadata`` by keyword; a Deferred of the response (its
    class comes from the descriptor at run time, hence ``Any``)."""

    def __call__(
        self,
        request: Message,
        *,
        timeout: float | None = ...,
        metadata: Mapping[str, str] | None = ...,
    ) -> Deferred[Any]: ...


class ServiceProxy:
    """Deferred-returning methods named as in the service, built from its descriptor.

    ``proxy.Login(request, timeout=None, metadata=None)`` returns a Deferred
    that fires with the response message or fails with an ``RpcError``;
    ``d.cancel()`` cancels the call (CANCELLED) and tells the provider.
    """

    def __init__(
        self,
        client: Client,
        methods: Iterable[MethodInfo],
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: Balancer | None = None,
        idempotent: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        for method in methods:
            stub = _stub(client, method, timeout, metadata, balancer, method.name in idempotent)
            setattr(self, method.name, stub)

    if TYPE_CHECKING:
        # The methods are set per instance from the descriptor: a type checker
        # sees any attribute as one (at run time a missing one still raises).
        def __getattr__(self, name: str) -> ProxyMethod: ...


def _stub(
    client: Client,
    method: MethodInfo,
    default_timeout: float | None,
    default_metadata: Mapping[str, str] | None,
    balancer: Balancer | None,
    idempotent: bool,
) -> Callable[..., Any]:
    if method.client_streaming or method.server_streaming:
        return _stream_stub(client, method, default_metadata, balancer)
    call = client.call

    def stub(
        request: Message,
        *,
        timeout: float | None = default_timeout,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred[Message]:
        if default_metadata:
            metadata = {**default_metadata, **(metadata or {})}
        return call(method, request, timeout, metadata, idempotent, balancer)

    stub.__name__ = method.name
    stub.__qualname__ = f"{method.service}.{method.name}"
    stub.__doc__ = (
        f"Call {method.full_name}({method.request_class.DESCRIPTOR.full_name}) "
        f"-> Deferred[{method.response_class.DESCRIPTOR.full_name}]"
    )
    return stub


def _stream_stub(
    client: Client,
    method: MethodInfo,
    default_metadata: Mapping[str, str] | None,
    balancer: Balancer | None,
) -> Callable[..., Any]:
    """A streaming method: it returns the stream at once (a
    :class:`ServerStream`, :class:`ClientStream` or :class:`BidiStream`).
    A proxy's default timeout is for unary calls; a stream has a deadline
    only if given ``timeout`` or if its method's service config has one."""
    start = client.stream

    def stub(
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        if default_metadata:
            metadata = {**default_metadata, **(metadata or {})}
        return start(method, request, timeout, metadata, balancer)

    kind = (
        "BidiStream"
        if method.client_streaming and method.server_streaming
        else "ClientStream"
        if method.client_streaming
        else "ServerStream"
    )
    stub.__name__ = method.name
    stub.__qualname__ = f"{method.service}.{method.name}"
    stub.__doc__ = (
        f"Stream {method.full_name}({method.request_class.DESCRIPTOR.full_name}) "
        f"-> {kind}[{method.response_class.DESCRIPTOR.full_name}]"
    )
    return stub
