"""An in-memory stand-in for ``twisted_rpc.zookeeper.ZooKeeperClient`` (unit tests only).

It keeps the tree, ephemeral owners and one-shot watches like ZooKeeper and
answers at once; the integration tests run the same registry against a real
server, which keeps this fake honest.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed

from twisted_rpc.zookeeper import (
    CONNECTED,
    LOST,
    SUSPENDED,
    ConnectionLoss,
    EventType,
    NodeExistsError,
    NoNodeError,
    WatchedEvent,
)


@dataclass
class Stat:
    ephemeralOwner: int


class FakeZooKeeper:
    def __init__(self, clock) -> None:
        self.reactor = clock
        self.nodes: dict[str, tuple[bytes, int]] = {"/": (b"", 0)}
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

    def server_create(self, path: str, value: bytes, owner: int) -> None:
        """Another client's ephemeral node (parents made as needed)."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in self.nodes:
                self._create(parent, b"", False)
        self._create(path, value, True, owner)

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
        self._fire(self._node_watches, path, EventType.DELETED)
        self._fire(self._child_watches, path.rsplit("/", 1)[0] or "/", EventType.CHILD)

    def create(self, path, value=b"", *, ephemeral=False, acl=None, owner=None):
        return self._check() or self._create(path, value, ephemeral, owner)

    def _create(self, path, value, ephemeral, owner=None):
        if path in self.nodes:
            return fail(NodeExistsError())
        parent = path.rsplit("/", 1)[0] or "/"
        if parent not in self.nodes:
            return fail(NoNodeError())
        self.nodes[path] = (value, (owner or self.session_id) if ephemeral else 0)
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
                self._create(sub, b"", False)
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
        return succeed((data, Stat(owner)))

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
        return succeed(Stat(self.nodes[path][1]))

    def set(self, path, value):
        failed = self._check()
        if failed:
            return failed
        if path not in self.nodes:
            return fail(NoNodeError())
        self.nodes[path] = (value, self.nodes[path][1])
        self._fire(self._node_watches, path, EventType.CHANGED)
        return succeed(None)

    def delete(self, path):
        failed = self._check()
        if failed:
            return failed
        if path not in self.nodes:
            return fail(NoNodeError())
        self._remove(path)
        return succeed(None)
