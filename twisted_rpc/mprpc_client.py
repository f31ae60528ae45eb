"""Calling C++ mprpc providers (and Python providers' mprpc listeners).

:class:`MprpcClient` builds Deferred-returning proxies like :class:`Client`'s.
Each call looks its provider up at ``/<Service>/<Method>`` in ZooKeeper (read
once, then kept fresh by a watch), opens a connection of its own, sends the
request in one write, reads to EOF and parses the reply. Every way a call can
go wrong ends in a typed :class:`RpcError`:

- no provider node, connection refused or reset: UNAVAILABLE;
- EOF with no reply (the provider failed, was killed, or did not know the
  method: the protocol has no status): UNAVAILABLE;
- a reply that does not parse: DATA_LOSS; one over ``max_reply_size``:
  RESOURCE_EXHAUSTED; no reply in time: DEADLINE_EXCEEDED.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc import wire
from twisted_rpc.mprpc_wire import encode_request
from twisted_rpc.registry import ProviderAddress, parse_address
from twisted_rpc.service import (
    MethodInfo,
    Service,
    describe,
    resolve_descriptor,
    wrong_request_type,
)
from twisted_rpc.status import (
    DataLossError,
    DeadlineExceededError,
    ResourceExhaustedError,
    RpcError,
    UnavailableError,
)
from twisted_rpc.zookeeper import (
    CONNECTED,
    NoNodeError,
    WatchedEvent,
    ZooKeeperClient,
)

__all__ = ["MprpcClient", "MprpcDirectory", "StaticMprpcDirectory", "ZooKeeperMprpcDirectory"]

log = Logger()


def short_name(service: str) -> str:
    """``UserServiceRpc`` for ``fixbug.UserServiceRpc``: C++ mprpc's service name."""
    return service.rpartition(".")[2]


class MprpcDirectory:
    """Where an mprpc method is served: ``lookup(service, method)`` → Deferred[address]."""

    def lookup(self, service: str, method: str) -> Deferred:
        raise NotImplementedError

    def close(self) -> Deferred:
        return succeed(None)


class StaticMprpcDirectory(MprpcDirectory):
    """Addresses from configuration: ``{"UserServiceRpc": "127.0.0.1:8000"}``
    (a service's short name, or ``Service.Method`` for one method)."""

    def __init__(self, providers: Mapping[str, str]) -> None:
        self.providers = {name: parse_address(a) for name, a in providers.items()}

    def lookup(self, service: str, method: str) -> Deferred:
        address = self.providers.get(f"{service}.{method}") or self.providers.get(service)
        if address is None:
            return fail(UnavailableError(message=f"no provider configured for {service}"))
        return succeed(address)


class ZooKeeperMprpcDirectory(MprpcDirectory):
    """Reads ``/<Service>/<Method>`` (data ``b"ip:port"``) once, then follows it
    with a watch; the cached address outlives a ZooKeeper outage."""

    def __init__(self, zk: ZooKeeperClient, lookup_timeout: float = 10.0) -> None:
        self.zk = zk
        self.lookup_timeout = lookup_timeout
        self.cache: dict[str, ProviderAddress | None] = {}
        self._reading: dict[str, list[Deferred]] = {}
        self._session: int | None = None
        self._connected: list[Deferred] = []
        zk.add_state_listener(self._state_changed)
        zk.start()

    def lookup(self, service: str, method: str) -> Deferred:
        path = f"/{service}/{method}"
        if path in self.cache:
            address = self.cache[path]
            if address is not None:
                return succeed(address)
            return fail(_no_provider(path))
        waiter: Deferred = Deferred()
        waiting = self._reading.setdefault(path, [])
        waiting.append(waiter)
        if len(waiting) == 1:
            self._read(path)
        return waiter

    def _read(self, path: str) -> None:
        d = Deferred.fromCoroutine(self._read_node(path))
        # Bounded: kazoo holds requests while it has no connection.
        d.addTimeout(self.lookup_timeout, self.zk.reactor)
        d.addBoth(self._settle, path)

    async def _read_node(self, path: str) -> ProviderAddress | None:
        def changed(event: WatchedEvent) -> None:
            # The next call reads it again (with a new watch).
            self.cache.pop(path, None)

        if not self.zk.connected:
            # kazoo refuses requests before its first session; wait for it.
            waiter: Deferred = Deferred(lambda d: self._connected.remove(d))
            self._connected.append(waiter)
            await waiter
        try:
            data, _ = await self.zk.get(path, watch=changed)
        except NoNodeError:
            if await self.zk.exists(path, watch=changed) is not None:
                return await self._read_node(path)  # created meanwhile
            self.cache[path] = None
            return None
        try:
            address = parse_address(data.decode())
        except (UnicodeDecodeError, ValueError):
            raise UnavailableError(message=f"{path} holds {data!r}, not ip:port") from None
        self.cache[path] = address
        return address

    def _settle(self, result: Any, path: str) -> None:
        waiting = self._reading.pop(path, [])
        for waiter in waiting:
            if isinstance(result, Failure):
                error = result.value
                if isinstance(error, TimeoutError | CancelledError):
                    error = UnavailableError(
                        message=f"zookeeper did not answer for {path} "
                        f"within {self.lookup_timeout:g} s"
                    )
                elif not isinstance(error, RpcError):
                    error = UnavailableError(message=f"reading {path}: {error!r}")
                waiter.errback(error)
            elif result is None:
                waiter.errback(_no_provider(path))
            else:
                waiter.callback(result)

    def _state_changed(self, state: str, new_session: bool) -> None:
        if state == CONNECTED and new_session and self._session is not None:
            self.cache.clear()  # the old session's watches are gone
        if state == CONNECTED:
            self._session = self.zk.session_id
            waiting, self._connected = self._connected, []
            for waiter in waiting:
                waiter.callback(None)

    def close(self) -> Deferred:
        return self.zk.close()


