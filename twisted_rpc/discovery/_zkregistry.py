"""The ZooKeeper registry: ephemeral provider nodes, one children watch per service.

:class:`ZooKeeperRegistry` is both kinds of registry on one ZooKeeper session:
the provider side (``_zkannounce``: the nodes it keeps in place, in the native
layout and, for C++ mprpc callers, the C++ one) and the consumer side
(``_zkfollow``: the provider lists it follows). ``_layout`` knows the paths
and the node data; ``_kazoo`` is the session.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from zope.interface import implementer

from twisted_rpc.core._interfaces import IServiceDiscovery, IServiceRegistry
from twisted_rpc.discovery._kazoo import CONNECTED, IZooKeeperReactor, ZooKeeperClient
from twisted_rpc.discovery._layout import DEFAULT_ROOT
from twisted_rpc.discovery._snapshot import DEFAULT_CHECK_TIMEOUT, HealthCheck, Snapshot
from twisted_rpc.discovery._types import ProviderAddress, Registration
from twisted_rpc.discovery._zkannounce import Announcer, UnsafeParentError
from twisted_rpc.discovery._zkfollow import Follower, Listener

__all__ = [
    "DEFAULT_MAX_NODE_DATA",
    "DEFAULT_MAX_PROVIDERS",
    "UnsafeParentError",
    "ZooKeeperRegistry",
]

DEFAULT_MAX_PROVIDERS = 10_000
"""Provider nodes of one service read at most; the rest are skipped with a warning."""
DEFAULT_MAX_NODE_DATA = 16 * 1024
"""A provider node's data longer than this is skipped (ours are ~200 bytes)."""


@implementer(IServiceRegistry, IServiceDiscovery)
class ZooKeeperRegistry(Service):
    """Registry and discovery on a ZooKeeper ensemble (``hosts``: kazoo connect string).

    Starts connecting on first use (or ``startService``); never blocks and never
    fails because ZooKeeper is down: registrations are made when it is reachable.

    A consumer reads at most ``max_providers`` nodes of a service and skips a
    node whose data is longer than ``max_node_data`` bytes.

    With ``snapshot`` (a file path) a consumer keeps its provider lists in
    that file; with ``health_check`` too, started while ZooKeeper is
    unreachable it routes to the file's providers that pass their check
    until ZooKeeper answers (``_snapshot``; docs/registry.md).
    """

    name = "zookeeper-registry"

    def __init__(
        self,
        reactor: IZooKeeperReactor,
        hosts: str,
        *,
        root: str = DEFAULT_ROOT,
        session_timeout: float = 10.0,
        auth: str = "",
        debounce: float = 0.05,
        zk: ZooKeeperClient | None = None,
        max_providers: int = DEFAULT_MAX_PROVIDERS,
        max_node_data: int = DEFAULT_MAX_NODE_DATA,
        snapshot: str = "",
        health_check: HealthCheck | None = None,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
    ) -> None:
        if max_providers < 1 or max_node_data < 1:
            raise ValueError(
                f"max_providers and max_node_data must be positive, got"
                f" {max_providers!r} and {max_node_data!r}"
            )
        self.reactor = reactor
        self.root = root.rstrip("/") or DEFAULT_ROOT
        self.session_timeout = session_timeout
        self.debounce = debounce
        self.zk = zk or ZooKeeperClient(reactor, hosts, session_timeout=session_timeout, auth=auth)
        self.zk.add_state_listener(self._state_changed)
        self._retries: set[IDelayedCall] = set()
        self.max_providers = max_providers
        self.max_node_data = max_node_data
        self._announcer = Announcer(self.zk, self.root, self._later)
        self._follower = Follower(
            self.zk,
            reactor,
            self.root,
            session_timeout=session_timeout,
            debounce=debounce,
            max_providers=max_providers,
            max_node_data=max_node_data,
            later=self._later,
        )
        self.snapshot = (
            Snapshot(reactor, snapshot, health_check=health_check, check_timeout=check_timeout)
            if snapshot
            else None
        )

    # ----------------------------------------------------------------- lifecycle

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # (Twisted's is not annotated)
        self.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # (Twisted's is not annotated)
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

    def close(self) -> Deferred[None]:
        """End the session: this registry's nodes vanish at once."""
        for call in self._retries:
            if call.active():
                call.cancel()
        self._retries.clear()
        self._follower.close()
        if self.snapshot is not None:
            self.snapshot.close()
        return self.zk.close()

    def _state_changed(self, state: str, new_session: bool) -> None:
        if state != CONNECTED:
            return  # keep every list and registration as it is; wait for the session
        self._announcer.connected(new_session)
        self._follower.connected()

    # ----------------------------------------------------------------- provider side

    @property
    def registrations(self) -> list[Registration]:
        """The native-layout registrations this registry keeps in place."""
        return self._announcer.registrations

    @property
    def reregistrations(self) -> int:
        """Nodes created again (new session, or deleted by someone else)."""
        return self._announcer.reregistrations

    def register(self, registration: Registration) -> Deferred[None]:
        """Announce ``registration`` now if connected, else as soon as connected."""
        return self._announcer.register(registration)

    def register_cpp(self, service: str, method: str, address: ProviderAddress) -> Deferred[None]:
        """Announce ``/<service>/<method>`` = ``b"ip:port"`` for C++ mprpc callers.

        ``service`` is the short name (no package). The path holds one provider:
        a node of another live provider is left alone and watched (this one takes
        over when it goes); a stale node of this address is replaced.
        """
        return self._announcer.register_cpp(service, method, address)

    def unregister_all(self) -> Deferred[None]:
        """Delete every node this registry's session holds (a graceful stop
        does this first). A node held by another session is left alone."""
        return self._announcer.unregister_all()

    # ----------------------------------------------------------------- consumer side

    def subscribe(self, service: str, listener: Listener) -> Callable[[], None]:
        """Follow ``service``'s providers; ``listener`` gets every new list."""
        if self.snapshot is not None:
            return self.snapshot.subscribe(service, listener, self._follower.subscribe)
        return self._follower.subscribe(service, listener)

    def providers(self, service: str) -> tuple[ProviderAddress, ...]:
        """The last provider list read for a followed service (empty if none
        yet; the checked snapshot providers until ZooKeeper answers)."""
        if self.snapshot is not None:
            checked = self.snapshot.providers(service)
            if checked is not None:
                return checked
        return self._follower.providers(service)
