"""The ZooKeeper registry: ephemeral provider nodes, one children watch per service.

Layout (``docs/registry.md``)::

    <root>/<package.Service>/providers/<host:port>    ephemeral, JSON data

and, for C++ mprpc callers (``register_mprpc``, ``docs/mprpc-compat.md``)::

    /<Service>/<Method>                               ephemeral, b"ip:port"

Providers create their nodes once connected, recreate them in every new
session and whenever someone deletes them, and replace a stale node left by
an earlier session. With ``auth`` they create the root, service and providers
nodes with the digest ACL and refuse to register under one that others may
write. On unregistering they delete only the nodes their own session holds.
Consumers keep one children watch per service, debounce its events, cache the
list, keep the last good list through outages, and skip (with a warning) any
node whose name or data is not a usable provider.
"""

from __future__ import annotations

import ipaddress
import json
import re
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
    ACL,
    CONNECTED,
    BadVersionError,
    EventType,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    WatchedEvent,
    ZooKeeperClient,
    acl_text,
    open_acl,
    others_may_write,
)

__all__ = [
    "DEFAULT_MAX_NODE_DATA",
    "DEFAULT_MAX_PROVIDERS",
    "UnsafeParentError",
    "ZooKeeperRegistry",
]

log = Logger()

DEFAULT_MAX_PROVIDERS = 10_000
"""Provider nodes of one service read at most; the rest are skipped with a warning."""
DEFAULT_MAX_NODE_DATA = 16 * 1024
"""A provider node's data longer than this is skipped (ours are ~200 bytes)."""
UNSAFE_PARENT_RETRY = 30.0
"""Seconds between checks of a parent that others may write (until it is fixed)."""
MAX_WEIGHT = 1_000_000
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")


class UnsafeParentError(Exception):
    """A parent of a provider node grants write rights to someone else."""

    def __init__(self, path: str, acls: list[ACL]) -> None:
        super().__init__(f"{path} has ACL {acl_text(acls)}")
        self.path = path
        self.acls = acls


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

    __slots__ = (
        "service",
        "listeners",
        "addresses",
        "nodes",
        "skipped",
        "timer",
        "reading",
        "dirty",
        "refusal",
        "changed",
    )

    def __init__(self, service: str) -> None:
        self.service = service
        self.listeners: list[Listener] = []
        self.addresses: tuple[ProviderAddress, ...] | None = None
        self.nodes: dict[str, ProviderAddress] = {}
        self.skipped: set[str] = set()
        """Names of nodes found unusable: not read (nor warned about) again."""
        self.timer: IDelayedCall | None = None
        self.reading = False
        self.dirty = False
        self.refusal: str | None = None
        """The ACL of the providers node last refused, to log it once."""
        self.changed: set[str] = set()
        """Names of nodes changed or deleted since they were read: read again."""


