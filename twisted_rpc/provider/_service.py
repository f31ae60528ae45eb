"""The provider as a Twisted service: listener, dispatcher, registry, graceful stop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from twisted_rpc.core._connection import CLOSE_TIMEOUT
from twisted_rpc.core._interfaces import IServerInterceptor, IServiceRegistry
from twisted_rpc.core._service import Service
from twisted_rpc.core._tls import wrap_server_factory
from twisted_rpc.cpp._listener import CppServerFactory
from twisted_rpc.discovery._static import StaticRegistry
from twisted_rpc.discovery._types import ProviderAddress, Registration
from twisted_rpc.ops._admin import admin_site
from twisted_rpc.ops._health import NOT_SERVING, add_builtins
from twisted_rpc.ops._metrics import ProviderMetrics
from twisted_rpc.provider._options import ProviderOptions
from twisted_rpc.server._dispatcher import Dispatcher
from twisted_rpc.server._factory import ServerFactory

__all__ = ["ProviderService"]

log = Logger(namespace="twisted_rpc.provider")


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """Wraps a server endpoint to learn the port it listens on."""

    def __init__(self, endpoint: IStreamServerEndpoint, on_listening: Any) -> None:
        self.endpoint = endpoint
        self.on_listening = on_listening

    def listen(self, factory: Any) -> Deferred:
        d = self.endpoint.listen(factory)
        d.addCallback(self._report)
        return d

    def _report(self, port: IListeningPort) -> IListeningPort:
        self.on_listening(port)
        return port


def _bound(port: IListeningPort) -> ProviderAddress:
    host = port.getHost()
    return ProviderAddress(getattr(host, "host", "?"), getattr(host, "port", 0))


class ProviderService(MultiService):
    """Serves ``services`` on the endpoint ``listen`` and announces them.

    With ``tls_options`` (see :func:`twisted_rpc.server_options`) every
    connection speaks TLS, and the registrations say so (``"tls": true``).

    With ``cpp_listen`` the same services are also served to C++ mprpc
    callers on a second endpoint (``docs/mprpc-compat.md``); with
    ``cpp_registry`` (a ``ZooKeeperRegistry``) each method is announced at
    ``/<Service>/<Method>`` as they expect. ``listen`` may then be None.

    Stopping it (SIGTERM under twistd) withdraws the announcements, stops
    accepting, sends GOAWAY, lets calls in flight finish for up to
    ``grace_period`` seconds, then closes the connections.
    """

    def __init__(
        self,
        reactor: Any,
        services: Sequence[Service] | str | None,
        options: ProviderOptions | Sequence[Service] | None = None,
        /,
        *,
        registry: IServiceRegistry | None = None,
        cpp_registry: Any = None,
        interceptors: Sequence[IServerInterceptor] = (),
        **settings: Any,
    ) -> None:
        if services is None or isinstance(services, str):
            # The older form ProviderService(reactor, listen, services, **settings).
            settings["listen"] = services
            services, options = options, None  # type: ignore[assignment]
        unknown = set(settings) - ProviderOptions.field_names()
        if unknown:
            raise TypeError(f"ProviderService: unknown settings {sorted(unknown)}")
        if options is None:
            options = ProviderOptions(**settings)
        elif not isinstance(options, ProviderOptions):
            raise TypeError(f"ProviderService: options must be ProviderOptions, not {options!r}")
        elif settings:
            options = replace(options, **settings)
        self.options: ProviderOptions = options
        assert services is not None and not isinstance(services, (str, ProviderOptions))
        listen = options.listen
        advertise = options.advertise
        grace_period = options.grace_period
        max_frame_size = options.max_frame_size
        registration_data = options.registration_data
        limits = options.limits
        tls_options = options.tls_options
        cpp_listen = options.cpp_listen
        cpp_advertise = options.cpp_advertise
        health = options.health
        reflection = options.reflection
        admin_listen = options.admin_listen
        admin_max_connections = options.admin_max_connections
        slow_call_threshold = options.slow_call_threshold
        super().__init__()
        self.reactor = reactor
        self.started_at: float | None = None
        self.dispatcher = Dispatcher(services, interceptors)
        self.health = add_builtins(self.dispatcher, reactor, health=health, reflection=reflection)
        self.factory = ServerFactory(self.dispatcher, reactor, max_frame_size, limits)
        self.registry = registry if registry is not None else StaticRegistry()
        self.advertise = advertise
        self.grace_period = grace_period
        self.registration_data = {**(registration_data or {}), "tls": tls_options is not None}
        self.port: IListeningPort | None = None
        self.listening: Deferred = Deferred()
        self.listeners: list[StreamServerEndpointService] = []
        if listen is not None:
            listening_factory = self.factory
            if tls_options is not None:
                listening_factory = wrap_server_factory(self.factory, tls_options)
            self._add_listener(listen, listening_factory, self._listening)
        self.cpp_factory: CppServerFactory | None = None
        self.cpp_advertise = cpp_advertise
        self.cpp_registry = cpp_registry
        self.cpp_listening: Deferred = Deferred()
        if cpp_listen is not None:
            self.cpp_factory = CppServerFactory(self.dispatcher, reactor, max_frame_size, limits)
            self._add_listener(cpp_listen, self.cpp_factory, self._cpp_listening)
        if not self.listeners:
            raise ValueError("a provider needs listen, cpp_listen or both")
        self.factory.slow_call_threshold = slow_call_threshold
        self.metrics: ProviderMetrics | None = None
        if admin_listen is not None:
            self.metrics = ProviderMetrics()
            self.metrics.watch_provider(self)
            self.factory.observer = self.metrics
            if self.cpp_factory is not None:
                self.cpp_factory.observer = self.metrics
            endpoint = _ReportingEndpoint(
                serverFromString(reactor, admin_listen), self._admin_listening
            )
            site = admin_site(self, self.metrics, max_connections=admin_max_connections)
            admin = StreamServerEndpointService(endpoint, site)
            admin._raiseSynchronously = True
            admin.setServiceParent(self)

    log_observer: Any = None
    """When set, the application's log observer (twistd logs through it)."""

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)

    def startService(self) -> None:
        self.started_at = self.reactor.seconds()
        super().startService()
        if self.metrics is not None:
            self.metrics.start_sampling(self.reactor)

    def _admin_listening(self, port: IListeningPort) -> None:
        log.info("admin endpoint on http://{bound}/status (metrics: /metrics)", bound=_bound(port))

    def _add_listener(self, listen: str, factory: Any, on_listening: Any) -> None:
        endpoint = _ReportingEndpoint(serverFromString(self.reactor, listen), on_listening)
        listener = StreamServerEndpointService(endpoint, factory)
        listener._raiseSynchronously = True
        listener.setServiceParent(self)
        self.listeners.append(listener)

    @property
    def calls_in_flight(self) -> int:
        """Calls being served, over both protocols."""
        n = self.factory.calls_in_flight
        if self.cpp_factory is not None:
            n += self.cpp_factory.calls_in_flight
        return n

    def _cpp_listening(self, port: IListeningPort) -> None:
        bound = _bound(port)
        if self.cpp_advertise is None:
            self.cpp_advertise = bound
        log.info(
            "mprpc-compatible listener on {bound}, advertised as {advertise}",
            bound=bound,
            advertise=self.cpp_advertise,
        )
        self.cpp_listening.callback(bound)
        if self.cpp_registry is None:
            return
        assert self.cpp_factory is not None
        for (service, method), served in sorted(self.cpp_factory.routes.items()):
            if self.dispatcher.services[served.info.service].builtin:
                continue  # Health and Reflection are for native callers
            d = self.cpp_registry.register_cpp(service, method, self.cpp_advertise)
            d.addErrback(
                lambda f, p=f"/{service}/{method}": log.failure("registering {p} failed", f, p=p)
            )

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        bound = _bound(port)
        if self.advertise is None:
            self.advertise = bound
        log.info(
            "mprpc provider listening on {bound}, advertised as {advertise}, serving {services}",
            bound=bound,
            advertise=self.advertise,
            services=" ".join(sorted(self.dispatcher.services)),
        )
        self.listening.callback(bound)
        for name, service in sorted(self.dispatcher.services.items()):
            if service.builtin:
                continue
            info = type(service).service_info()
            data = {**self.registration_data, "methods": sorted(info.methods)}
            d = self.registry.register(Registration(name, self.advertise, data))
            d.addErrback(
                lambda f, n=name: log.failure("registering {service} failed", f, service=n)
            )

    async def _calls_finished(self, factories: list[Any]) -> None:
        """Wait until no call is in flight, for at most the grace period."""
        drained = DeferredList([f.when_idle() for f in factories], consumeErrors=True)
        if drained.called:
            return
        # Cancelled when the grace period is over: it then fires all the same.
        timer = self.reactor.callLater(self.grace_period, drained.cancel)
        try:
            await drained
        finally:
            if timer.active():
                timer.cancel()

    async def _connections_closed(self, factories: list[Any]) -> None:
        """Close the connections once their answers are sent, waiting for
        that at most CLOSE_TIMEOUT seconds; then abort those left."""
        closed = DeferredList([f.close_connections() for f in factories], consumeErrors=True)
        if closed.called:
            return
        timer = self.reactor.callLater(CLOSE_TIMEOUT, closed.cancel)
        try:
            await closed
        finally:
            if timer.active():
                timer.cancel()
        left = sum(len(f.connections) for f in factories)
        if left:
            log.warn("aborting {left} connections that did not take their answers", left=left)
            for factory in factories:
                factory.abort_connections()

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self.health.set_all(NOT_SERVING)  # health watchers learn of the drain first
        registries = [self.registry]
        if self.cpp_registry is not None and self.cpp_registry is not self.registry:
            registries.append(self.cpp_registry)
        for registry in registries:
            try:
                await registry.unregister_all()
            except Exception:
                log.failure("withdrawing registrations failed")
        for listener in self.listeners:
            await listener.stopService()
        factories: list[Any] = [self.factory]
        if self.cpp_factory is not None:
            factories.append(self.cpp_factory)
        for factory in factories:
            factory.goaway()
        await self._calls_finished(factories)
        left = self.calls_in_flight
        if left:
            log.warn("grace period over: closing with {left} calls in flight", left=left)
        await self._connections_closed(factories)
        if self.metrics is not None:
            self.metrics.stop_sampling()
        for service in reversed(list(self)):
            if service not in self.listeners and service.running:
                await service.stopService()
