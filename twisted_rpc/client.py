"""Consumer side: connections, per-provider channels, the client and its proxies.

:class:`ClientConnection` runs calls on one connection (call ids, the
outstanding map, deadlines, cancellation). :class:`Channel` keeps one
persistent connection to one provider, reconnecting with backoff.
:class:`Client` picks a channel per call from the provider lists its
discovery gives, and builds :class:`ServiceProxy` objects whose methods
return Deferreds::

    client = Client(reactor, providers={"example.UserService": ["127.0.0.1:8000"]})
    users = client.proxy(user_pb2.DESCRIPTOR.services_by_name["UserService"])
    response = await users.Login(LoginRequest(name="zhang san", pwd="123456"), timeout=2)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc import wire
from twisted_rpc.balancer import Balancer, RoundRobin, balancer_named
from twisted_rpc.deadlines import DeadlineQueue
from twisted_rpc.interfaces import IClientInterceptor, IServiceDiscovery
from twisted_rpc.protocol import LARGE_PAYLOAD, RpcConnection
from twisted_rpc.registry import ProviderAddress, StaticRegistry
from twisted_rpc.service import (
    MethodInfo,
    Service,
    describe,
    resolve_descriptor,
    wrong_request_type,
)
from twisted_rpc.status import (
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RpcError,
    UnavailableError,
)
from twisted_rpc.tls import ClientTLS, wrap_client_endpoint
from twisted_rpc.wire import FrameKind

__all__ = [
    "Channel",
    "Client",
    "ClientCall",
    "ClientConnection",
    "NotSentError",
    "ServiceProxy",
]

log = Logger()

DEFAULT_MAX_WRITE_BUFFER = 256 * 1024 * 1024
"""Bytes of calls a connection holds unsent before new calls fail RESOURCE_EXHAUSTED."""


class NotSentError(UnavailableError):
    """UNAVAILABLE before the call was written to any connection: safe to send elsewhere."""


class ClientConnection(RpcConnection):
    """One consumer-side connection: numbered calls, answered in any order."""

    def __init__(
        self,
        clock: IReactorTime,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        on_lost: Callable[[ClientConnection, Failure], object] | None = None,
        on_goaway: Callable[[ClientConnection], object] | None = None,
        keepalive_interval: float = 0.0,
        keepalive_timeout: float = 10.0,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    ) -> None:
        super().__init__(clock, max_frame_size)
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.max_write_buffer = max_write_buffer
        self._written_while_blocked = 0
        self.keepalive_failed = False
        self._keepalive: Any = None
        self.outstanding: dict[int, tuple[Deferred, type[Message]]] = {}
        self.deadlines = DeadlineQueue(clock, self.outstanding, self._deadline_expired)
        self.goaway_received = False
        self.available = False
        """True while new calls may be sent here (connected, no GOAWAY)."""
        self._next_id = 1
        self._wrapped = False
        self._timeout = 0.0  # the last call's timeout, and it in ms for the wire
        self._timeout_ms = 0
        self._on_lost = on_lost
        self._on_goaway = on_goaway
        self._handlers[FrameKind.RESPONSE] = self._response_received
        self._handlers[FrameKind.GOAWAY] = self._goaway_received

    def connectionMade(self) -> None:
        super().connectionMade()
        self.available = True
        if self.keepalive_interval > 0:
            self._keepalive = self.clock.callLater(self.keepalive_interval, self._send_keepalive)

    def _send_keepalive(self) -> None:
        """PING; a peer that does not answer within keepalive_timeout is dead."""
        self._keepalive = None
        if not self.connected:
            return
        d = self.ping()
        d.addTimeout(self.keepalive_timeout, self.clock)
        d.addCallbacks(self._keepalive_answered, self._keepalive_missed)

    def _keepalive_answered(self, rtt: float) -> None:
        if self.connected:
            self._keepalive = self.clock.callLater(self.keepalive_interval, self._send_keepalive)

    def _keepalive_missed(self, failure: Failure) -> None:
        if self.connected:
            self.keepalive_failed = True
            self.log.warn(
                "no answer to a keepalive ping from {peer} in {t:g}s: closing the connection",
                peer=self.peer,
                t=self.keepalive_timeout,
            )
            self.transport.abortConnection()

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred:
        """Send one call; the Deferred fires with the response or an RpcError."""
        if not self.available:
            why = "provider is shutting down" if self.goaway_received else "not connected"
            return fail(NotSentError(message=f"{self.peer}: {why}"))
        try:
            payload = request.SerializeToString()
        except Exception as e:
            return fail(InvalidArgumentError(message=f"cannot serialize request: {e}"))
        if self.write_blocked and self._over_write_buffer(len(payload)):
            return fail(
                ResourceExhaustedError(
                    message=f"{self.peer} reads slower than calls are made: more than "
                    f"{self.max_write_buffer} bytes of calls wait to be sent"
                )
            )
        call_id = self._next_id
        if call_id < 0xFFFFFFFF and not self._wrapped:
            self._next_id = call_id + 1
        else:
            call_id = self._next_wrapped_id()
        d = Deferred(self._cancel)
        self.outstanding[call_id] = (d, method.response_class)
        size = len(payload)
        if timeout:
            if timeout != self._timeout:
                self._timeout = timeout
                self._timeout_ms = max(1, int(timeout * 1000))
            self.deadlines.add(self.clock.seconds() + timeout, call_id)
            header = wire.encode_request(call_id, method.route, size, self._timeout_ms, metadata)
        else:
            header = wire.encode_request(call_id, method.route, size, 0, metadata)
        batch = self._batch
        if batch is None or size >= LARGE_PAYLOAD:
            self.send(header, payload)
        else:  # send()'s first branch, inline: this is the hot path
            batch.append(header)
            batch.append(payload)
        return d

    def _over_write_buffer(self, size: int) -> bool:
        """Whether ``size`` more bytes would pass max_write_buffer.

        Asked only while the transport is paused: the provider reads slower
        than we write (busy, or not reading at all). A transport that does not
        tell what it holds is assumed to hold all written since the pause.
        """
        unsent = self.unsent_bytes()
        if unsent is None:
            unsent = self._written_while_blocked
        if unsent + size > self.max_write_buffer:
            return True
        self._written_while_blocked += size
        return False

    def write_buffer_drained(self) -> None:
        super().write_buffer_drained()
        self._written_while_blocked = 0

    def close(self) -> None:
        """Close at once. The calls in flight fail either way, and flushing
        unsent ones first could wait forever: the transport stops reading
        when asked to close, so a provider with answers for us stops reading
        too once its own buffer is full."""
        self.transport.abortConnection()

    def _next_wrapped_id(self) -> int:
        """After 2**32 - 1 calls the ids wrap: skip the ones still in flight."""
        self._wrapped = True
        call_id = self._next_id
        while call_id in self.outstanding:
            call_id = call_id + 1 if call_id < 0xFFFFFFFF else 1
        self._next_id = call_id + 1 if call_id < 0xFFFFFFFF else 1
        return call_id

    def _response_received(
        self,
        call_id: int,
        status: int,
        timeout_ms: int,
        route: bytes,
        metadata: dict[str, str] | None,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        entry = self.outstanding.pop(call_id, None)
        if entry is None:
            return  # answered locally already: cancelled or timed out
        d, response_class = entry
        if status:
            d.errback(RpcError.from_status(status, message))
            return
        response = response_class()
        try:
            response.ParseFromString(payload)
        except Exception as e:
            d.errback(DataLossError(message=f"cannot parse the response: {e}"))
            return
        d.callback(response)

    def _goaway_received(self, call_id: int, *_: object) -> None:
        self.goaway_received = True
        self.available = False
        if self._on_goaway is not None:
            self._on_goaway(self)

    def _cancel(self, d: Deferred) -> None:
        # Cancelling is rare: find the call by its Deferred rather than keep
        # a per-call closure on the hot path.
        for call_id, (pending, _) in self.outstanding.items():
            if pending is d:
                del self.outstanding[call_id]
                if self.connected:
                    self.send(wire.encode_cancel(call_id))
                d.errback(CancelledError(message="cancelled by the caller"))
                return

    def _deadline_expired(self, call_id: int) -> None:
        entry = self.outstanding.pop(call_id, None)
        if entry is not None:
            entry[0].errback(DeadlineExceededError(message="deadline exceeded"))

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.available = False
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        self.deadlines.stop()
        outstanding = list(self.outstanding.values())
        self.outstanding.clear()
        for d, _ in outstanding:
            d.errback(UnavailableError(message=f"connection to {self.peer} lost"))
        if self._on_lost is not None:
            self._on_lost(self, reason)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: object) -> ClientConnection:
        c = self.channel
        return ClientConnection(
            c.clock,
            c.max_frame_size,
            c._connection_lost,
            c._goaway,
            c.keepalive_interval,
            c.keepalive_timeout,
            c.max_write_buffer,
        )


def _endpoint_string(address: ProviderAddress, connect_timeout: float) -> str:
    if ":" in address.host:
        host = address.host.replace(":", "\\:")
        return f"tcp6:host={host}:port={address.port}:timeout={connect_timeout:g}"
    return f"tcp:host={address.host}:port={address.port}:timeout={connect_timeout:g}"


class Channel:
    """One persistent connection to one provider, re-dialled with backoff.

    States: ``connecting`` (calls wait for it), ``ready``, ``failed`` (calls
    fail at once with UNAVAILABLE until the next attempt succeeds), ``probing``
    (connected again after a keepalive failure, in rotation only once a ping is
    answered), ``draining`` (GOAWAY received), ``closed``.
    """

    INITIAL_BACKOFF = 0.1
    MAX_BACKOFF = 5.0

    def __init__(
        self,
        reactor: Any,
        address: ProviderAddress,
        *,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        connect_timeout: float = 5.0,
        endpoint: Any = None,
        keepalive_interval: float = 0.0,
        keepalive_timeout: float = 10.0,
        tls: ClientTLS | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    ) -> None:
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.max_write_buffer = max_write_buffer
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.address = address
        self.max_frame_size = max_frame_size
        if endpoint is None:
            endpoint = clientFromString(reactor, _endpoint_string(address, connect_timeout))
            if tls is not None:
                endpoint = wrap_client_endpoint(endpoint, tls, address.host)
        self.endpoint = endpoint
        self.state = "idle"
        self.last_error = ""
        self.protocol: ClientConnection | None = None
        self._waiters: list[Deferred] = []
        self._backoff = self.INITIAL_BACKOFF
        self._retry: Any = None
        self._attempt: Deferred | None = None
        self._on_closed: list[Deferred] = []
        self._probe = False

    def __repr__(self) -> str:
        return f"<Channel {self.address} {self.state}>"

    @property
    def usable(self) -> bool:
        """Worth routing a call to (ready or about to be)."""
        return self.state in ("ready", "connecting", "idle")

    @property
    def load(self) -> int:
        """Calls in flight or waiting on this channel."""
        protocol = self.protocol
        return len(self._waiters) + (len(protocol.outstanding) if protocol is not None else 0)

    def connect(self) -> None:
        """Start dialling if not connected or dialling already."""
        if self.state in ("connecting", "ready", "closed"):
            return
        self.state = "connecting"
        self._cancel_retry()
        self._attempt = self.endpoint.connect(_ConnectionFactory(self))
        self._attempt.addCallbacks(self._connected, self._connect_failed)

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> Deferred:
        protocol = self.protocol
        if protocol is not None and protocol.available:
            return protocol.call(method, request, timeout, metadata)
        if self.state == "idle":
            self.connect()
        if self.state != "connecting":
            return fail(NotSentError(message=f"provider {self.address}: {self.last_error}"))
        d = Deferred.fromCoroutine(self._call_when_ready(method, request, timeout, metadata))
        if timeout:
            d.addTimeout(timeout, self.clock, onTimeoutCancel=_deadline_exceeded)
        return d

    async def _call_when_ready(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> Message:
        started = self.clock.seconds()
        waiter: Deferred = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        try:
            protocol = await waiter
        except defer.CancelledError:
            raise CancelledError(message="cancelled by the caller") from None
        if timeout:
            timeout = max(0.001, timeout - (self.clock.seconds() - started))
        return await protocol.call(method, request, timeout, metadata)

    def close(self) -> Deferred:
        """Stop re-dialling and close the connection (its calls fail UNAVAILABLE).

        The Deferred fires once the connection is closed.
        """
        self.state = "closed"
        self.last_error = "channel closed"
        self._cancel_retry()
        if self._attempt is not None:
            self._attempt.cancel()
        self._release_waiters()
        if self.protocol is None:
            return succeed(None)
        closed: Deferred = Deferred()
        self._on_closed.append(closed)
        self.protocol.close()
        return closed

    # ----------------------------------------------------------------- internals

    def _connected(self, protocol: ClientConnection) -> None:
        self._attempt = None
        if self.state == "closed":
            protocol.close()
            return
        self.protocol = protocol
        if self._probe:
            # The last connection died answering no keepalive (a frozen
            # process still accepts connections): in rotation again only once
            # this one answers a ping.
            self.state = "probing"
            d = protocol.ping()
            d.addTimeout(self.keepalive_timeout, self.clock)
            d.addCallbacks(
                lambda _: self._ready(protocol), lambda _: protocol.transport.abortConnection()
            )
            return
        self._ready(protocol)

    def _ready(self, protocol: ClientConnection) -> None:
        if protocol is not self.protocol or self.state == "closed":
            return
        self.state = "ready"
        self._probe = False
        self._backoff = self.INITIAL_BACKOFF
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self.state == "closed":
            return
        self.last_error = f"cannot connect: {failure.getErrorMessage()}"
        self._failed()

    def _failed(self) -> None:
        self.state = "failed"
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)
        self._retry = self.clock.callLater(delay, self._redial)
        # Last: a waiter's errback may close this channel, which cancels the retry.
        self._release_waiters()

    def _redial(self) -> None:
        self._retry = None
        if self.state == "failed":
            self.connect()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(NotSentError(message=f"provider {self.address}: {self.last_error}"))

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _connection_lost(self, protocol: ClientConnection, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        if self.state == "closed":
            closed, self._on_closed = self._on_closed, []
            for d in closed:
                d.callback(None)
            return
        if protocol.keepalive_failed or self._probe:
            # A frozen provider still accepts connections (its kernel does):
            # keep it out of rotation and retry with backoff.
            self.last_error = "no answer to keepalive pings"
            self._probe = True
            self._failed()
            return
        self.last_error = f"connection lost: {reason.getErrorMessage()}"
        # Dial again at once: a restarted provider is back quickly; if not,
        # the failed attempt starts the backoff.
        self.state = "idle"
        self.connect()

    def _goaway(self, protocol: ClientConnection) -> None:
        if protocol is self.protocol and self.state == "ready":
            self.last_error = "provider is shutting down"
            self.state = "draining"


def _deadline_exceeded(result: object, timeout: float) -> Failure:
    return Failure(DeadlineExceededError(message=f"deadline of {timeout:g}s exceeded"))


@dataclass(slots=True)
class ClientCall:
    """An outgoing call as client interceptors see it (fields may be changed)."""

    method: MethodInfo
    timeout: float | None
    metadata: dict[str, str] = field(default_factory=dict)
    idempotent: bool = False
    balancer: Balancer | None = None


class _ServiceRoute:
    """The channels serving one service and the client's balancer for them."""

    __slots__ = ("channels", "balancer", "known", "waiters")

    def __init__(self, balancer: Balancer) -> None:
        self.channels: tuple[Channel, ...] = ()
        self.balancer = balancer
        self.known = False  # has discovery given a list yet?
        self.waiters: list[Deferred] = []


