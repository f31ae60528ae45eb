"""The ZooKeeper registry: ephemeral provider nodes, one children watch per service.

Layout (``docs/registry.md``)::

    <root>/<package.Service>/providers/<host:port>    ephemeral, JSON data

and, for C++ mprpc callers (``register_mprpc``, ``docs/mprpc-compat.md``)::

    /<Service>/<Method>                               ephemeral, b"ip:port"

Providers create their nodes once connected, recreate them in every new
session and whenever someone deletes them, and replace a stale node left by
an earlier session. Consumers keep one children watch per service, debounce
its events, cache the list, and keep the last good list through outages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from twisted_rpc.interfaces import IServiceDiscovery, IServiceRegistry
from twisted_rpc.registry import ProviderAddress, Registration, parse_address
from twisted_rpc.zookeeper import (
    CONNECTED,
    EventType,
    KazooException,
    NodeExistsError,
    NoNodeError,
    WatchedEvent,
    ZooKeeperClient,
    open_acl,
)

__all__ = ["ZooKeeperRegistry"]

log = Logger()

Listener = Callable[[tuple[ProviderAddress, ...]], object]


class _Node:
    """An ephemeral node this registry keeps in place."""

    __slots__ = ("registration", "payload", "shared")

    def __init__(self, registration: Registration, payload: bytes, shared: bool = False) -> None:
        self.registration = registration
        self.payload = payload
        self.shared = shared
        """True for an mprpc node: one path for every provider of the method."""


class _Watched:
    """A service a consumer follows: its listeners and last good provider list."""

    __slots__ = ("service", "listeners", "addresses", "nodes", "timer", "reading", "dirty")

    def __init__(self, service: str) -> None:
        self.service = service
        self.listeners: list[Listener] = []
        self.addresses: tuple[ProviderAddress, ...] | None = None
        self.nodes: dict[str, ProviderAddress] = {}
        self.timer: IDelayedCall | None = None
        self.reading = False
        self.dirty = False


@implementer(IServiceRegistry, IServiceDiscovery)
class ZooKeeperRegistry(Service):
    """Registry and discovery on a ZooKeeper ensemble (``hosts``: kazoo connect string).

    Starts connecting on first use (or ``startService``); never blocks and never
    fails because ZooKeeper is down: registrations are made when it is reachable.
    """

    name = "zookeeper-registry"

    def __init__(
        self,
        reactor: Any,
        hosts: str,
        *,
        root: str = "/mprpc",
        session_timeout: float = 10.0,
        auth: str = "",
        debounce: float = 0.05,
        zk: ZooKeeperClient | None = None,
    ) -> None:
        self.reactor = reactor
        self.root = root.rstrip("/") or "/mprpc"
        self.session_timeout = session_timeout
        self.debounce = debounce
        self.zk = zk or ZooKeeperClient(reactor, hosts, session_timeout=session_timeout, auth=auth)
        self.zk.add_state_listener(self._state_changed)
        self._nodes: dict[str, _Node] = {}
        self._ensuring: set[str] = set()
        self._ensure_again: set[str] = set()
        self._watched: dict[str, _Watched] = {}
        self.reregistrations = 0
        self._retries: set[IDelayedCall] = set()

    # ----------------------------------------------------------------- lifecycle

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Deferred:
        super().stopService()
        return self.close()

    def start(self) -> None:
        """Connect in the background (idempotent)."""
        self.zk.start()

    def _later(self, delay: float, f: Callable[..., object], *args: object) -> None:
        """A retry that ``close`` cancels if it is still pending."""

        def run() -> None:
            self._retries.discard(call)
            f(*args)

        call = self.reactor.callLater(delay, run)
        self._retries.add(call)

    def close(self) -> Deferred:
        """End the session: this registry's nodes vanish at once."""
        for call in self._retries:
            if call.active():
                call.cancel()
        self._retries.clear()
        for watched in self._watched.values():
            if watched.timer is not None and watched.timer.active():
                watched.timer.cancel()
        self._watched.clear()
        return self.zk.close()

    # ----------------------------------------------------------------- paths

    def providers_path(self, service: str) -> str:
        return f"{self.root}/{service}/providers"

    def node_path(self, registration: Registration) -> str:
        return f"{self.providers_path(registration.service)}/{registration.address.key}"

    # ----------------------------------------------------------------- provider side

    @property
    def registrations(self) -> list[Registration]:
        return [node.registration for node in self._nodes.values() if not node.shared]

    def register(self, registration: Registration) -> Deferred:
        """Announce ``registration`` now if connected, else as soon as connected."""
        address = registration.address
        data = {
            "host": address.host,
            "port": address.port,
            "weight": address.weight,
            **registration.data,
        }
        path = self.node_path(registration)
        self._nodes[path] = _Node(registration, json.dumps(data, sort_keys=True).encode())
        return self._announce(path)

    def register_mprpc(self, service: str, method: str, address: ProviderAddress) -> Deferred:
        """Announce ``/<service>/<method>`` = ``b"ip:port"`` for C++ mprpc callers.

        ``service`` is the short name (no package). The path holds one provider:
        a node of another live provider is left alone and watched (this one takes
        over when it goes); a stale node of this address is replaced.
        """
        path = f"/{service}/{method}"
        registration = Registration(f"{service}.{method}", address, {})
        self._nodes[path] = _Node(registration, address.key.encode(), shared=True)
        return self._announce(path)

    def _announce(self, path: str) -> Deferred:
        self.start()
        if not self.zk.connected:
            log.info("zookeeper not connected: {path} will be registered when it is", path=path)
            return succeed(None)
        return self._ensure_node(path)

    def unregister_all(self) -> Deferred:
        """Delete every node of this registry (a graceful stop does this first)."""
        paths = list(self._nodes)
        self._nodes.clear()
        if not self.zk.connected:
            return succeed(None)
        return gatherResults([self._delete(path) for path in paths]).addCallback(lambda _: None)

    def _delete(self, path: str) -> Deferred:
        d = self.zk.delete(path)

        def failed(failure: Any) -> None:
            if not failure.check(NoNodeError):
                log.failure("deleting {path} failed", failure, path=path)

        return d.addCallbacks(lambda _: log.info("unregistered {path}", path=path), failed)

    def _ensure_node(self, path: str) -> Deferred:
        if path in self._ensuring:
            self._ensure_again.add(path)
            return succeed(None)
        d = Deferred.fromCoroutine(self._ensure(path))
        d.addErrback(lambda f: log.failure("registering {path} failed", f, path=path))
        return d

    async def _ensure(self, path: str) -> None:
        self._ensuring.add(path)
        try:
            while True:
                self._ensure_again.discard(path)
                node = self._nodes.get(path)
                if node is None or not self.zk.connected:
                    return
                try:
                    await self._create_node(path, node)
                except KazooException as e:
                    # Connection trouble: the next CONNECTED re-ensures every node,
                    # and in case that event came first, try again in a second.
                    log.warn("registering {path}: {error!r}; retrying", path=path, error=e)
                    self._later(1.0, self._retry_node, path)
                    return
                if path not in self._ensure_again:
                    return
        finally:
            self._ensuring.discard(path)

    async def _create_node(self, path: str, node: _Node) -> None:
        zk = self.zk
        payload = node.payload
        # mprpc nodes are open, as C++ callers and providers expect them.
        acl = open_acl() if node.shared else None
        if not node.shared:
            await zk.ensure_path(self.root, acl=open_acl())
        await zk.ensure_path(path.rsplit("/", 1)[0], acl=acl)
        try:
            await zk.create(path, payload, ephemeral=True, acl=acl)
            log.info("registered {path}", path=path)
        except NodeExistsError:
            data, stat = await zk.get(path)
            if node.shared and stat.ephemeralOwner != zk.session_id and data != payload:
                log.warn(
                    "{path} is held by {other} (session 0x{owner:x}); taking over if it goes away",
                    path=path,
                    other=data.decode("utf-8", "replace"),
                    owner=stat.ephemeralOwner,
                )
            elif stat.ephemeralOwner != zk.session_id:
                log.info(
                    "replacing stale {path} of session 0x{owner:x}",
                    path=path,
                    owner=stat.ephemeralOwner,
                )
                try:
                    await zk.delete(path)
                except NoNodeError:
                    pass
                await zk.create(path, payload, ephemeral=True, acl=acl)
                log.info("registered {path}", path=path)
            elif data != payload:
                await zk.set(path, payload)
        stat = await zk.exists(path, watch=self._node_event)
        if stat is None:
            self._ensure_again.add(path)

    def _retry_node(self, path: str) -> None:
        if path in self._nodes and self.zk.connected:
            self._ensure_node(path)

    def _node_event(self, event: WatchedEvent) -> None:
        path = event.path
        if path not in self._nodes or not self.zk.connected:
            return
        if event.type == EventType.DELETED:
            if self._nodes[path].shared:
                log.info("{path} is gone: creating it", path=path)
            else:
                log.warn("{path} was deleted by someone else: recreating it", path=path)
            self.reregistrations += 1
        self._ensure_node(path)

    def _state_changed(self, state: str, new_session: bool) -> None:
        if state != CONNECTED:
            return  # keep every list and registration as it is; wait for the session
        if self._nodes:
            if new_session:
                self.reregistrations += len(self._nodes)
                log.info("new zookeeper session: registering {n} services", n=len(self._nodes))
            for path in list(self._nodes):
                self._ensure_node(path)
        for watched in self._watched.values():
            self._read_soon(watched, 0)

    # ----------------------------------------------------------------- consumer side

    def subscribe(self, service: str, listener: Listener) -> Callable[[], None]:
        """Follow ``service``'s providers; ``listener`` gets every new list."""
        self.start()
        watched = self._watched.get(service)
        if watched is None:
            watched = self._watched[service] = _Watched(service)
            self._read_soon(watched, 0)
        watched.listeners.append(listener)
        if watched.addresses is not None:
            listener(watched.addresses)

        def unsubscribe() -> None:
            if listener in watched.listeners:
                watched.listeners.remove(listener)
            if not watched.listeners and self._watched.get(service) is watched:
                del self._watched[service]
                if watched.timer is not None and watched.timer.active():
                    watched.timer.cancel()

        return unsubscribe

    def providers(self, service: str) -> tuple[ProviderAddress, ...]:
        """The last provider list read for a followed service (empty if none yet)."""
        watched = self._watched.get(service)
        return watched.addresses or () if watched else ()

    def _read_soon(self, watched: _Watched, delay: float | None = None) -> None:
        if watched.reading:
            watched.dirty = True
            return
        if watched.timer is not None and watched.timer.active():
            if delay != 0:
                return
            watched.timer.cancel()
        watched.timer = self.reactor.callLater(
            self.debounce if delay is None else delay, self._read, watched
        )

    def _read(self, watched: _Watched) -> None:
        watched.timer = None
        if not self.zk.connected or self._watched.get(watched.service) is not watched:
            return  # read again when connected
        watched.reading = True
        watched.dirty = False

        def done(_: object) -> None:
            watched.reading = False
            if watched.dirty:
                self._read_soon(watched)

        def failed(failure: Any) -> None:
            log.failure("reading providers of {service}", failure, service=watched.service)
            self._later(1.0, self._read_soon, watched)  # try again later

        d = Deferred.fromCoroutine(self._read_providers(watched))
        d.addErrback(failed)
        d.addBoth(done)

    async def _read_providers(self, watched: _Watched) -> None:
        path = self.providers_path(watched.service)

        def changed(event: WatchedEvent) -> None:
            if self._watched.get(watched.service) is watched:
                self._read_soon(watched)

        try:
            try:
                children = await self.zk.get_children(path, watch=changed)
            except NoNodeError:
                if await self.zk.exists(path, watch=changed) is not None:
                    watched.dirty = True  # created meanwhile: read again
                    return
                children = []
            fresh = [name for name in children if name not in watched.nodes]
            read = await gatherResults(
                [Deferred.fromCoroutine(self._read_node(path, name)) for name in fresh]
            )
        except KazooException as e:
            log.info("reading {path}: {error!r}; keeping the last list", path=path, error=e)
            self._later(1.0, self._read_soon, watched)  # the watch is not set
            return
        nodes = {name: watched.nodes[name] for name in children if name in watched.nodes}
        nodes.update(
            (name, address)
            for name, address in zip(fresh, read, strict=True)
            if address is not None
        )
        watched.nodes = nodes
        self._apply(watched, tuple(sorted(nodes.values(), key=lambda a: (a.host, a.port))))

    async def _read_node(self, path: str, name: str) -> ProviderAddress | None:
        try:
            data, _ = await self.zk.get(f"{path}/{name}")
        except NoNodeError:
            return None
        try:
            info = json.loads(data)
            return ProviderAddress(
                str(info["host"]), int(info["port"]), int(info.get("weight", 100)), info
            )
        except (ValueError, KeyError, TypeError):
            try:
                return parse_address(name)
            except ValueError:
                log.warn("ignoring provider node {path}/{name}: bad data", path=path, name=name)
                return None

    def _apply(self, watched: _Watched, addresses: tuple[ProviderAddress, ...]) -> None:
        if addresses == watched.addresses:
            return
        if not addresses and watched.addresses:
            # An empty list read right after (re)connecting may be an outage's
            # artefact (providers not re-registered yet): keep the good list
            # until the session has been up for a whole session timeout.
            since = self.zk.connected_since
            wait = (since + self.session_timeout - self.reactor.seconds()) if since else None
            if wait is None or wait > 0:
                log.info(
                    "{service}: empty provider list right after connecting; keeping the last one",
                    service=watched.service,
                )
                self._read_soon(watched, max(wait or self.session_timeout, 0.1))
                return
        watched.addresses = addresses
        log.info(
            "{service}: {count} providers {list}",
            service=watched.service,
            count=len(addresses),
            list=" ".join(str(a) for a in addresses),
        )
        for listener in list(watched.listeners):
            listener(addresses)
