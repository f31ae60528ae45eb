"""The :class:`Client`: picks a channel per call from the provider lists its
discovery gives, fails over, runs the client interceptors and builds proxies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from functools import partial
from typing import Any, cast

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from twisted_rpc.client._asyncio import AsyncioServiceProxy, asyncio_loop
from twisted_rpc.client._balancer import Balancer, RoundRobin, balancer_named
from twisted_rpc.client._calls import NotSentError, TakenBack
from twisted_rpc.client._channel import Channel
from twisted_rpc.client._config import config_discovery, load_consumer_config
from twisted_rpc.client._dials import ClientReactor, _DialQueue
from twisted_rpc.client._options import ClientOptions, timeout_error
from twisted_rpc.client._parked import _not_sent
from twisted_rpc.client._pool import ChannelBuilder, Pool, Provider
from twisted_rpc.client._proxy import ServiceProxy
from twisted_rpc.client._retry import Retries, may_resend_shed, send_with_retries
from twisted_rpc.client._routes import CLIENT_CLOSED, ClientCall, _ServiceRoute
from twisted_rpc.client._service_config import ServiceConfig
from twisted_rpc.client._states import ConnectionState
from twisted_rpc.client._stream_start import StreamStarter, _stream_intercepted
from twisted_rpc.client._streams import StreamCall
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._interfaces import (
    IClientInterceptor,
    IClientStreamInterceptor,
    IServiceDiscovery,
)
from twisted_rpc.core._propagation import CURRENT_CALL, inherit
from twisted_rpc.core._service import (
    MethodInfo,
    Service,
    describe,
    resolve_descriptor,
    wrong_request_type,
)
from twisted_rpc.core._status import CancelledError, RpcError, UnavailableError
from twisted_rpc.discovery._static import StaticRegistry
from twisted_rpc.discovery._types import ProviderAddress

log = Logger(namespace="twisted_rpc.client")

_OPEN = ConnectionState.OPEN

_serving = CURRENT_CALL.get
"""The inbound call whose handler is running, if any (see core/_propagation.py)."""


BalancerChoice = str | type[Balancer] | None


_DEFAULT_OPTIONS = ClientOptions()


def _make_balancer(choice: BalancerChoice) -> Balancer:
    if choice is None:
        return RoundRobin()
    if isinstance(choice, str):
        return balancer_named(choice)()
    return choice()


class Client(StreamStarter, ChannelBuilder):
    """Calls services on providers; owns the connections, shared by all proxies.

    Provider lists come from ``discovery`` (an ``IServiceDiscovery``, e.g. a
    ``ZooKeeperRegistry``), or from ``providers``
    (``{"package.Service": ["host:port", ...]}``; one address may be given
    as its string) for the embedded static registry. ``balancer`` is
    ``round_robin`` (default), ``weighted_random`` or ``least_outstanding``.
    A call that could not be written to its provider goes to another one;
    a call that failed is retried only if its method is idempotent or the
    service config gives it a retryPolicy, within its deadline and the
    client's retry budget (docs/resilience.md).
    """

    def __init__(
        self,
        reactor: ClientReactor | None = None,
        options: ClientOptions | None = None,
        *,
        providers: Mapping[str, Iterable[str]] | None = None,
        discovery: IServiceDiscovery | None = None,
        interceptors: Sequence[IClientInterceptor] = (),
        **settings: Any,
    ) -> None:
        """``options``: a :class:`ClientOptions`; ``settings``: its fields
        as keywords (``timeout=2``, ``balancer="least_outstanding"``...),
        which build one (over ``options`` if given too)."""
        if options is None:
            options = ClientOptions(**settings) if settings else _DEFAULT_OPTIONS
        elif settings:
            options = options.replace(**settings)
        elif not isinstance(options, ClientOptions):
            raise TypeError(f"options must be a ClientOptions, not {options!r}")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if discovery is None:  # one address given as a string is a list of one
            discovery = StaticRegistry(
                {k: [v] if isinstance(v, str) else v for k, v in (providers or {}).items()}
            )
        elif providers is not None:
            raise TypeError("give providers or discovery, not both")
        self._loop = asyncio_loop(reactor) if options.awaitables == "asyncio" else None
        self.options = options
        self.reactor = reactor
        self.discovery = discovery
        self.interceptors = list(interceptors)
        if options.tracing:  # outermost: its span covers the other interceptors and retries
            from twisted_rpc.core._tracing import ClientTracing

            self.interceptors.insert(0, ClientTracing(options.protocol))
        self._propagation = (options.propagate_metadata, options.deadline_margin)
        self.timeout = options.timeout
        self.service_config = cast("ServiceConfig | None", options.service_config)
        self.balancer = options.balancer
        self.connect_timeout = options.connect_timeout
        self.retire_grace = options.retire_grace
        self.tls = options.tls
        self._dials = _DialQueue(
            reactor, options.max_concurrent_dials, options.max_dials_per_second
        )
        self.channels: dict[str, Channel] = {}
        """Every connection's channel, by address ("host:port", then "host:port#2"...)."""
        self._pools: dict[str, Pool] = {}
        self._routes: dict[str, _ServiceRoute] = {}
        self._unsubscribe: list[Callable[[], object]] = []
        self._retiring: dict[Channel, IDelayedCall] = {}
        self._closed: _ServiceRoute | None = None  # after close(): every service's route
        self._retries = Retries.from_options(reactor, options)
        self._plain = self._retries.plain  # routes sent once unless marked idempotent
        self._invoke = self._intercepted(self._send)
        self._invoke_once = self._intercepted(partial(self._send, retry=False))
        self._invoke_stream: Callable[[ClientCall, Any], StreamCall[Any, Any]] = self._start_stream
        for interceptor in reversed(self.interceptors):
            if IClientStreamInterceptor.providedBy(interceptor):
                self._invoke_stream = _stream_intercepted(interceptor, self._invoke_stream)

    def _intercepted(
        self, send: Callable[[ClientCall, Message], Deferred[Message]]
    ) -> Callable[[ClientCall, Message], Deferred[Message]]:
        for interceptor in reversed(self.interceptors):
            if IClientInterceptor.providedBy(interceptor) or not (
                IClientStreamInterceptor.providedBy(interceptor)
            ):
                send = _client_intercepted(interceptor, send)
        return send

    @classmethod
    def from_config(cls, path: str, reactor: ClientReactor | None = None, **kw: Any) -> Client:
        """A client configured by a consumer ini file (see docs/config.md);
        ClientOptions' fields as keywords override what the file says;
        ``interceptors`` may be given too."""
        config = load_consumer_config(path)
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        names = {f.name for f in fields(ClientOptions)}
        options = config.options.replace(**{k: kw.pop(k) for k in list(kw) if k in names})
        kw.update(config_discovery(config, options, reactor))
        return cls(reactor, options, **kw)

    def proxy(
        self,
        service: ServiceDescriptor | str | type[Service],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: BalancerChoice = None,
        idempotent: bool | Iterable[str] = False,
        retry: bool = True,
    ) -> ServiceProxy:
        """A proxy whose methods call ``service`` (descriptor, Service class or name).

        ``idempotent`` is True (every method) or the names of the methods that
        may be retried (once, after UNAVAILABLE, unless the service config
        gives them a retryPolicy). ``retry=False``: this proxy's calls are
        never retried (only a call never written goes elsewhere).
        ``balancer`` overrides the client's for this proxy.
        """
        error = timeout_error(timeout)
        if error is not None:
            raise error
        info = describe(resolve_descriptor(service))
        if self._closed is not None:
            raise UnavailableError(message=f"{CLIENT_CLOSED}: no new proxy of {info.name}")
        self._route(info.name)
        if isinstance(idempotent, bool):
            idempotent_set = set(info.methods) if idempotent else set()
        else:
            idempotent_set = set(idempotent)
            unknown = idempotent_set - set(info.methods)
            if unknown:
                raise ValueError(f"{info.name} has no method {', '.join(sorted(unknown))}")
        chosen = _make_balancer(balancer) if balancer is not None else None
        caller = self if retry else cast("Client", _Once(self))
        if self._loop is not None:  # awaitables="asyncio"
            return AsyncioServiceProxy(
                caller,
                info.methods.values(),
                timeout,
                metadata,
                chosen,
                idempotent_set,
                loop=self._loop,
            )
        return ServiceProxy(
            caller, info.methods.values(), timeout, metadata, chosen, idempotent_set
        )

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotent: bool = False,
        balancer: Balancer | None = None,
        retry: bool = True,
    ) -> Deferred[Message]:
        """Call ``method`` on one of its providers (what proxy methods do);
        ``retry=False``: never retried, whatever its policy."""
        if type(request) is not method.request_class:
            return fail(wrong_request_type(method, request))
        if timeout is None:  # the method's config timeout, else the client's
            config = self.service_config
            timeout = self.timeout if config is None else config.timeout_for(method, self.timeout)
        parent = _serving()
        if parent is not None:  # called from a handler: its deadline and metadata carry over
            try:
                timeout, metadata = inherit(parent, timeout, metadata, *self._propagation)
            except RpcError as e:
                return fail(e)
        if self.interceptors:
            call = ClientCall(method, timeout, dict(metadata or {}), idempotent, balancer)
            return (self._invoke if retry else self._invoke_once)(call, request)
        # The hot path, kept flat: the provider picked, if its channel is ready
        # and the call is not one to retry.
        route = self._routes.get(method.service) or self._route(method.service)
        channel = (balancer or route.balancer).pick(route.channels)
        if channel is not None and ((not idempotent and method.route in self._plain) or not retry):
            direct = channel.direct
            if direct is not None and direct.state is _OPEN:  # Channel.call's first branch
                return direct.call(method, request, timeout, metadata)
            d = channel.call(method, request, timeout, metadata, False)
            if d is not None:
                return d
        return self._send_to(
            method, request, timeout, metadata, idempotent, balancer, channel, retry
        )

    def stream(
        self,
        method: MethodInfo,
        request: Any = None,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: Balancer | None = None,
        retry: bool = True,
    ) -> StreamCall[Any, Any]:
        """The method's config ``timeout`` is a stream's if none is given (as in gRPC)."""
        if timeout is None and self.service_config is not None:
            timeout = self.service_config.timeout_for(method, None)
        parent = _serving()
        if parent is not None:
            timeout, metadata = inherit(parent, timeout, metadata, *self._propagation)
        return super().stream(method, request, timeout, metadata, balancer, retry)

    def _send(self, call: ClientCall, request: Message, retry: bool = True) -> Deferred[Message]:
        return self._send_to(
            call.method,
            request,
            call.timeout,
            call.metadata,
            call.idempotent,
            call.balancer,
            retry=retry,
        )

    def _send_to(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotent: bool,
        balancer: Balancer | None,
        channel: Provider | None = None,
        retry: bool = True,
    ) -> Deferred[Message]:
        """Send to ``channel`` (else the one the balancer picks), with
        failover, and retries if the method has a policy (_retry.py)."""
        error = timeout_error(timeout)
        if error is not None:
            return fail(error)
        route = self._routes.get(method.service) or self._route(method.service)
        balancer = balancer or route.balancer
        if channel is None:
            channel = balancer.pick(route.channels)
        if channel is None:
            if not route.known:
                return Deferred.fromCoroutine(
                    self._first_list(
                        route, method, request, timeout, metadata, idempotent, balancer, retry
                    )
                )
            return fail(NotSentError(message=route.none_left(method.service)))
        policy = self._retries.policy_for(method, idempotent) if retry else None
        if policy is None:
            d = channel.call(method, request, timeout, metadata, False)
            if d is not None:
                return d
        return Deferred.fromCoroutine(
            send_with_retries(
                self._retries,
                partial(getattr, route, "channels"),
                balancer,
                channel,
                method,
                request,
                timeout,
                metadata,
                policy,
            )
        )

    async def _first_list(
        self,
        route: _ServiceRoute,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotent: bool,
        balancer: Balancer,
        retry: bool,
    ) -> Message:
        """Wait (up to the timeout, or connect_timeout) for discovery's first list."""
        started = self.reactor.seconds()
        waiter: Deferred[None] = Deferred(route.waiters.remove)
        route.waiters.append(waiter)
        wait = timeout or self.connect_timeout
        timer = self.reactor.callLater(wait, waiter.cancel)
        try:
            await waiter
        except defer.CancelledError:
            if timer.active():
                raise CancelledError(message="cancelled by the caller") from None
            raise NotSentError(
                message=f"no provider of {method.service}: none known after {wait:g}s"
            ) from None
        finally:
            if timer.active():
                timer.cancel()
        if timeout:
            timeout = max(0.001, timeout - (self.reactor.seconds() - started))
        return await self._send_to(
            method, request, timeout, metadata, idempotent, balancer, retry=retry
        )

    def _route(self, service: str) -> _ServiceRoute:
        route = self._routes.get(service) or self._closed
        if route is None:
            route = self._routes[service] = _ServiceRoute(_make_balancer(self.balancer))
            self._unsubscribe.append(
                self.discovery.subscribe(service, partial(self._providers_changed, route, service))
            )
        return route

    def _providers_changed(
        self, route: _ServiceRoute, service: str, addresses: Sequence[ProviderAddress]
    ) -> None:
        """Discovery's new list for a service. A bad entry is skipped with a
        warning: it never breaks the others, nor raises into discovery. The
        config its providers publish, if any, becomes its default (_retry.py)."""
        self.service_config = self._retries.published(service, addresses)
        pools = []
        for address in addresses:
            try:
                pools.append(self._pool(address))
            except Exception as e:
                log.warn(
                    "skipping provider {address!r} from discovery: {error}",
                    address=address,
                    error=e,
                )
        route.pools = tuple(pools)
        route.channels = tuple(p.face for p in pools)
        route.known = True
        waiters, route.waiters = route.waiters, []
        for waiter in waiters:
            waiter.callback(None)
        used = self._used()
        for key in [k for k, p in self._pools.items() if p.members[0] not in used]:
            for member in self._pools.pop(key).members:
                member.on_ready = None  # a retiring member's redial opens no new one
        for key, channel in list(self.channels.items()):
            if channel not in used:
                del self.channels[key]
                self._retire(channel, self.reactor.seconds() + self.retire_grace)

    def _resend(self, channel: Channel, reason: GoawayReason, calls: list[TakenBack]) -> None:
        """Send calls a GOAWAY showed were never run again: after an idle
        close on a fresh connection to the same provider, else to another
        provider (this one is out of rotation) when there is one; if one
        cannot take it, to the next."""
        for call in calls:
            method = call[1]
            route = self._routes.get(method.service)
            if route is None:  # the client is closing
                _not_sent(call, NotSentError(message=CLIENT_CLOSED))
                continue
            # (After a shutdown, none of the provider's connections: its
            # other workers are going too.)
            tried: list[Provider] = [
                channel if reason == GoawayReason.IDLE else self._face_of(channel)
            ]
            fallback = partial(self._resend_elsewhere, route, tried)
            if reason == GoawayReason.IDLE:
                channel.resume(call, fallback)
            else:
                why = NotSentError(message=f"provider {channel.address}: {channel.last_error}")
                fallback(call, why)

    def _resend_shed(self, channel: Channel, call: TakenBack, error: RpcError) -> None:
        """A call ``channel``'s provider shed (answered "not run"): sent to
        another provider if the retry budget allows (as any retry, so that a
        fleet-wide overload is not multiplied), else failed with ``error``."""
        method = call[1]
        route = self._routes.get(method.service)
        if route is None or not may_resend_shed(self._retries, method):
            _not_sent(call, error)
            return
        # (Not to the provider's other connections: with several workers
        # its route lists its pool, so the pool is what is excluded.)
        self._resend_elsewhere(route, [channel, self._face_of(channel)], call, error)

    def _resend_elsewhere(
        self, route: _ServiceRoute, tried: list[Provider], call: TakenBack, error: RpcError
    ) -> None:
        """Send ``call`` to a provider not ``tried`` yet, else fail it with ``error``."""
        if not isinstance(error, NotSentError):
            _not_sent(call, error)
            return
        channel = route.balancer.pick(route.channels, tried)
        if channel is None:
            _not_sent(call, error)
            return
        tried.append(channel)
        channel.resume(call, partial(self._resend_elsewhere, route, tried))

    def _retire(self, channel: Channel, deadline: float) -> None:
        """Close a channel no service routes to, once its calls are done."""
        if channel.load and self.reactor.seconds() < deadline:
            self._retiring[channel] = self.reactor.callLater(0.5, self._retire, channel, deadline)
            return
        self._retiring.pop(channel, None)
        channel.close().addErrback(lambda f: log.failure("closing {c}", f, c=channel))

    def close(self) -> Deferred[None]:
        """Close every connection; calls still in flight fail with UNAVAILABLE.

        Closed for good: calls after it, through any proxy, fail at once
        with UNAVAILABLE "client closed" (nothing is dialled again) and
        :meth:`proxy` raises."""
        if self._closed is None:
            self._closed = _ServiceRoute(RoundRobin())
            self._closed.close()
        for route in self._routes.values():
            route.close()  # retries and streams holding it find no channel
        for pool in self._pools.values():
            for member in pool.members:
                member.on_ready = None  # no pool grows again
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._dials.stop()
        closing = [channel.close() for channel in [*self.channels.values(), *self._retiring]]
        closing.append(self.discovery.close())
        self.channels.clear()
        self._pools.clear()
        for timer in self._retiring.values():
            if timer.active():
                timer.cancel()
        self._retiring.clear()
        self._routes.clear()
        return gatherResults(closing).addCallback(lambda _: None)


class _Once:
    """What a ``proxy(..., retry=False)`` calls: the client, never retrying."""

    def __init__(self, client: Client) -> None:
        self.call = partial(client.call, retry=False)
        self.stream = partial(client.stream, retry=False)


def _client_intercepted(
    interceptor: IClientInterceptor, proceed: Callable[[ClientCall, Message], Deferred[Message]]
) -> Callable[[ClientCall, Message], Deferred[Message]]:
    def invoke(call: ClientCall, request: Message) -> Deferred[Message]:
        return defer.maybeDeferred(interceptor.intercept, call, request, proceed)

    return invoke
