"""The provider as a Twisted service: listener, dispatcher, registry, graceful stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from twisted_rpc import wire
from twisted_rpc.interfaces import IServerInterceptor, IServiceRegistry
from twisted_rpc.registry import ProviderAddress, Registration, StaticRegistry
from twisted_rpc.server import Dispatcher, ServerFactory, ServerLimits
from twisted_rpc.service import Service
from twisted_rpc.tls import wrap_server_factory

__all__ = ["ProviderService"]

log = Logger()


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


class ProviderService(MultiService):
    """Serves ``services`` on the endpoint ``listen`` and announces them.

    With ``tls_options`` (see :func:`twisted_rpc.tls.server_options`) every
    connection speaks TLS, and the registrations say so (``"tls": true``).

    Stopping it (SIGTERM under twistd) withdraws the announcements, stops
    accepting, sends GOAWAY, lets calls in flight finish for up to
    ``grace_period`` seconds, then closes the connections.
    """

    def __init__(
        self,
        reactor: Any,
        listen: str,
        services: Sequence[Service],
        *,
        advertise: ProviderAddress | None = None,
        registry: IServiceRegistry | None = None,
        interceptors: Sequence[IServerInterceptor] = (),
        grace_period: float = 10.0,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        registration_data: dict[str, Any] | None = None,
        limits: ServerLimits | None = None,
        tls_options: Any = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.dispatcher = Dispatcher(services, interceptors)
        self.factory = ServerFactory(self.dispatcher, reactor, max_frame_size, limits)
        self.registry = registry if registry is not None else StaticRegistry()
        self.advertise = advertise
        self.grace_period = grace_period
        self.registration_data = {**(registration_data or {}), "tls": tls_options is not None}
        self.port: IListeningPort | None = None
        self.listening: Deferred = Deferred()
        endpoint = _ReportingEndpoint(serverFromString(reactor, listen), self._listening)
        listening_factory = self.factory
        if tls_options is not None:
            listening_factory = wrap_server_factory(self.factory, tls_options)
        self.listener = StreamServerEndpointService(endpoint, listening_factory)
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        host = port.getHost()
        bound = ProviderAddress(getattr(host, "host", "?"), getattr(host, "port", 0))
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
            info = type(service).service_info()
            data = {**self.registration_data, "methods": sorted(info.methods)}
            d = self.registry.register(Registration(name, self.advertise, data))
            d.addErrback(
                lambda f, n=name: log.failure("registering {service} failed", f, service=n)
            )

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self.running:
            return
        self.running = False
        try:
            await self.registry.unregister_all()
        except Exception:
            log.failure("withdrawing registrations failed")
        await self.listener.stopService()
        self.factory.goaway()
        waited = 0.0
        step = 0.02
        while self.factory.calls_in_flight and waited < self.grace_period:
            await deferLater(self.reactor, step, lambda: None)
            waited += step
        left = self.factory.calls_in_flight
        if left:
            log.warn("grace period over: closing with {left} calls in flight", left=left)
        self.factory.close_connections()
        for service in reversed(list(self)):
            if service is not self.listener and service.running:
                await service.stopService()
