"""Calling C++ mprpc providers (and Python providers' mprpc listeners).

:class:`CppClient` builds Deferred-returning proxies like :class:`Client`'s.
Each call looks its provider up at ``/<Service>/<Method>`` in ZooKeeper (read
once, then kept fresh by a watch), opens a connection of its own, sends the
request in one write, reads to EOF and parses the reply. Every way a call can
go wrong ends in a typed :class:`RpcError`:

- no provider node, connection refused or reset: UNAVAILABLE;
- EOF with no reply (the provider failed, was killed, or did not know the
  method: the protocol has no status): UNAVAILABLE;
- a reply that does not parse: DATA_LOSS; one over ``max_reply_size``:
  RESOURCE_EXHAUSTED; no reply in time: DEADLINE_EXCEEDED. Every call has a
  deadline (:data:`DEFAULT_TIMEOUT` unless told otherwise): a C++ provider
  that does not know the method logs it and neither answers nor closes;
- a streaming method (the protocol has no streams): UNIMPLEMENTED at once,
  nothing looked up or sent.

An address that refused a connection is not dialled again for
``refused_hold`` seconds (or until its node changes): calls to it fail
UNAVAILABLE at once, as they would after dialling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from twisted.internet import error as net_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IReactorTCP, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._service import (
    MethodInfo,
    Service,
    describe,
    resolve_descriptor,
    wrong_request_type,
)
from twisted_rpc.core._status import (
    DataLossError,
    DeadlineExceededError,
    ResourceExhaustedError,
    RpcError,
    UnavailableError,
    UnimplementedError,
)
from twisted_rpc.cpp._wire import encode_request
from twisted_rpc.discovery._kazoo import (
    CONNECTED,
    IZooKeeperReactor,
    NoNodeError,
    WatchedEvent,
    ZooKeeperClient,
)
from twisted_rpc.discovery._layout import cpp_path, decode_cpp
from twisted_rpc.discovery._types import ProviderAddress, parse_address

__all__ = [
    "DEFAULT_REFUSED_HOLD",
    "DEFAULT_TIMEOUT",
    "CppClient",
    "CppDirectory",
    "StaticCppDirectory",
    "ZooKeeperCppDirectory",
]

log = Logger(namespace="twisted_rpc.cpp")

DEFAULT_TIMEOUT = 10.0
"""Seconds a call waits for its reply unless the client, proxy or call says
otherwise. A C++ provider never closes the connection of a call it cannot
serve (an unknown method, args that do not parse): only the deadline ends it."""

DEFAULT_REFUSED_HOLD = 1.0
"""Seconds an address that refused a connection is not dialled again. A
crashed C++ provider's node stays in ZooKeeper for its session timeout (30 s
in the original); each call in that window fails at once instead of dialling."""

_MAX_REFUSED = 1024
"""Refused addresses remembered at most (expired ones are dropped first)."""


class ICppReactor(IZooKeeperReactor, IReactorTCP):
    """What :class:`CppClient` uses of a reactor: its clock, ``callFromThread``
    (for ZooKeeper) and TCP (for typing; any reactor provides them)."""


def short_name(service: str) -> str:
    """``UserServiceRpc`` for ``fixbug.UserServiceRpc``: C++ mprpc's service name."""
    return service.rpartition(".")[2]


class CppDirectory:
    """Where an mprpc method is served: ``lookup(service, method)`` → Deferred[address]."""

    def lookup(self, service: str, method: str) -> Deferred[ProviderAddress]:
        raise NotImplementedError

    def close(self) -> Deferred[None]:
        return succeed(None)

    def on_change(self, listener: Callable[[ProviderAddress], object]) -> None:
        """Call ``listener(address)`` whenever a method served at ``address``
        may have moved (its node changed or went). Static addresses never do."""