BalancerChoice = str | type[Balancer] | None


def _make_balancer(choice: BalancerChoice) -> Balancer:
    if choice is None:
        return RoundRobin()
    if isinstance(choice, str):
        return balancer_named(choice)()
    return choice()


class Client:
    """Calls services on providers; owns the connections, shared by all proxies.

    Provider lists come from ``discovery`` (an ``IServiceDiscovery``, e.g. a
    ``ZooKeeperRegistry``), or from ``providers``
    (``{"package.Service": ["host:port", ...]}``) for the embedded static
    registry. ``balancer`` is ``round_robin`` (default), ``weighted_random`` or
    ``least_outstanding``. A call that could not be written to its provider
    goes to another one; a call lost in flight fails with UNAVAILABLE unless
    its method is idempotent, in which case it is retried once elsewhere
    within its deadline.
    """

    def __init__(
        self,
        reactor: Any = None,
        *,
        providers: Mapping[str, Iterable[str]] | None = None,
        discovery: IServiceDiscovery | None = None,
        interceptors: Sequence[IClientInterceptor] = (),
        timeout: float | None = None,
        balancer: BalancerChoice = None,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        connect_timeout: float = 5.0,
        retire_grace: float = 60.0,
        keepalive_interval: float = 0.0,
        keepalive_timeout: float = 10.0,
        tls: ClientTLS | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if discovery is None:
            discovery = StaticRegistry(providers or {})
        elif providers is not None:
            raise TypeError("give providers or discovery, not both")
        self.reactor = reactor
        self.discovery = discovery
        self.interceptors = list(interceptors)
        self.timeout = timeout
        self.balancer = balancer
        _make_balancer(balancer)  # fail now on an unknown name
        self.max_frame_size = max_frame_size
        self.connect_timeout = connect_timeout
        self.retire_grace = retire_grace
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.tls = tls
        self.max_write_buffer = max_write_buffer
        self.channels: dict[str, Channel] = {}
        self._routes: dict[str, _ServiceRoute] = {}
        self._unsubscribe: list[Callable[[], object]] = []
        self._retiring: set[Channel] = set()
        self._invoke = self._send
        for interceptor in reversed(self.interceptors):
            self._invoke = _client_intercepted(interceptor, self._invoke)

    @classmethod
    def from_config(cls, path: str, reactor: Any = None, **kw: Any) -> Client:
        """A client configured by a consumer ini file (see docs/config.md)."""
        from twisted_rpc.config import load_consumer_config

        config = load_consumer_config(path)
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        kw.setdefault("timeout", config.timeout)
        kw.setdefault("balancer", config.balancer)
        kw.setdefault("keepalive_interval", config.keepalive_interval)
        kw.setdefault("keepalive_timeout", config.keepalive_timeout)
        kw.setdefault("max_write_buffer", config.max_write_buffer)
        kw.setdefault("tls", config.tls)
        if config.registry.kind == "zookeeper":
            from twisted_rpc.zkregistry import ZooKeeperRegistry

            reg = config.registry
            kw["discovery"] = ZooKeeperRegistry(
                reactor,
                reg.hosts,
                root=reg.root,
                session_timeout=reg.session_timeout,
                auth=reg.auth,
            )
        else:
            kw["providers"] = {
                name: [str(a) for a in addrs] for name, addrs in config.providers.items()
            }
        return cls(
            reactor,
            max_frame_size=config.max_frame_size,
            connect_timeout=config.connect_timeout,
            **kw,
        )

    def proxy(
        self,
        service: ServiceDescriptor | str | type[Service],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: BalancerChoice = None,
        idempotent: bool | Iterable[str] = False,
    ) -> ServiceProxy:
        """A proxy whose methods call ``service`` (descriptor, Service class or name).

        ``idempotent`` is True (every method) or the names of the methods that
        may be retried once on another provider after a connection loss.
        ``balancer`` overrides the client's for this proxy.
        """
        info = describe(resolve_descriptor(service))
        self._route(info.name)
        if isinstance(idempotent, bool):
            retry = set(info.methods) if idempotent else set()
        else:
            retry = set(idempotent)
            unknown = retry - set(info.methods)
            if unknown:
                raise ValueError(f"{info.name} has no method {', '.join(sorted(unknown))}")
        chosen = _make_balancer(balancer) if balancer is not None else None
        return ServiceProxy(self, info.methods.values(), timeout, metadata, chosen, retry)

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotent: bool = False,
        balancer: Balancer | None = None,
    ) -> Deferred:
        """Call ``method`` on one of its providers (what proxy methods do)."""
        if type(request) is not method.request_class:
            return fail(wrong_request_type(method, request))
        if timeout is None:
            timeout = self.timeout
        if self.interceptors:
            call = ClientCall(method, timeout, dict(metadata or {}), idempotent, balancer)
            return self._invoke(call, request)
        # The hot path, kept flat: a ready connection to the provider picked.
        route = self._routes.get(method.service) or self._route(method.service)
        channel = (balancer or route.balancer).pick(route.channels)
        if channel is not None and not idempotent:
            protocol = channel.protocol
            if protocol is not None and protocol.available:
                return protocol.call(method, request, timeout, metadata)
        return self._send_to(method, request, timeout, metadata, idempotent, balancer, channel)

    def _send(self, call: ClientCall, request: Message) -> Deferred:
        return self._send_to(
            call.method, request, call.timeout, call.metadata, call.idempotent, call.balancer
        )

    def _send_to(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotent: bool,
        balancer: Balancer | None,
        channel: Channel | None = None,
    ) -> Deferred:
        """Send to ``channel`` (else the one the balancer picks), with failover."""
        route = self._routes.get(method.service) or self._route(method.service)
        balancer = balancer or route.balancer
        if channel is None:
            channel = balancer.pick(route.channels)
        if channel is None:
            if not route.known:
                return Deferred.fromCoroutine(
                    self._first_list(
                        route, method, request, timeout, metadata, idempotent, balancer
                    )
                )
            return fail(NotSentError(message=f"no provider of {method.service}"))
        protocol = channel.protocol
        if protocol is not None and protocol.available and not idempotent:
            return protocol.call(method, request, timeout, metadata)
        return Deferred.fromCoroutine(
            self._failover(route, balancer, channel, method, request, timeout, metadata, idempotent)
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
    ) -> Message:
        """Wait (up to the timeout, or connect_timeout) for discovery's first list."""
        started = self.reactor.seconds()
        waiter: Deferred = Deferred(route.waiters.remove)
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
        return await self._send_to(method, request, timeout, metadata, idempotent, balancer)

    async def _failover(
        self,
        route: _ServiceRoute,
        balancer: Balancer,
        channel: Channel,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotent: bool,
    ) -> Message:
        started = self.reactor.seconds()
        tried: list[Channel] = []
        retried = False
        while True:
            tried.append(channel)
            remaining = None
            if timeout:
                remaining = timeout - (self.reactor.seconds() - started)
                if remaining <= 0:
                    raise DeadlineExceededError(message=f"deadline of {timeout:g}s exceeded")
            try:
                return await channel.call(method, request, remaining, metadata)
            except NotSentError as e:
                error: RpcError = e
            except UnavailableError as e:
                if not idempotent or retried:
                    raise
                retried = True
                error = e
                log.info(
                    "retrying idempotent {method} elsewhere: {error}",
                    method=method.full_name,
                    error=e.message,
                )
            next_channel = balancer.pick(route.channels, tried)
            if next_channel is None:
                raise error
            channel = next_channel

    def _route(self, service: str) -> _ServiceRoute:
        route = self._routes.get(service)
        if route is None:
            route = self._routes[service] = _ServiceRoute(_make_balancer(self.balancer))
            self._unsubscribe.append(
                self.discovery.subscribe(service, partial(self._providers_changed, route))
            )
        return route

    def _providers_changed(
        self, route: _ServiceRoute, addresses: Sequence[ProviderAddress]
    ) -> None:
        route.channels = tuple(self._channel(a) for a in addresses)
        route.known = True
        waiters, route.waiters = route.waiters, []
        for waiter in waiters:
            waiter.callback(None)
        used = {c for r in self._routes.values() for c in r.channels}
        for key, channel in list(self.channels.items()):
            if channel not in used:
                del self.channels[key]
                self._retire(channel, self.reactor.seconds() + self.retire_grace)

    def _channel(self, address: ProviderAddress) -> Channel:
        channel = self.channels.get(address.key)
        if channel is None:
            channel = self.channels[address.key] = Channel(
                self.reactor,
                address,
                max_frame_size=self.max_frame_size,
                connect_timeout=self.connect_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_timeout=self.keepalive_timeout,
                tls=self._tls_for(address),
                max_write_buffer=self.max_write_buffer,
            )
            channel.connect()
        else:
            channel.address = address  # the weight may have changed
        return channel

    def _tls_for(self, address: ProviderAddress) -> ClientTLS | None:
        """TLS settings to dial ``address`` with: what its registration says,
        else the client's (a static provider list carries no data)."""
        announced = address.data.get("tls")
        if announced is False:
            return None
        if announced and self.tls is None:
            return ClientTLS()  # the platform's trust roots
        return self.tls

    def _retire(self, channel: Channel, deadline: float) -> None:
        """Close a channel no service routes to, once its calls are done."""
        if channel.load and self.reactor.seconds() < deadline:
            self._retiring.add(channel)
            self.reactor.callLater(0.5, self._retire, channel, deadline)
            return
        self._retiring.discard(channel)
        channel.close().addErrback(lambda f: log.failure("closing {c}", f, c=channel))

    def close(self) -> Deferred:
        """Close every connection; calls still in flight fail with UNAVAILABLE."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        closing = [channel.close() for channel in [*self.channels.values(), *self._retiring]]
        closing.append(self.discovery.close())
        self.channels.clear()
        self._retiring.clear()
        self._routes.clear()
        return gatherResults(closing).addCallback(lambda _: None)


def _client_intercepted(
    interceptor: IClientInterceptor, proceed: Callable[[ClientCall, Message], Deferred]
) -> Callable[[ClientCall, Message], Deferred]:
    def invoke(call: ClientCall, request: Message) -> Deferred:
        return defer.maybeDeferred(interceptor.intercept, call, request, proceed)

    return invoke


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


def _stub(
    client: Client,
    method: MethodInfo,
    default_timeout: float | None,
    default_metadata: Mapping[str, str] | None,
    balancer: Balancer | None,
    idempotent: bool,
) -> Callable[..., Deferred]:
    call = client.call

    def stub(
        request: Message,
        *,
        timeout: float | None = default_timeout,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred:
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
