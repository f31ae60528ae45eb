"""The provider as a Twisted service, composed of child services.

:class:`ProviderService` is a MultiService whose children are the
:class:`ListenerService` s (the native one, the C++ one and the gRPC ones when
configured), the :class:`RegistrarService` (registers once the listeners are
bound, withdraws first on stop), the admin site (only when configured; its module is imported only
then) and whatever the caller adds (``makeService`` adds the ZooKeeper
registries). It runs the graceful stop across them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.application.service import Service as TwistedService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ServerFactory as TwistedServerFactory
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc.core._connection import CLOSE_TIMEOUT
from twisted_rpc.core._interfaces import IDrainable, IServerInterceptor, IServiceRegistry
from twisted_rpc.core._service import Service
from twisted_rpc.core._tls import wrap_server_factory
from twisted_rpc.cpp._listener import CppServerFactory
from twisted_rpc.discovery._static import StaticRegistry
from twisted_rpc.discovery._types import ProviderAddress, Registration
from twisted_rpc.grpc._listener import GrpcServerFactory
from twisted_rpc.ops._health import NOT_SERVING, add_builtins
from twisted_rpc.provider._options import ProviderOptions
from twisted_rpc.provider._systemd import server_endpoint
from twisted_rpc.server._dispatcher import Dispatcher, ServerMethod
from twisted_rpc.server._factory import ServerFactory

if TYPE_CHECKING:  # (the admin site's modules are imported only when configured)
    from twisted_rpc.ops._metrics import ProviderMetrics

__all__ = [
    "CppRegistry",
    "ListenerService",
    "ProviderReactor",
    "ProviderService",
    "RegistrarService",
    "open_connections",
]

log = Logger(namespace="twisted_rpc.provider")


class ProviderReactor(Protocol):
    """What a provider uses of a reactor: its clock (IReactorTime's
    ``seconds`` and ``callLater``) and what its endpoints listen with
    (IReactorTCP's ``listenTCP``; a ``unix:`` or ``ssl:`` endpoint also needs
    the reactor's ``listenUNIX`` or ``listenSSL``, which Twisted's endpoint
    strings do not type). Structural, so that any reactor (the global one, a
    ``MemoryReactorClock``) is accepted as it is."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...

    def listenTCP(
        self, port: int, factory: TwistedServerFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort: ...


class CppRegistry(Protocol):
    """Where the C++ listener's methods are announced for C++ callers (a
    ``ZooKeeperRegistry``)."""

    def register_cpp(self, service: str, method: str, address: ProviderAddress) -> Deferred[None]:
        """Announce ``/<service>/<method>`` at ``address``."""
        ...

    def unregister_all(self) -> Deferred[None]:
        """Withdraw every announcement."""
        ...


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """Wraps a server endpoint to learn the port it listens on."""

    def __init__(
        self, endpoint: IStreamServerEndpoint, on_listening: Callable[[IListeningPort], None]
    ) -> None:
        self.endpoint = endpoint
        self.on_listening = on_listening

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = self.endpoint.listen(factory)
        d.addCallback(self._report)
        return d

    def _report(self, port: IListeningPort) -> IListeningPort:
        self.on_listening(port)
        return port


def _log_failure(failure: Failure, /, message: str, **fields: object) -> None:
    """An errback: log ``failure`` (``message`` formatted with ``fields``)."""
    log.failure(message, failure, LogLevel.critical, **fields)


def _bound(port: IListeningPort) -> ProviderAddress:
    host = port.getHost()
    return ProviderAddress(getattr(host, "host", "?"), getattr(host, "port", 0))


def open_connections(listener: IDrainable) -> int:
    """Connections ``listener`` still holds (a listener factory's
    ``connections``; 0 for one that does not say)."""
    return len(getattr(listener, "connections", ()))


class ListenerService(StreamServerEndpointService):
    """One listener: an endpoint, the factory it serves, and the listener
    that factory is (``served``, when ``factory`` wraps it, e.g. in TLS) as
    the :class:`IDrainable` the graceful stop drives. ``on_listening`` is
    told the bound port."""

    def __init__(
        self,
        reactor: ProviderReactor,
        listen: str,
        factory: IProtocolFactory,
        on_listening: Callable[[IListeningPort], None],
        *,
        served: IDrainable | None = None,
    ) -> None:
        endpoint = _ReportingEndpoint(server_endpoint(reactor, listen), on_listening)
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]  # (not annotated)
        self._raiseSynchronously = True
        self.drainable: IDrainable = served if served is not None else IDrainable(factory)


