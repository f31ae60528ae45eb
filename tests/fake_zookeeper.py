"""An in-memory stand-in for ``twisted_rpc.discovery._kazoo.ZooKeeperClient`` (unit tests only).

It keeps the tree, ephemeral owners and one-shot watches like ZooKeeper and
answers at once; the integration tests run the same registry against a real
server, which keeps this fake honest.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed

from twisted_rpc.discovery._kazoo import (
    CONNECTED,
    LOST,
    SUSPENDED,
    BadVersionError,
    ConnectionLoss,
    EventType,
    NodeExistsError,
    NoNodeError,
    WatchedEvent,
    digest_acls,
    open_acl,
)


@dataclass
class Stat:
    ephemeralOwner: int
    version: int = 0


class FakeZooKeeper:
    """``auth`` as for ZooKeeperClient; ACLs are kept and reported, not enforced."""

    def __init__(self, clock, auth: str = "") -> None:
        self.reactor = clock
        self.nodes: dict[str, tuple[bytes, int]] = {"/": (b"", 0)}
        self.versions: dict[str, int] = {"/": 0}
        self.acls: dict[str, list] = {"/": open_acl()}
        self.identity = None
        if auth:
            self.acl, _ = digest_acls(auth)
            self.identity = self.acl[0].id
        else:
            self.acl = open_acl()
        self.state = "stopped"
        self.session_id = 0
        self.connected_since: float | None = None
        self._next_session = 0x100
        self._listeners = []
        self._child_watches: dict[str, list] = {}
        self._node_watches: dict[str, list] = {}
        self.requests = 0

    # session control, for tests
    def start(self) -> None:
        if self.state == "stopped":
            self.connect(new_session=True)

    def connect(self, new_session: bool = False) -> None:
        if new_session:
            self._next_session += 1
            self.session_id = self._next_session
        self.state = CONNECTED
        self.connected_since = self.reactor.seconds()
        for listener in list(self._listeners):
            listener(CONNECTED, new_session)

    def suspend(self) -> None:
        self.state = SUSPENDED
        self.connected_since = None
        for listener in list(self._listeners):
            listener(SUSPENDED, False)

    def expire(self) -> None:
        """The server ends the session: its watches and ephemeral nodes go."""
        owner = self.session_id
        self.state = LOST
        self._child_watches.clear()
        self._node_watches.clear()
        for path in [p for p, (_, o) in self.nodes.items() if o == owner]:
            self._remove(path)
        for listener in list(self._listeners):
            listener(LOST, False)

    def server_create(self, path: str, value: bytes, owner: int, acl=None, parent_acl=None) -> None:
        """Another client's ephemeral node (``owner`` 0: persistent), parents
        made as needed (with ``parent_acl``, open by default)."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in self.nodes:
                self._create(parent, b"", False, acl=parent_acl or open_acl())
        if owner:
            self._create(path, value, True, owner, acl=acl or open_acl())
        else:
            self._create(path, value, False, acl=acl or open_acl())

    def server_delete(self, path: str) -> None:
        """What another client or an expiry does on the server, connected or not."""
        self._remove(path)

    def close(self) -> Deferred:
        self.expire()
        self.state = "stopped"
        return succeed(None)

    def add_state_listener(self, listener) -> None:
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    # requests
    def _check(self):
        self.requests += 1
        if not self.connected:
            return fail(ConnectionLoss())
        return None

    def _fire(self, table, path, kind) -> None:
        for watch in table.pop(path, []):
            watch(WatchedEvent(kind, "CONNECTED", path))

    def _remove(self, path: str) -> None:
        del self.nodes[path]
        self.versions.pop(path, None)
        self.acls.pop(path, None)
        self._fire(self._node_watches, path, EventType.DELETED)
        self._fire(self._child_watches, path.rsplit("/", 1)[0] or "/", EventType.CHILD)

    def create(self, path, value=b"", *, ephemeral=False, acl=None, owner=None):
        return self._check() or self._create(path, value, ephemeral, owner, acl)

    def _create(self, path, value, ephemeral, owner=None, acl=None):
        if path in self.nodes:
            return fail(NodeExistsError())
        parent = path.rsplit("/", 1)[0] or "/"
        if parent not in self.nodes:
            return fail(NoNodeError())
        self.nodes[path] = (value, (owner or self.session_id) if ephemeral else 0)
        self.versions[path] = 0
        self.acls[path] = list(acl or self.acl)
        self._fire(self._node_watches, path, EventType.CREATED)
        self._fire(self._child_watches, parent, EventType.CHILD)
        return succeed(path)

    def ensure_path(self, path, acl=None):
        failed = self._check()
        if failed:
            return failed
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            if sub not in self.nodes:
                self._create(sub, b"", False, acl=acl)
        return succeed(True)

    def get(self, path, watch=None):
        failed = self._check()
        if failed:
            return failed
        if path not in self.nodes:
            return fail(NoNodeError())
        data, owner = self.nodes[path]
        if watch:
            self._node_watches.setdefault(path, []).append(watch)
        return succeed((data, self._stat(path)))

    def _stat(self, path):
        return Stat(self.nodes[path][1], self.versions[path])

    def get_acls(self, path):
        failed = self._check()
        if failed:
            return failed
        if path not in self.nodes:
            return fail(NoNodeError())
        return succeed((list(self.acls[path]), self._stat(path)))

    def get_children(self, path, watch=None):
        failed = self._check()
        if failed:
            return failed
        if path not in self.nodes:
            return fail(NoNodeError())
        if watch:
            self._child_watches.setdefault(path, []).append(watch)
        prefix = path.rstrip("/") + "/"
        return succeed(
            sorted(
                p[len(prefix) :]
                for p in self.nodes
                if p.startswith(prefix) and "/" not in p[len(prefix) :]
            )
        )

    def exists(self, path, watch=None):
        failed = self._check()
        if failed:
            return failed
        if watch:
            self._node_watches.setdefault(path, []).append(watch)
        if path not in self.nodes:
            return succeed(None)
        return succeed(self._stat(path))

    def set(self, path, value):
        failed = self._check()
        if failed:
            return failed
        if path not in self.nodes:
            return fail(NoNodeError())
        self.nodes[path] = (value, self.nodes[path][1])
        self.versions[path] += 1
        self._fire(self._node_watches, path, EventType.CHANGED)
        return succeed(None)

    def delete(self, path, version=-1):
        failed = self._check()
        if failed:
            return failed
        if path not in self.nodes:
            return fail(NoNodeError())
        if version != -1 and version != self.versions[path]:
            return fail(BadVersionError())
        self._remove(path)
        return succeed(None)