@implementer(IServiceRegistry, IServiceDiscovery)
class ZooKeeperRegistry(Service):
    """Registry and discovery on a ZooKeeper ensemble (``hosts``: kazoo connect string).

    Starts connecting on first use (or ``startService``); never blocks and never
    fails because ZooKeeper is down: registrations are made when it is reachable.

    A consumer reads at most ``max_providers`` nodes of a service and skips a
    node whose data is longer than ``max_node_data`` bytes.
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
        max_providers: int = DEFAULT_MAX_PROVIDERS,
        max_node_data: int = DEFAULT_MAX_NODE_DATA,
    ) -> None:
        if max_providers < 1 or max_node_data < 1:
            raise ValueError(
                f"max_providers and max_node_data must be positive, got"
                f" {max_providers!r} and {max_node_data!r}"
            )
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
        self.max_providers = max_providers
        self.max_node_data = max_node_data
        self._refusals: dict[str, str] = {}
        """Path -> the unsafe ACL last logged for it (logged once until it changes)."""
        self._rechecks: set[str] = set()
        """Paths refused for their parents' ACL with a check again scheduled."""

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
        """Delete every node this registry's session holds (a graceful stop
        does this first). A node held by another session (another provider of
        an mprpc method, for which this one stands by) is left alone."""
        paths = list(self._nodes)
        self._nodes.clear()
        if not self.zk.connected:
            return succeed(None)
        return gatherResults([self._delete(path) for path in paths]).addCallback(lambda _: None)

    def _delete(self, path: str) -> Deferred:
        d = Deferred.fromCoroutine(self._delete_own(path))
        d.addErrback(lambda f: log.failure("deleting {path} failed", f, path=path))
        return d

    async def _delete_own(self, path: str) -> None:
        zk = self.zk
        for _ in range(3):
            stat = await zk.exists(path)
            if stat is None:
                return
            if stat.ephemeralOwner != zk.session_id:
                log.info(
                    "leaving {path}: held by session 0x{owner:x}, not this one",
                    path=path,
                    owner=stat.ephemeralOwner,
                )
                return
            try:
                await zk.delete(path, version=stat.version)
            except NoNodeError:
                return
            except BadVersionError:
                continue  # changed meanwhile: look again
            log.info("unregistered {path}", path=path)
            return
        log.warn("{path} kept changing: not deleted (it goes with the session)", path=path)

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
                except UnsafeParentError as e:
                    self._refuse(path, e)
                    if path not in self._rechecks:  # one pending check per path
                        self._rechecks.add(path)
                        self._later(UNSAFE_PARENT_RETRY, self._recheck, path)
                    return
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

    def _refuse(self, path: str, error: UnsafeParentError) -> None:
        found = acl_text(error.acls)
        if self._refusals.get(path) == f"{error.path} {found}":
            return
        self._refusals[path] = f"{error.path} {found}"
        log.error(
            "not registering {path}: its parent {parent} has ACL {acl}, so others may"
            " create, change or delete provider nodes there. Give it this provider's ACL"
            " (zkCli: setAcl {parent} {wanted}) or use another root; checking again"
            " every {retry:.0f} s",
            path=path,
            parent=error.path,
            acl=found,
            wanted=acl_text(self.zk.acl),
            retry=UNSAFE_PARENT_RETRY,
        )

    async def _ensure_parents(self, path: str) -> None:
        """Create the root, service and providers nodes of ``path`` (with the
        client's ACL); with auth, refuse any of them that others may write."""
        zk = self.zk
        providers = path.rsplit("/", 1)[0]
        service = providers.rsplit("/", 1)[0]
        for parent in (self.root, service, providers):
            await zk.ensure_path(parent, acl=zk.acl)
            if zk.identity is None:
                continue  # no auth: everything is open anyway
            acls, _ = await zk.get_acls(parent)
            if others_may_write(acls, zk.identity):
                raise UnsafeParentError(parent, acls)
        if self._refusals.pop(path, None) is not None:
            log.info("the parents of {path} are safe now: registering it", path=path)

    async def _create_node(self, path: str, node: _Node) -> None:
        zk = self.zk
        payload = node.payload
        # mprpc nodes are open, as C++ callers and providers expect them
        # (without ADMIN: nobody can change their ACL and lock the others out).
        acl = open_acl() if node.shared else None
        if node.shared:
            await zk.ensure_path(path.rsplit("/", 1)[0], acl=acl)
        else:
            await self._ensure_parents(path)
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
                    await zk.delete(path, version=stat.version)
                except NoNodeError:
                    pass
                except BadVersionError:
                    self._ensure_again.add(path)  # changed meanwhile: look again
                    return
                await zk.create(path, payload, ephemeral=True, acl=acl)
                log.info("registered {path}", path=path)
            elif data != payload:
                await zk.set(path, payload)
        stat = await zk.exists(path, watch=self._node_event)
        if stat is None:
            self._ensure_again.add(path)

    def _recheck(self, path: str) -> None:
        self._rechecks.discard(path)
        self._retry_node(path)

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
            if children and not await self._trusted(watched, path):
                watched.nodes = {}
                self._apply(watched, ())
                return
            children = self._capped(watched, path, children)
            # A node changed since it was read (a bad one replaced by a good one
            # under the same name, say) is read again.
            changed, watched.changed = watched.changed, set()
            for name in changed:
                watched.nodes.pop(name, None)
                watched.skipped.discard(name)
            watched.skipped.intersection_update(children)
            fresh = [
                name
                for name in children
                if name not in watched.nodes and name not in watched.skipped
            ]
            read = await gatherResults(
                [Deferred.fromCoroutine(self._read_node(path, name, watched)) for name in fresh]
            )
        except KazooException as e:
            log.info("reading {path}: {error!r}; keeping the last list", path=path, error=e)
            self._later(1.0, self._read_soon, watched)  # the watch is not set
            return
        nodes = {name: watched.nodes[name] for name in children if name in watched.nodes}
        for name, address in zip(fresh, read, strict=True):
            if address is True:
                watched.skipped.add(name)
            elif address is not False:
                nodes[name] = address
        watched.nodes = nodes
        self._apply(watched, tuple(sorted(nodes.values(), key=lambda a: (a.host, a.port))))

    async def _trusted(self, watched: _Watched, path: str) -> bool:
        """With auth: whether only this identity may add or remove providers at
        ``path`` (others' nodes there are not used; the error is logged once)."""
        identity = self.zk.identity
        if identity is None:
            return True
        acls, _ = await self.zk.get_acls(path)
        if not others_may_write(acls, identity):
            watched.refusal = None
            return True
        found = acl_text(acls)
        if watched.refusal != found:
            watched.refusal = found
            log.error(
                "{service}: not using the providers listed at {path}: its ACL {acl} lets"
                " others add or remove them",
                service=watched.service,
                path=path,
                acl=found,
            )
        return False

    def _capped(self, watched: _Watched, path: str, children: list[str]) -> list[str]:
        """At most ``max_providers`` names: those already known first."""
        if len(children) <= self.max_providers:
            return children
        known = [name for name in children if name in watched.nodes]
        others = sorted(name for name in children if name not in watched.nodes)
        kept = (known + others)[: self.max_providers]
        log.warn(
            "{path} has {count} provider nodes: using {max_providers}, skipping the rest",
            path=path,
            count=len(children),
            max_providers=self.max_providers,
        )
        return kept

    async def _read_node(self, path: str, name: str, watched: _Watched) -> ProviderAddress | bool:
        """The provider a node names; False if it is gone, True (logged) if it
        is unusable. A watch on the node has it read again once it changes."""

        def node_changed(event: WatchedEvent) -> None:
            if self._watched.get(watched.service) is watched:
                watched.changed.add(name)
                self._read_soon(watched)

        try:
            data, stat = await self.zk.get(f"{path}/{name}", watch=node_changed)
            return self._parse_node(name, data, stat)
        except NoNodeError:
            return False  # gone meanwhile
        except NoAuthError:
            reason = "not readable (its ACL denies READ)"
        except _BadNode as e:
            reason = str(e)
        log.warn(
            "ignoring provider node {path}/{name}: {reason}",
            path=path,
            name=_clip(name),
            reason=reason,
        )
        return True

    def _parse_node(self, name: str, data: bytes, stat: Any) -> ProviderAddress:
        if len(data) > self.max_node_data:
            raise _BadNode(f"{len(data)} bytes of data (at most {self.max_node_data})")
        if self.zk.identity is not None and not stat.ephemeralOwner:
            raise _BadNode("not ephemeral (provider nodes go with their session)")
        try:
            info = json.loads(data)
        except (ValueError, RecursionError):
            info = None
        if not isinstance(info, dict):
            info = {}
        if "host" in info or "port" in info:
            return _checked(info.get("host"), info.get("port"), info.get("weight", 100), info)
        # Not our JSON: the address is the node's name.
        try:
            address = parse_address(name)
        except ValueError:
            raise _BadNode("no host and port in its data, and its name is not host:port") from None
        return _checked(address.host, address.port, info.get("weight", 100), info)

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
            try:
                listener(addresses)
            except Exception:
                log.failure("{service}: a provider list listener failed", service=watched.service)


class _BadNode(ValueError):
    """A provider node that cannot be used; its message says why."""


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _checked(host: object, port: object, weight: object, info: dict) -> ProviderAddress:
    """A ProviderAddress from a node's values, or _BadNode saying what is wrong."""
    if not isinstance(host, str) or not _valid_host(host):
        raise _BadNode(f"bad host {_clip(repr(host))}")
    if type(port) is not int or not 0 < port < 65536:
        raise _BadNode(f"bad port {_clip(repr(port))}")
    if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
        raise _BadNode(f"bad weight {_clip(repr(weight))} (an integer 0..{MAX_WEIGHT})")
    return ProviderAddress(host, port, weight, info)


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address (v6 without brackets), nothing else."""
    if _HOSTNAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