class StaticCppDirectory(CppDirectory):
    """Addresses from configuration: ``{"UserServiceRpc": "127.0.0.1:8000"}``
    (a service's short name, or ``Service.Method`` for one method)."""

    def __init__(self, providers: Mapping[str, str]) -> None:
        self.providers = {name: parse_address(a) for name, a in providers.items()}

    def lookup(self, service: str, method: str) -> Deferred[ProviderAddress]:
        address = self.providers.get(f"{service}.{method}") or self.providers.get(service)
        if address is None:
            return fail(UnavailableError(message=f"no provider configured for {service}"))
        return succeed(address)


class ZooKeeperCppDirectory(CppDirectory):
    """Reads ``/<Service>/<Method>`` (data ``b"ip:port"``) once, then follows it
    with a watch; the cached address outlives a ZooKeeper outage."""

    def __init__(self, zk: ZooKeeperClient, lookup_timeout: float = 10.0) -> None:
        self.zk = zk
        self.lookup_timeout = lookup_timeout
        self.cache: dict[str, ProviderAddress | None] = {}
        self._reading: dict[str, list[Deferred[ProviderAddress]]] = {}
        self._session: int | None = None
        self._connected: list[Deferred[None]] = []
        self._listeners: list[Callable[[ProviderAddress], object]] = []
        zk.add_state_listener(self._state_changed)
        zk.start()

    def lookup(self, service: str, method: str) -> Deferred[ProviderAddress]:
        path = cpp_path(service, method)
        if path in self.cache:
            address = self.cache[path]
            if address is not None:
                return succeed(address)
            return fail(_no_provider(path))
        waiter: Deferred[ProviderAddress] = Deferred()
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
            self._forget(self.cache.pop(path, None))

        if not self.zk.connected:
            # kazoo refuses requests before its first session; wait for it.
            waiter: Deferred[None] = Deferred(lambda d: self._connected.remove(d))
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
            address = decode_cpp(data)
        except ValueError:  # UnicodeDecodeError included
            raise UnavailableError(message=f"{path} holds {data!r}, not ip:port") from None
        self.cache[path] = address
        return address

    def _settle(self, result: ProviderAddress | None | Failure, path: str) -> None:
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
            old, self.cache = self.cache, {}  # the old session's watches are gone
            for address in set(old.values()):
                self._forget(address)
        if state == CONNECTED:
            self._session = self.zk.session_id
            waiting, self._connected = self._connected, []
            for waiter in waiting:
                waiter.callback(None)

    def on_change(self, listener: Callable[[ProviderAddress], object]) -> None:
        self._listeners.append(listener)

    def _forget(self, address: ProviderAddress | None) -> None:
        if address is None:
            return
        for listener in self._listeners:
            try:
                listener(address)
            except Exception:
                log.failure("mprpc directory listener failed for {address}", address=address)

    def close(self) -> Deferred[None]:
        return self.zk.close()


def _no_provider(path: str) -> UnavailableError:
    return UnavailableError(message=f"no mprpc provider registered at {path}")


