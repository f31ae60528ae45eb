"""The interfaces between twisted_rpc's layers (zope.interface).

``core`` imports nothing above it, so the types those layers define (the
server's ``CallContext``, the client's ``ClientCall``, discovery's
``Registration`` and ``ProviderAddress``) appear here as ``Any``; the
implementations annotate them with the real classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

ServerProceed = Callable[[Message, Any], Any]
"""The rest of a provider's interceptor chain: ``(request, context)`` → a
response message, a Deferred of one or a coroutine."""

ClientProceed = Callable[[Any, Message], "Deferred[Message]"]
"""The rest of a client's interceptor chain: ``(call, request)`` → a Deferred
of the response."""


class IServerInterceptor(Interface):
    """Wraps every call a provider serves (metadata, auth, metrics, logging)."""

    def intercept(request: Message, context: Any, proceed: ServerProceed) -> Any:
        """Handle one call.

        ``proceed(request, context)`` runs the rest of the chain and returns a
        response message or a Deferred of one. Return the same (or raise an
        ``RpcError`` to reject the call).
        """


class IServerStreamInterceptor(Interface):
    """Wraps every streaming call a provider serves (an interceptor may
    provide this and :class:`IServerInterceptor` both; one that provides
    only this one sees no unary call, and the other way round)."""

    def intercept_stream(request: Any, context: Any, proceed: ServerProceed) -> Any:
        """Handle one streaming call as it starts.

        ``request`` is the request (server streaming) or the stream of
        requests (client streaming, bidi: an async iterator); ``context``
        the :class:`twisted_rpc.CallContext`. ``proceed(request, context)``
        runs the rest of the chain and returns the handler's result (an async
        iterable of responses, or for client streaming, the response or a
        Deferred or coroutine of it). Return the same, possibly wrapped
        (e.g. an async generator re-yielding what it yields), or raise an
        ``RpcError`` to refuse the stream.
        """


class IClientStreamInterceptor(Interface):
    """Wraps every streaming call a client starts."""

    def intercept_stream(call: Any, request: Any, proceed: Callable[[Any, Any], Any]) -> Any:
        """Handle one outgoing stream as it starts.

        ``call`` is a :class:`twisted_rpc.ClientCall` (method, timeout,
        metadata, all modifiable); ``request`` the request (server
        streaming), or the requests' iterable or None (client streaming,
        bidi); ``proceed(call, request)`` starts the stream and returns its
        stream object (:class:`twisted_rpc.ServerStream`, ``ClientStream``
        or ``BidiStream``). Return that object (or raise an ``RpcError``).
        """


class IClientInterceptor(Interface):
    """Wraps every call a client makes."""

    def intercept(call: Any, request: Message, proceed: ClientProceed) -> Deferred[Message]:
        """Handle one outgoing call.

        ``call`` is a :class:`twisted_rpc.ClientCall` (method, timeout,
        metadata, all modifiable); ``proceed(call, request)`` sends it and
        returns a Deferred of the response. Return a Deferred.
        """


class ICallObserver(Interface):
    """Told of every call a provider finishes (metrics, status page)."""

    def call_finished(method: str, code: int, duration: float) -> None:
        """``method`` is ``"package.Service/Method"`` (``"?/?"`` for an unknown
        route), ``code`` the status sent, ``duration`` seconds since the request."""

    # Optional (looked up with getattr, so observers written before streams
    # still work): ``stream_started(method)`` when a stream starts, and
    # ``stream_finished(method, received, sent, code)`` when it ends, with the
    # messages it received and sent and its status (CANCELLED when the
    # consumer cancelled or the connection was lost). ``call_finished`` is
    # told of a stream's end too.


class IDrainable(Interface):
    """A listener that can be stopped gracefully (the native listener and
    the C++ one): refuse new calls, let the calls in flight finish, close."""

    def goaway() -> None:
        """Refuse new calls from now on, on every connection open and every
        one opened later (the native protocol sends GOAWAY SHUTDOWN; the C++
        one, which cannot say so, closes a refused call without a reply)."""

    def whenDrained() -> Deferred[None]:
        """A Deferred firing with None once no call is in flight (at once if
        none is); cancel it to stop waiting."""

    def closeConnections() -> Deferred[None]:
        """Close every connection once what was written to it is sent; returns
        a Deferred firing with None when all are closed (cancel it to stop
        waiting)."""

    def abortConnections() -> None:
        """Close every connection at once, dropping what is not sent."""


class IServiceDiscovery(Interface):
    """Where consumers learn which providers serve a service."""

    def subscribe(
        service: str, listener: Callable[[tuple[Any, ...]], object]
    ) -> Callable[[], None]:
        """Call ``listener(addresses)`` with the provider list of ``service``
        (a full name), now if known and again on every change.

        ``addresses`` is a tuple of :class:`twisted_rpc.ProviderAddress`.
        Returns a no-argument callable that ends the subscription.
        """

    def close() -> Deferred[None]:
        """Release what the discovery holds; returns a Deferred."""


class IServiceRegistry(Interface):
    """Where providers announce the services they serve."""

    def register(registration: Any) -> Deferred[None]:
        """Announce a :class:`twisted_rpc.Registration`; returns a Deferred."""

    def unregister_all() -> Deferred[None]:
        """Withdraw every announcement of this registry; returns a Deferred."""

    registrations = Attribute("The registrations currently announced (a sequence).")
