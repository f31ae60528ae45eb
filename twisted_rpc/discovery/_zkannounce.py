"""The provider side of the ZooKeeper registry: the nodes it keeps in place.

Providers create their nodes once connected, recreate them in every new
session and whenever someone deletes them, and replace a stale node left by
an earlier session. With ``auth`` they create the root, service and providers
nodes with the digest ACL and refuse to register under one that others may
write. On unregistering they delete only the nodes their own session holds.
A node of the C++ layout holds one provider per method: another live
provider's node is left alone and watched, and taken over when it goes.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from twisted_rpc.discovery._kazoo import (
    ACL,
    BadVersionError,
    EventType,
    KazooException,
    NodeExistsError,
    NoNodeError,
    WatchedEvent,
    ZooKeeperClient,
    acl_text,
    open_acl,
    others_may_write,
)
from twisted_rpc.discovery._layout import cpp_path, encode_cpp, encode_provider, provider_path
from twisted_rpc.discovery._types import ProviderAddress, Registration

log = Logger(namespace="twisted_rpc.discovery")

UNSAFE_PARENT_RETRY = 30.0
"""Seconds between checks of a parent that others may write (until it is fixed)."""

Later = Callable[..., None]
"""``later(delay, f, *args)``: a retry the registry cancels when it closes."""


class UnsafeParentError(Exception):
    """A parent of a provider node grants write rights to someone else."""

    def __init__(self, path: str, acls: list[ACL]) -> None:
        super().__init__(f"{path} has ACL {acl_text(acls)}")
        self.path = path
        self.acls = acls


class _Node:
    """An ephemeral node this registry keeps in place."""

    __slots__ = ("registration", "payload", "cpp_layout")

    def __init__(
        self, registration: Registration, payload: bytes, cpp_layout: bool = False
    ) -> None:
        self.registration = registration
        self.payload = payload
        self.cpp_layout = cpp_layout
        """A node of the C++ layout: one path every provider of the method competes for."""


class Announcer:
    """Keeps a registry's nodes in place (see the module's docstring)."""

    def __init__(self, zk: ZooKeeperClient, root: str, later: Later) -> None:
        self.zk = zk
        self.root = root
        self.later = later
        self._nodes: dict[str, _Node] = {}
        self._ensuring: set[str] = set()
        self._ensure_again: set[str] = set()
        self.reregistrations = 0
        self._refusals: dict[str, str] = {}
        """Path -> the unsafe ACL last logged for it (logged once until it changes)."""
        self._rechecks: set[str] = set()
        """Paths refused for their parents' ACL with a check again scheduled."""

    def connected(self, new_session: bool) -> None:
        """The session is (again) connected: make sure every node is there."""
        if not self._nodes:
            return
        if new_session:
            self.reregistrations += len(self._nodes)
            log.info("new zookeeper session: registering {n} services", n=len(self._nodes))
        for path in list(self._nodes):
            self._ensure_node(path)

    @property
    def registrations(self) -> list[Registration]:
        return [node.registration for node in self._nodes.values() if not node.cpp_layout]

    def register(self, registration: Registration) -> Deferred[None]:
        """Announce ``registration`` now if connected, else as soon as connected."""
        path = provider_path(self.root, registration.service, registration.address.key)
        self._nodes[path] = _Node(registration, encode_provider(registration))
        return self._announce(path)

    def register_cpp(self, service: str, method: str, address: ProviderAddress) -> Deferred[None]:
        """Announce ``/<service>/<method>`` = ``b"ip:port"`` for C++ mprpc callers.

        ``service`` is the short name (no package). The path holds one provider:
        a node of another live provider is left alone and watched (this one takes
        over when it goes); a stale node of this address is replaced.
        """
        path = cpp_path(service, method)
        registration = Registration(f"{service}.{method}", address, {})
        self._nodes[path] = _Node(registration, encode_cpp(address), cpp_layout=True)
        return self._announce(path)

    def _announce(self, path: str) -> Deferred[None]:
        self.zk.start()
        if not self.zk.connected:
            log.info("zookeeper not connected: {path} will be registered when it is", path=path)
            return succeed(None)
        return self._ensure_node(path)

    def unregister_all(self) -> Deferred[None]:
        """Delete every node this registry's session holds (a graceful stop
        does this first). A node held by another session (another provider of
        a C++-layout method, for which this one stands by) is left alone."""
        paths = list(self._nodes)
        self._nodes.clear()
        if not self.zk.connected:
            return succeed(None)
        return gatherResults([self._delete(path) for path in paths]).addCallback(lambda _: None)

    def _delete(self, path: str) -> Deferred[None]:
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

    def _ensure_node(self, path: str) -> Deferred[None]:
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
                        self.later(UNSAFE_PARENT_RETRY, self._recheck, path)
                    return
                except KazooException as e:
                    # Connection trouble: the next CONNECTED re-ensures every node,
                    # and in case that event came first, try again in a second.
                    log.warn("registering {path}: {error!r}; retrying", path=path, error=e)
                    self.later(1.0, self._retry_node, path)
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
        # C++-layout nodes are open, as C++ callers and providers expect them
        # (without ADMIN: nobody can change their ACL and lock the others out).
        acl = open_acl() if node.cpp_layout else None
        if node.cpp_layout:
            await zk.ensure_path(path.rsplit("/", 1)[0], acl=acl)
        else:
            await self._ensure_parents(path)
        try:
            await zk.create(path, payload, ephemeral=True, acl=acl)
            log.info("registered {path}", path=path)
        except NodeExistsError:
            data, stat = await zk.get(path)
            if node.cpp_layout and stat.ephemeralOwner != zk.session_id and data != payload:
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
            if self._nodes[path].cpp_layout:
                log.info("{path} is gone: creating it", path=path)
            else:
                log.warn("{path} was deleted by someone else: recreating it", path=path)
            self.reregistrations += 1
        self._ensure_node(path)