class _OneCall(Protocol):
    """Writes one request, collects the reply until EOF."""

    transport: ITCPTransport

    def __init__(self, request: bytes, max_reply_size: int) -> None:
        self.request = request
        self.max_reply_size = max_reply_size
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)
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

    def _cancel(self, d: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


def streams_refused(method: MethodInfo) -> UnimplementedError:
    """The error of a call of streaming ``method`` over mprpc (which has no streams)."""
    kind = (
        "bidirectional streaming"
        if method.client_streaming and method.server_streaming
        else "client streaming"
        if method.client_streaming
        else "server streaming"
    )
    return UnimplementedError(
        message=f"{method.full_name} is a {kind} method and the C++ mprpc protocol has "
        "no streams: call it over the native protocol (twisted_rpc.Client)"
    )


def _seconds(name: str, value: Any) -> float:
    """``value`` as a positive, finite number of seconds, or ValueError naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)


def _endpoint(
    reactor: ICppReactor, address: ProviderAddress, connect_timeout: float
) -> IStreamClientEndpoint:
    """A plain TCP endpoint for an IP literal (what the C++ layout holds): a
    refused connection fails in about a millisecond, where HostnameEndpoint
    waits its 0.3 s attempt delay first. Names still go through the resolver."""
    if isIPAddress(address.host):
        return TCP4ClientEndpoint(reactor, address.host, address.port, timeout=connect_timeout)
    if isIPv6Address(address.host):
        return TCP6ClientEndpoint(reactor, address.host, address.port, timeout=connect_timeout)
    return HostnameEndpoint(reactor, address.host, address.port, timeout=connect_timeout)


class CppClient:
    """Calls services over the C++ mprpc protocol.

    Give ``zookeeper`` (a connect string; providers found at
    ``/<Service>/<Method>``) or ``providers`` (``{"UserServiceRpc":
    "host:port"}``), or a ready ``directory``. A zero-byte reply is a failure
    unless ``allow_empty_reply``: the protocol cannot tell "the provider sent
    nothing because it failed" from an all-defaults message.

    ``timeout`` is each call's deadline in seconds (``proxy(timeout=...)`` and
    a call's ``timeout=`` override it; there ``None`` means "the client's").
    ``timeout=None`` here means no deadline at all: a call to a C++ provider
    that cannot serve it then waits forever. ``refused_hold``: seconds an
    address that refused a connection fails calls at once instead of being
    dialled again (0: always dial).
    """

    def __init__(
        self,
        reactor: ICppReactor | None = None,
        *,
        zookeeper: str | None = None,
        providers: Mapping[str, str] | None = None,
        directory: CppDirectory | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        max_reply_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        session_timeout: float = 10.0,
        allow_empty_reply: bool = False,
        refused_hold: float = DEFAULT_REFUSED_HOLD,
    ) -> None:
        if timeout is not None:
            timeout = _seconds("timeout", timeout)
        connect_timeout = _seconds("connect_timeout", connect_timeout)
        if refused_hold != 0:
            refused_hold = _seconds("refused_hold", refused_hold)
        if isinstance(max_reply_size, bool) or not isinstance(max_reply_size, int):
            raise ValueError(f"max_reply_size must be an int, not {max_reply_size!r}")
        if max_reply_size <= 0:
            raise ValueError(f"max_reply_size must be positive, not {max_reply_size!r}")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            # Every real reactor provides these; Twisted's type of the global
            # reactor names only the interfaces common to all of them.
            reactor = cast(ICppReactor, global_reactor)
        given = [x is not None for x in (zookeeper, providers, directory)]
        if sum(given) != 1:
            raise TypeError("give exactly one of zookeeper, providers or directory")
        if zookeeper is not None:
            directory = ZooKeeperCppDirectory(
                ZooKeeperClient(reactor, zookeeper, session_timeout=session_timeout)
            )
        elif providers is not None:
            directory = StaticCppDirectory(providers)
        assert directory is not None
        self.reactor = reactor
        self.directory = directory
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_reply_size = max_reply_size
        self.allow_empty_reply = allow_empty_reply
        self.refused_hold = float(refused_hold)
        self._refused: dict[ProviderAddress, float] = {}  # address → not dialled before
        directory.on_change(self._moved)

    @classmethod
    def from_cpp_config(cls, path: str, reactor: ICppReactor | None = None, **kw: Any) -> CppClient:
        """A client for the ZooKeeper named in a C++ ``key=value`` config file."""
        from twisted_rpc.cpp._conf import load_cpp_conf

        conf = load_cpp_conf(path)
        if conf.zookeeper is None:
            raise ValueError(f"{path}: no zookeeperip/zookeeperport")
        return cls(reactor, zookeeper=conf.zookeeper, **kw)

    def proxy(
        self, service: ServiceDescriptor | str | type[Service], *, timeout: float | None = None
    ) -> CppProxy:
        """Deferred-returning methods of ``service``, called over mprpc.

        ``timeout``: the deadline of its calls (None: the client's)."""
        if timeout is not None:
            timeout = _seconds("timeout", timeout)
        info = describe(resolve_descriptor(service))
        return CppProxy(self, info.methods.values(), timeout)

    def call(
        self, method: MethodInfo, request: Message, timeout: float | None = None
    ) -> Deferred[Message]:
        """Call ``method`` once; fires with the response or fails with an RpcError.

        ``timeout``: seconds to wait for the reply (None: the client's).
        A streaming method fails at once with :class:`UnimplementedError`,
        nothing sent: the mprpc protocol has no streams."""
        if method.client_streaming or method.server_streaming:
            return fail(streams_refused(method))
        if type(request) is not method.request_class:
            return fail(wrong_request_type(method, request))
        if timeout is None:
            timeout = self.timeout
        else:
            try:
                timeout = _seconds("timeout", timeout)
            except ValueError as e:
                return fail(e)
        d = Deferred.fromCoroutine(self._call(method, request))
        if timeout is not None:

            def timed_out(result: Message | Failure, after: float) -> Message | Failure:
                if isinstance(result, Failure) and result.check(CancelledError):
                    return Failure(DeadlineExceededError(message=f"no reply within {after:g} s"))
                return result

            d.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
        return d

    async def _call(self, method: MethodInfo, request: Message) -> Message:
        service = short_name(method.service)
        address = await self.directory.lookup(service, method.name)
        self._check_refused(address)
        payload = encode_request(service, method.name, request.SerializeToString())
        endpoint = _endpoint(self.reactor, address, self.connect_timeout)
        call = _OneCall(payload, self.max_reply_size)
        try:
            await connectProtocol(endpoint, call)
        except (net_error.ConnectError, net_error.DNSLookupError) as e:
            if isinstance(e, net_error.ConnectionRefusedError | net_error.NoRouteError):
                self._remember_refused(address)
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

    def _check_refused(self, address: ProviderAddress) -> None:
        until = self._refused.get(address)
        if until is None:
            return
        if self.reactor.seconds() < until:
            raise UnavailableError(
                message=f"cannot connect to {address}: it refused a connection less than "
                f"{self.refused_hold:g} s ago"
            )
        del self._refused[address]

    def _remember_refused(self, address: ProviderAddress) -> None:
        if not self.refused_hold:
            return
        now = self.reactor.seconds()
        if len(self._refused) >= _MAX_REFUSED:
            self._refused = {a: t for a, t in self._refused.items() if t > now}
            if len(self._refused) >= _MAX_REFUSED:
                return  # all recent: dial the newcomer each time rather than grow
        self._refused[address] = now + self.refused_hold

    def _moved(self, address: ProviderAddress) -> None:
        # Its node changed (a provider restarted there, perhaps): dial it again.
        self._refused.pop(address, None)

    def close(self) -> Deferred[None]:
        """Release the directory (its ZooKeeper session)."""
        return self.directory.close()


class CppProxy:
    """``proxy.Login(request, timeout=None)`` → Deferred of the response."""

    def __init__(
        self, client: CppClient, methods: Iterable[MethodInfo], timeout: float | None
    ) -> None:
        for method in methods:
            setattr(self, method.name, _stub(client, method, timeout))


def _stub(
    client: CppClient, method: MethodInfo, default_timeout: float | None
) -> Callable[..., Deferred[Message]]:
    def stub(request: Message, *, timeout: float | None = default_timeout) -> Deferred[Message]:
        return client.call(method, request, timeout)

    stub.__name__ = method.name
    stub.__qualname__ = f"{method.service}.{method.name}"
    stub.__doc__ = f"Call {short_name(method.service)}.{method.name} over the mprpc protocol."
    return stub