class RegistrarService(TwistedService):
    """Announces the services once a listener is bound and withdraws every
    announcement first when stopped (before the listeners stop)."""

    name = "registrar"

    def __init__(
        self,
        dispatcher: Dispatcher,
        registry: IServiceRegistry,
        registration_data: dict[str, Any],
        cpp_registry: CppRegistry | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.registry = registry
        self.registration_data = registration_data
        self.cpp_registry = cpp_registry

    def register(self, advertise: ProviderAddress, protocols: dict[str, Any] | None = None) -> None:
        """Register every application service at ``advertise``; ``protocols``
        (``{"protocols": {...}}``, ``{"protocol": "grpc"}``) joins the data."""
        for name, service in sorted(self.dispatcher.services.items()):
            if service.builtin:
                continue
            info = type(service).service_info()
            data = {**self.registration_data, **(protocols or {}), "methods": sorted(info.methods)}
            d = self.registry.register(Registration(name, advertise, data))
            d.addErrback(_log_failure, "registering {service} failed", service=name)

    def register_cpp(
        self, advertise: ProviderAddress, routes: dict[tuple[str, str], ServerMethod]
    ) -> None:
        """Announce each method at ``/<Service>/<Method>`` for C++ callers."""
        if self.cpp_registry is None:
            return
        for (service, method), served in sorted(routes.items()):
            if self.dispatcher.services[served.info.service].builtin or served.streaming:
                continue  # Health and Reflection are for native callers; C++ has no streams
            d = self.cpp_registry.register_cpp(service, method, advertise)
            d.addErrback(_log_failure, "registering {p} failed", p=f"/{service}/{method}")

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # (Twisted's is not annotated)
        return Deferred.fromCoroutine(self._withdraw())

    async def _withdraw(self) -> None:
        # The same registry once, even when it is both.
        both: tuple[IServiceRegistry | CppRegistry | None, ...] = (self.registry, self.cpp_registry)
        registries = {id(r): r for r in both if r is not None}
        for registry in registries.values():
            try:
                await registry.unregister_all()
            except Exception:
                log.failure("withdrawing registrations failed")


def _admin_service(provider: ProviderService, options: ProviderOptions) -> IService:
    """The admin site and its metrics, imported only when configured."""
    from twisted_rpc.ops._admin import admin_site
    from twisted_rpc.ops._metrics import ProviderMetrics

    assert options.admin_listen is not None
    metrics = ProviderMetrics()
    metrics.watch_provider(provider)
    provider.metrics = metrics
    provider.factory.observer = metrics
    if provider.cpp_factory is not None:
        provider.cpp_factory.observer = metrics
    if provider.grpc_factory is not None:
        provider.grpc_factory.observer = metrics
    site = admin_site(provider, metrics, max_connections=options.admin_max_connections)
    endpoint = _ReportingEndpoint(
        server_endpoint(provider.reactor, options.admin_listen), provider._admin_listening
    )
    # Twisted's application services are not annotated.
    admin = StreamServerEndpointService(endpoint, site)  # type: ignore[no-untyped-call]
    admin._raiseSynchronously = True
    admin.setName("admin")  # type: ignore[no-untyped-call]
    return admin


class ProviderService(MultiService):
    """Serves ``services`` as ``options`` (a :class:`ProviderOptions`, or the
    same settings as keywords) say, and announces them.

    ``ProviderService(reactor, services, ProviderOptions(listen=...))``; the
    older ``ProviderService(reactor, listen, services, **settings)`` works too.
    ``registry`` (default: a ``StaticRegistry``), ``cpp_registry`` and
    ``interceptors`` are the collaborators given beside the options.

    With ``tls_options`` (see :func:`twisted_rpc.server_options`) every
    connection speaks TLS, and the registrations say so (``"tls": true``).

    With ``cpp_listen`` the same services are also served to C++ mprpc
    callers on a second endpoint (``docs/mprpc-compat.md``); with
    ``cpp_registry`` (a ``ZooKeeperRegistry``) each method is announced at
    ``/<Service>/<Method>`` as they expect. ``listen`` may then be None.

    With ``grpc_listen`` the same services are served to gRPC clients
    (HTTP/2, ``docs/grpc.md``) on those endpoints, over TLS (ALPN ``h2``)
    with ``tls_options``. The registrations then say on which port each
    protocol is (``"protocols": {"native": P, "grpc": G}``); a provider
    with only a gRPC listener registers its gRPC address with
    ``"protocol": "grpc"``.

    Children: the :class:`RegistrarService` (``"registrar"``), one
    :class:`ListenerService` per listener (``listeners``), the admin site
    (``"admin"``) when ``admin_listen`` is set, then what the caller adds.

    Stopping it (SIGTERM under twistd): health NOT_SERVING, the registrar
    withdraws the announcements, the listeners stop accepting, GOAWAY on
    every listener, the calls in flight get up to ``grace_period`` seconds
    (``whenDrained``, no polling), the connections are closed (aborted after
    ``CLOSE_TIMEOUT`` if they do not take their answers), then the other
    children stop.
    """

    def __init__(
        self,
        reactor: ProviderReactor,
        services: Sequence[Service] | str | None,
        options: ProviderOptions | Sequence[Service] | None = None,
        /,
        *,
        registry: IServiceRegistry | None = None,
        cpp_registry: CppRegistry | None = None,
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
        super().__init__()  # type: ignore[no-untyped-call]  # (Twisted's is not annotated)
        self.reactor = reactor
        # ProviderReactor is structural; what takes a clock names IReactorTime.
        clock = cast(IReactorTime, reactor)
        self.started_at: float | None = None
        self.dispatcher = Dispatcher(services, options.dispatcher_interceptors(interceptors))
        self.health = add_builtins(
            self.dispatcher, clock, health=options.health, reflection=options.reflection
        )
        self.factory = ServerFactory(self.dispatcher, clock, options.max_frame_size, options.limits)
        self.factory.slow_call_threshold = options.slow_call_threshold
        self.registry = registry if registry is not None else StaticRegistry()
        self.cpp_registry = cpp_registry
        self.advertise = options.advertise
        self.cpp_advertise = options.cpp_advertise
        self.grace_period = options.grace_period
        self.registration_data = {
            **options.registration_data,
            "tls": options.tls_options is not None,
        }
        self.port: IListeningPort | None = None
        self.listening: Deferred[ProviderAddress] = Deferred()
        """Fires with the native listener's bound address (else the gRPC one's)."""
        self.cpp_listening: Deferred[ProviderAddress] = Deferred()
        self.grpc_listening: Deferred[ProviderAddress] = Deferred()
        """Fires with the first gRPC listener's bound address."""
        self.grpc_advertise = options.grpc_advertise
        self._native_bound: ProviderAddress | None = None
        self._grpc_bound: ProviderAddress | None = None
        self.metrics: ProviderMetrics | None = None
        self.registrar = RegistrarService(
            self.dispatcher, self.registry, self.registration_data, cpp_registry
        )
        self.registrar.setServiceParent(self)  # type: ignore[no-untyped-call]  # (not annotated)
        self.listeners: list[ListenerService] = []
        if options.listen is not None:
            factory: IProtocolFactory = self.factory
            if options.tls_options is not None:
                factory = wrap_server_factory(self.factory, options.tls_options)
            self._add_listener(
                ListenerService(
                    reactor, options.listen, factory, self._listening, served=self.factory
                )
            )
        self.cpp_factory: CppServerFactory | None = None
        if options.cpp_listen is not None:
            self.cpp_factory = CppServerFactory(
                self.dispatcher, clock, options.max_frame_size, options.limits
            )
            self.cpp_factory.slow_call_threshold = options.slow_call_threshold
            self._add_listener(
                ListenerService(reactor, options.cpp_listen, self.cpp_factory, self._cpp_listening)
            )
        self.grpc_factory: GrpcServerFactory | None = None
        if options.grpc_listen:
            self.grpc_factory = GrpcServerFactory(self.dispatcher, clock, options.limits)
            self.grpc_factory.slow_call_threshold = options.slow_call_threshold
            grpc_factory: IProtocolFactory = self.grpc_factory
            if options.tls_options is not None:
                # TLS offers ALPN h2: the factory says so (IProtocolNegotiationFactory).
                grpc_factory = wrap_server_factory(self.grpc_factory, options.tls_options)
            for listen in options.grpc_listen:
                self._add_listener(
                    ListenerService(
                        reactor,
                        listen,
                        grpc_factory,
                        self._grpc_listening,
                        served=self.grpc_factory,
                    )
                )
        if options.admin_listen is not None:
            admin = _admin_service(self, options)
            admin.setServiceParent(self)  # type: ignore[no-untyped-call]  # (not annotated)

    log_observer: ILogObserver | None = None
    """When set, the application's log observer (twistd logs through it)."""

    def setServiceParent(self, parent: IServiceCollection | Componentized) -> None:
        """``parent``: a service collection, or twistd's application (which
        gets the :attr:`log_observer`)."""
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]  # (not annotated)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)

    def startService(self) -> None:
        self.started_at = self.reactor.seconds()
        super().startService()  # type: ignore[no-untyped-call]  # (Twisted's is not annotated)
        if self.metrics is not None:
            self.metrics.start_sampling(cast(IReactorTime, self.reactor))

    def _add_listener(self, listener: ListenerService) -> None:
        listener.setServiceParent(self)  # type: ignore[no-untyped-call]  # (not annotated)
        self.listeners.append(listener)

    def _admin_listening(self, port: IListeningPort) -> None:
        log.info("admin endpoint on http://{bound}/status (metrics: /metrics)", bound=_bound(port))

    @property
    def calls_in_flight(self) -> int:
        """Calls being served, over every protocol."""
        n = self.factory.calls_in_flight
        for other in (self.cpp_factory, self.grpc_factory):
            if other is not None:
                n += other.calls_in_flight
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
        assert self.cpp_factory is not None
        self.registrar.register_cpp(self.cpp_advertise, self.cpp_factory.routes)

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
        self._native_bound = bound
        self.listening.callback(bound)
        self._register()

    def _grpc_listening(self, port: IListeningPort) -> None:
        bound = _bound(port)
        log.info("gRPC listener on {bound}", bound=bound)
        if self._grpc_bound is not None:
            return  # (more than one endpoint: the first one is registered)
        self._grpc_bound = bound
        if self.grpc_advertise is None:
            self.grpc_advertise = bound
        self.grpc_listening.callback(bound)
        if self.options.listen is None:
            log.info(
                "mprpc provider (gRPC only) advertised as {advertise}, serving {services}",
                advertise=self.grpc_advertise,
                services=" ".join(sorted(self.dispatcher.services)),
            )
            self.listening.callback(bound)
        self._register()

    def _register(self) -> None:
        """Register once the listeners are bound: at the native address (with
        both ports if gRPC too), or at the gRPC one with ``"protocol": "grpc"``."""
        native = self.options.listen is not None
        grpc = bool(self.options.grpc_listen)
        if (native and self._native_bound is None) or (grpc and self._grpc_bound is None):
            return
        if not grpc:
            assert self.advertise is not None
            self.registrar.register(self.advertise)
            return
        assert self.grpc_advertise is not None
        grpc_port = self.grpc_advertise.port
        if native:
            assert self.advertise is not None
            ports = {"native": self.advertise.port, "grpc": grpc_port}
            self.registrar.register(self.advertise, {"protocols": ports})
        else:
            ports = {"grpc": grpc_port}
            self.registrar.register(self.grpc_advertise, {"protocol": "grpc", "protocols": ports})

    async def _calls_finished(self, drainables: list[IDrainable]) -> None:
        """Wait until no call is in flight, for at most the grace period."""
        drained = DeferredList([d.whenDrained() for d in drainables], consumeErrors=True)
        if drained.called:
            return
        # Cancelled when the grace period is over: it then fires all the same.
        timer = self.reactor.callLater(self.grace_period, drained.cancel)
        try:
            await drained
        finally:
            if timer.active():
                timer.cancel()

    async def _connections_closed(self, drainables: list[IDrainable]) -> None:
        """Close the connections once their answers are sent, waiting for
        that at most CLOSE_TIMEOUT seconds; then abort those left."""
        closed = DeferredList([d.closeConnections() for d in drainables], consumeErrors=True)
        if closed.called:
            return
        timer = self.reactor.callLater(CLOSE_TIMEOUT, closed.cancel)
        try:
            await closed
        finally:
            if timer.active():
                timer.cancel()
        left = sum(open_connections(d) for d in drainables)
        if left:
            log.warn("aborting {left} connections that did not take their answers", left=left)
            for drainable in drainables:
                drainable.abortConnections()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Health NOT_SERVING, withdraw the registrations, stop listening,
        GOAWAY on every listener, wait for the calls in flight (at most
        ``grace_period``), close the connections, then stop the other children."""
        if not self.running:
            return
        self.running = False
        self.health.set_all(NOT_SERVING)  # health watchers learn of the drain first
        await self.registrar.stopService()
        for listener in self.listeners:
            await listener.stopService()  # type: ignore[no-untyped-call]  # (not annotated)
        # (The gRPC listener's endpoints share one factory: drained once.)
        drainables = list({id(each.drainable): each.drainable for each in self.listeners}.values())
        for drainable in drainables:
            drainable.goaway()
        await self._calls_finished(drainables)
        left = self.calls_in_flight
        if left:
            log.warn("grace period over: closing with {left} calls in flight", left=left)
        await self._connections_closed(drainables)
        if self.metrics is not None:
            self.metrics.stop_sampling()
        done = {self.registrar, *self.listeners}
        for service in reversed(list(self)):
            if service not in done and service.running:
                await service.stopService()
