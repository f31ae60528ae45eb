"""The interfaces between twisted_rpc's layers (zope.interface)."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IServerInterceptor(Interface):
    """Wraps every call a provider serves (metadata, auth, metrics, logging)."""

    def intercept(request, context, proceed):
        """Handle one call.

        ``proceed(request, context)`` runs the rest of the chain and returns a
        response message or a Deferred of one. Return the same (or raise an
        ``RpcError`` to reject the call).
        """


class IClientInterceptor(Interface):
    """Wraps every call a client makes."""

    def intercept(call, request, proceed):
        """Handle one outgoing call.

        ``call`` is a :class:`twisted_rpc.ClientCall` (method, timeout,
        metadata, all modifiable); ``proceed(call, request)`` sends it and
        returns a Deferred of the response. Return a Deferred.
        """


class ICallObserver(Interface):
    """Told of every call a provider finishes (metrics, status page)."""

    def call_finished(method, code, duration):
        """``method`` is ``"package.Service/Method"`` (``"?/?"`` for an unknown
        route), ``code`` the status sent, ``duration`` seconds since the request."""


class IDrainable(Interface):
    """A listener that can be stopped gracefully (the native listener and
    the C++ one): refuse new calls, let the calls in flight finish, close."""

    def goaway():
        """Refuse new calls from now on, on every connection open and every
        one opened later (the native protocol sends GOAWAY SHUTDOWN; the C++
        one, which cannot say so, closes a refused call without a reply)."""

    def whenDrained():
        """A Deferred firing with None once no call is in flight (at once if
        none is); cancel it to stop waiting."""

    def closeConnections():
        """Close every connection once what was written to it is sent; returns
        a Deferred firing with None when all are closed (cancel it to stop
        waiting)."""

    def abortConnections():
        """Close every connection at once, dropping what is not sent."""


class IServiceDiscovery(Interface):
    """Where consumers learn which providers serve a service."""

    def subscribe(service, listener):
        """Call ``listener(addresses)`` with the provider list of ``service``
        (a full name), now if known and again on every change.

        ``addresses`` is a tuple of :class:`twisted_rpc.ProviderAddress`.
        Returns a no-argument callable that ends the subscription.
        """

    def close():
        """Release what the discovery holds; returns a Deferred."""


class IServiceRegistry(Interface):
    """Where providers announce the services they serve."""

    def register(registration):
        """Announce a :class:`twisted_rpc.Registration`; returns a Deferred."""

    def unregister_all():
        """Withdraw every announcement of this registry; returns a Deferred."""

    registrations = Attribute("The registrations currently announced (a sequence).")
