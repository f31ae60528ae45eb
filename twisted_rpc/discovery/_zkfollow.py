"""The consumer side of the ZooKeeper registry: provider lists it follows.

Consumers keep one children watch per service, debounce its events, cache the
list, keep the last good list through outages, and skip (with a warning) any
node whose name or data is not a usable provider.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.discovery._kazoo import (
    KazooException,
    NoAuthError,
    NoNodeError,
    WatchedEvent,
    ZooKeeperClient,
    acl_text,
    others_may_write,
)
from twisted_rpc.discovery._layout import (
    PUBLISHED_KEY,
    BadNode,
    clip,
    decode_provider,
    providers_path,
)
from twisted_rpc.discovery._types import ProviderAddress

log = Logger(namespace="twisted_rpc.discovery")

Listener = Callable[[tuple[ProviderAddress, ...]], object]
Later = Callable[..., None]
"""``later(delay, f, *args)``: a retry the registry cancels when it closes."""


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


class Follower:
    """Follows provider lists for a registry (see the module's docstring)."""

    def __init__(
        self,
        zk: ZooKeeperClient,
        reactor: IReactorTime,
        root: str,
        *,
        session_timeout: float,
        debounce: float,
        max_providers: int,
        max_node_data: int,
        later: Later,
    ) -> None:
        self.zk = zk
        self.reactor = reactor
        self.root = root
        self.session_timeout = session_timeout
        self.debounce = debounce
        self.max_providers = max_providers
        self.max_node_data = max_node_data
        self.later = later
        self._watched: dict[str, _Watched] = {}

    def connected(self) -> None:
        """The session is (again) connected: read every followed list again."""
        for watched in self._watched.values():
            self._read_soon(watched, 0)

    def close(self) -> None:
        for watched in self._watched.values():
            if watched.timer is not None and watched.timer.active():
                watched.timer.cancel()
        self._watched.clear()

    def subscribe(self, service: str, listener: Listener) -> Callable[[], None]:
        """Follow ``service``'s providers; ``listener`` gets every new list."""
        self.zk.start()
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
        if self._watched.get(watched.service) is not watched:
            return  # no longer followed (unsubscribed, closed): a late watch or read's end
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

        def failed(failure: Failure) -> None:
            log.failure("reading providers of {service}", failure, service=watched.service)
            self.later(1.0, self._read_soon, watched)  # try again later

        d = Deferred.fromCoroutine(self._read_providers(watched))
        d.addErrback(failed)
        d.addBoth(done)

    async def _read_providers(self, watched: _Watched) -> None:
        path = providers_path(self.root, watched.service)

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
            stale, watched.changed = watched.changed, set()
            for name in stale:
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
            self.later(1.0, self._read_soon, watched)  # the watch is not set
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
            address = self._parse_node(name, data, stat)
            if self.zk.identity is not None and PUBLISHED_KEY in address.data:
                address = await self._published_by_us(f"{path}/{name}", address)
            return address
        except NoNodeError:
            return False  # gone meanwhile
        except NoAuthError:
            reason = "not readable (its ACL denies READ)"
        except BadNode as e:
            reason = str(e)
        log.warn(
            "ignoring provider node {path}/{name}: {reason}",
            path=path,
            name=clip(name),
            reason=reason,
        )
        return True

    async def _published_by_us(self, path: str, address: ProviderAddress) -> ProviderAddress:
        """With auth: ``address`` as it is if its node's ACL lets only this
        consumer's identity write it (so the service config it publishes was
        written under that identity), else without that config (logged)."""
        identity = self.zk.identity
        assert identity is not None
        acls, _ = await self.zk.get_acls(path)
        if any((a.id.scheme, a.id.id) == (identity.scheme, identity.id) for a in acls) and not (
            others_may_write(acls, identity)
        ):
            return address
        log.warn(
            "ignoring the service config published in {path}: its ACL {acl} is not"
            " this identity's alone",
            path=clip(path),
            acl=acl_text(acls),
        )
        data = {k: v for k, v in address.data.items() if k != PUBLISHED_KEY}
        return ProviderAddress(address.host, address.port, address.weight, data)

    def _parse_node(self, name: str, data: bytes, stat: Any) -> ProviderAddress:
        if len(data) > self.max_node_data:
            raise BadNode(f"{len(data)} bytes of data (at most {self.max_node_data})")
        if self.zk.identity is not None and not stat.ephemeralOwner:
            raise BadNode("not ephemeral (provider nodes go with their session)")
        return decode_provider(name, data)

    def _apply(self, watched: _Watched, addresses: tuple[ProviderAddress, ...]) -> None:
        if addresses == watched.addresses and _published(addresses) == _published(
            watched.addresses or ()
        ):
            return  # (a changed published config is news though the addresses are not)
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


def _published(addresses: tuple[ProviderAddress, ...]) -> list[object]:
    return [a.data.get(PUBLISHED_KEY) for a in addresses]