def _no_provider(path: str) -> UnavailableError:
    return UnavailableError(message=f"no mprpc provider registered at {path}")


class _OneCall(Protocol):
    """Writes one request, collects the reply until EOF."""

    def __init__(self, request: bytes, max_reply_size: int) -> None:
        self.request = request
        self.max_reply_size = max_reply_size
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: Deferred = Deferred(self._cancel)
        self.too_big = False

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_reply_size:
            self.too_big = True
            self.transport.abortConnection()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if self.too_big:
            self.finished.errback(
                ResourceExhaustedError(
                    message=f"reply over the limit of {self.max_reply_size} bytes"
                )
            )
        elif reason.check(net_error.ConnectionDone):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(
                UnavailableError(message=f"connection lost before the reply: {reason.value}")
            )

    def _cancel(self, d: Deferred) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class MprpcClient:
    """Calls services over the C++ mprpc protocol.

    Give ``zookeeper`` (a connect string; providers found at
    ``/<Service>/<Method>``) or ``providers`` (``{"UserServiceRpc":
    "host:port"}``), or a ready ``directory``. A zero-byte reply is a failure
    unless ``allow_empty_reply``: the protocol cannot tell "the provider sent
    nothing because it failed" from an all-defaults message.
    """

    def __init__(
        self,
        reactor: Any = None,
        *,
        zookeeper: str | None = None,
        providers: Mapping[str, str] | None = None,
        directory: MprpcDirectory | None = None,
        timeout: float | None = None,
        connect_timeout: float = 5.0,
        max_reply_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        session_timeout: float = 10.0,
        allow_empty_reply: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        given = [x is not None for x in (zookeeper, providers, directory)]
        if sum(given) != 1:
            raise TypeError("give exactly one of zookeeper, providers or directory")
        if zookeeper is not None:
            directory = ZooKeeperMprpcDirectory(
                ZooKeeperClient(reactor, zookeeper, session_timeout=session_timeout)
            )
        elif providers is not None:
            directory = StaticMprpcDirectory(providers)
        assert directory is not None
        self.reactor = reactor
        self.directory = directory
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_reply_size = max_reply_size
        self.allow_empty_reply = allow_empty_reply

    @classmethod
    def from_mprpc_config(cls, path: str, reactor: Any = None, **kw: Any) -> MprpcClient:
        """A client for the ZooKeeper named in a C++ ``key=value`` config file."""
        from twisted_rpc.config import load_mprpc_conf

        conf = load_mprpc_conf(path)
        if conf.zookeeper is None:
            raise ValueError(f"{path}: no zookeeperip/zookeeperport")
        return cls(reactor, zookeeper=conf.zookeeper, **kw)

    def proxy(
        self, service: ServiceDescriptor | str | type[Service], *, timeout: float | None = None
    ) -> MprpcProxy:
        """Deferred-returning methods of ``service``, called over mprpc."""
        info = describe(resolve_descriptor(service))
        return MprpcProxy(self, info.methods.values(), timeout)

    def call(self, method: MethodInfo, request: Message, timeout: float | None = None) -> Deferred:
        """Call ``method`` once; fires with the response or fails with an RpcError."""
        if type(request) is not method.request_class:
            return fail(wrong_request_type(method, request))
        if timeout is None:
            timeout = self.timeout
        d = Deferred.fromCoroutine(self._call(method, request))
        if timeout:

            def timed_out(result: Any, after: float) -> Any:
                if isinstance(result, Failure) and result.check(CancelledError):
                    return Failure(DeadlineExceededError(message=f"no reply within {after:g} s"))
                return result

            d.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
        return d

    async def _call(self, method: MethodInfo, request: Message) -> Message:
        service = short_name(method.service)
        address = await self.directory.lookup(service, method.name)
        payload = encode_request(service, method.name, request.SerializeToString())
        endpoint = HostnameEndpoint(
            self.reactor, address.host, address.port, timeout=self.connect_timeout
        )
        call = _OneCall(payload, self.max_reply_size)
        try:
            await connectProtocol(endpoint, call)
        except (net_error.ConnectError, net_error.DNSLookupError) as e:
            raise UnavailableError(message=f"cannot connect to {address}: {e}") from None
        reply = await call.finished
        if not reply and not self.allow_empty_reply:
            raise UnavailableError(
                message=f"{address} closed the connection without a reply to "
                f"{service}.{method.name} (see the provider's log)"
            )
        response = method.response_class()
        try:
            response.ParseFromString(reply)
        except Exception as e:
            raise DataLossError(
                message=f"reply from {address} is not a "
                f"{method.response_class.DESCRIPTOR.full_name}: {e}"
            ) from None
        return response

    def close(self) -> Deferred:
        """Release the directory (its ZooKeeper session)."""
        return self.directory.close()


class MprpcProxy:
    """``proxy.Login(request, timeout=None)`` → Deferred of the response."""

    def __init__(self, client: MprpcClient, methods: Any, timeout: float | None) -> None:
        for method in methods:
            setattr(self, method.name, _stub(client, method, timeout))


def _stub(client: MprpcClient, method: MethodInfo, default_timeout: float | None) -> Any:
    def stub(request: Message, *, timeout: float | None = default_timeout) -> Deferred:
        return client.call(method, request, timeout)

    stub.__name__ = method.name
    stub.__qualname__ = f"{method.service}.{method.name}"
    stub.__doc__ = f"Call {short_name(method.service)}.{method.name} over the mprpc protocol."
    return stub
