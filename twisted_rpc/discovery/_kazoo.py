"""kazoo behind Deferreds: the one place where threads meet the reactor.

kazoo runs its own threads (connection, callbacks). This adapter:

- issues requests through kazoo's ``*_async`` methods, which only queue the
  request and return at once, so the reactor never waits on ZooKeeper;
- brings every completion, watch event and session state change back to the
  reactor thread with ``reactor.callFromThread`` before anything touches a
  Deferred or a protocol;
- runs kazoo's only blocking calls (``stop``/``close``) in the reactor's thread
  pool with ``deferToThread``.

Nothing outside this module imports kazoo.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.states import EventType, KazooState, WatchedEvent, ZnodeStat
from kazoo.security import (
    ACL,
    Id,
    Permissions,
    make_acl,
    make_digest_acl,
    make_digest_acl_credential,
)
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel

__all__ = [
    "ACL",
    "BadVersionError",
    "ConnectionLoss",
    "EventType",
    "KazooException",
    "NoAuthError",
    "NoNodeError",
    "NodeExistsError",
    "SessionExpiredError",
    "WatchedEvent",
    "ZnodeStat",
    "ZooKeeperClient",
    "acl_text",
    "digest_acls",
    "open_acl",
    "others_may_write",
]

log = Logger(namespace="twisted_rpc.discovery")

CONNECTED = "connected"
SUSPENDED = "suspended"
LOST = "lost"
STOPPED = "stopped"


class IZooKeeperReactor(IReactorTime, IReactorFromThreads):
    """What the ZooKeeper client and registry use of a reactor: its clock
    and ``callFromThread`` (for typing; any reactor provides both)."""


_LEVELS = [
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
]


class _KazooLogs(logging.Handler):
    """kazoo's stdlib ``logging`` records, handed to ``twisted.logger`` on
    the reactor thread (namespace ``twisted_rpc.zookeeper`` for a client's
    own, the logger's name, ``kazoo.*``, for kazoo's modules), instead of
    Python's last-resort handler printing them on stderr. Records come
    while a client is open (``reactors`` not empty) and are dropped after
    (nothing printed after ``close()``)."""

    def __init__(self, namespace: str | None = None) -> None:
        super().__init__()
        self.namespace = namespace
        self.reactors: dict[int, IReactorFromThreads] = {}

    def emit(self, record: logging.LogRecord) -> None:
        reactor = next(iter(self.reactors.values()), None)
        if reactor is None:
            return
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        level = next((ours for at, ours in _LEVELS if record.levelno >= at), LogLevel.debug)
        logger = Logger(namespace=self.namespace or record.name)
        reactor.callFromThread(logger.emit, level, "{text}", text=text)


_KAZOO_MODULES = _KazooLogs()
"""The handler of the ``kazoo`` stdlib logger (kazoo's module-level logs),
installed by the first client unless the process configured ``logging``."""


def _route_kazoo_logs(client: object, reactor: IReactorFromThreads, *, on: bool) -> None:
    """Route kazoo's module-level records into twisted.logger while
    ``client`` is open (``on``), unless ``logging`` is configured already."""
    kazoo_logger = logging.getLogger("kazoo")
    if on:
        if _KAZOO_MODULES not in kazoo_logger.handlers:
            if kazoo_logger.handlers or logging.getLogger().handlers:
                return  # the process routes its logging itself
            kazoo_logger.addHandler(_KAZOO_MODULES)
        _KAZOO_MODULES.reactors[id(client)] = reactor
    else:
        _KAZOO_MODULES.reactors.pop(id(client), None)


StateListener = Callable[[str, bool], object]
"""``listener(state, new_session)``, called on the reactor thread."""


_WRITE_RIGHTS = Permissions.WRITE | Permissions.CREATE | Permissions.DELETE | Permissions.ADMIN


def open_acl() -> list[ACL]:
    """Anyone may read, write, create and delete, but nobody may change the ACL:
    ZooKeeper's OPEN_ACL_UNSAFE without ADMIN (no one can lock others out)."""
    return [make_acl("world", "anyone", read=True, write=True, create=True, delete=True)]


def digest_acls(auth: str) -> tuple[list[ACL], tuple[str, str]]:
    """ACLs for ``digest:user:password``: all rights for that identity, read for
    everyone; and the ``(scheme, credential)`` to authenticate with."""
    scheme, _, credential = auth.partition(":")
    user, _, password = credential.partition(":")
    if scheme != "digest" or not user or not password:
        raise ValueError("auth must look like digest:user:password")
    acls = [make_digest_acl(user, password, all=True), make_acl("world", "anyone", read=True)]
    return acls, ("digest", f"{user}:{password}")


def others_may_write(acls: list[ACL], identity: Id) -> list[ACL]:
    """The entries of ``acls`` that let someone other than ``identity`` write,
    create, delete or change the ACL (READ for anyone is fine)."""
    return [
        acl
        for acl in acls
        if acl.perms & _WRITE_RIGHTS
        and (acl.id.scheme, acl.id.id) != (identity.scheme, identity.id)
    ]


def acl_text(acls: list[ACL]) -> str:
    """``digest:user:hash:cdrwa,world:anyone:r``, as zkCli's ``getAcl`` shows them."""
    letters = [
        (Permissions.CREATE, "c"),
        (Permissions.DELETE, "d"),
        (Permissions.READ, "r"),
        (Permissions.WRITE, "w"),
        (Permissions.ADMIN, "a"),
    ]
    return ",".join(
        f"{acl.id.scheme}:{acl.id.id}:" + "".join(c for bit, c in letters if acl.perms & bit)
        for acl in acls
    )


class _BoundedConnectHandler(SequentialThreadingHandler):  # type: ignore[misc]
    """kazoo's threading handler, its TCP connect timeout capped at ``connect_timeout``.

    kazoo gives a server's TCP connect the whole session timeout, so a server
    that is cut off (packets dropped, no refusal) can use up a session while
    the others serve; ZooKeeper's own client gives each server session
    timeout / servers, and so does this.
    """

    def __init__(self, connect_timeout: float) -> None:
        super().__init__()
        self.connect_timeout = connect_timeout

    def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout")
        if timeout is not None:
            kwargs["timeout"] = min(timeout, self.connect_timeout)
        return super().create_connection(*args, **kwargs)


class ZooKeeperClient:
    """A kazoo client whose API is Deferreds on the reactor thread.

    ``hosts`` is a kazoo connect string (``"h1:2181,h2:2181"``). The session is
    re-established forever after a loss; ``add_state_listener`` tells of
    ``connected`` (with ``new_session`` True after an expiry or at first),
    ``suspended`` and ``lost``.
    """

    def __init__(
        self,
        reactor: IZooKeeperReactor,
        hosts: str,
        *,
        session_timeout: float = 10.0,
        auth: str = "",
        connect_retry_max_delay: float = 2.0,
    ) -> None:
        self.reactor = reactor
        self.hosts = hosts
        self.session_timeout = session_timeout
        self.identity: Id | None = None
        """The digest identity nodes are created for (None without ``auth``)."""
        if auth:
            self.acl, auth_data = digest_acls(auth)
            auth_list = [auth_data]
            user, _, password = auth_data[1].partition(":")
            self.identity = Id("digest", make_digest_acl_credential(user, password))
        else:
            self.acl, auth_list = open_acl(), None
        self._logs = _KazooLogs("twisted_rpc.zookeeper")  # on from start() to close()
        own = logging.Logger("twisted_rpc.zookeeper", logging.INFO)  # not the global tree
        own.addHandler(self._logs)
        self.kazoo = KazooClient(
            logger=own,
            hosts=hosts,
            timeout=session_timeout,
            handler=_BoundedConnectHandler(session_timeout / max(1, len(hosts.split(",")))),
            auth_data=auth_list,
            connection_retry={
                "max_tries": -1,
                "delay": 0.1,
                "backoff": 2,
                "max_delay": connect_retry_max_delay,
            },
        )
        self.kazoo.add_listener(self._kazoo_state)
        self.state = STOPPED
        self.session_id: int | None = None
        self.connected_since: float | None = None
        self._listeners: list[StateListener] = []
        self._started = False

    # ----------------------------------------------------------------- session

    def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        if not self._started:
            self._started = True
            self._logs.reactors[0] = self.reactor
            _route_kazoo_logs(self, self.reactor, on=True)
            self.kazoo.start_async()

    def close(self) -> Deferred[None]:
        """End the session (its ephemeral nodes go at once) and stop kazoo's
        threads; kazoo logs nothing after this is called."""
        self._logs.reactors.clear()
        _route_kazoo_logs(self, self.reactor, on=False)
        if not self._started:
            return succeed(None)
        self._started = False
        self._listeners.clear()

        def stop() -> None:
            self.kazoo.stop()
            self.kazoo.close()

        return deferToThread(stop)

    def add_state_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    def _kazoo_state(self, state: str) -> None:
        # kazoo's thread: never block here, hand over to the reactor.
        self.reactor.callFromThread(self._state_changed, state)

    def _state_changed(self, state: str) -> None:
        if not self._started:
            return
        new_session = False
        if state == KazooState.CONNECTED:
            client_id = self.kazoo.client_id
            session = client_id[0] if client_id else None
            new_session = session != self.session_id
            self.session_id = session
            self.state = CONNECTED
            self.connected_since = self.reactor.seconds()
        elif state == KazooState.SUSPENDED:
            self.state = SUSPENDED
            self.connected_since = None
        else:
            self.state = LOST
            self.connected_since = None
        log.info(
            "zookeeper {hosts}: {state}{new}",
            hosts=self.hosts,
            state=self.state,
            new=f" (session 0x{self.session_id:x})" if new_session and self.session_id else "",
        )
        for listener in list(self._listeners):
            try:
                listener(self.state, new_session)
            except Exception:
                log.failure("zookeeper state listener failed")

    # ----------------------------------------------------------------- requests

    def _request(self, method: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        try:
            result = method(*args, **kw)
        except Exception:
            return fail()
        d: Deferred[Any] = Deferred()

        def completed(async_result: Any) -> None:  # kazoo's thread
            self.reactor.callFromThread(_settle, d, async_result)

        result.rawlink(completed)
        return d

    def watcher(self, callback: Callable[[WatchedEvent], object]) -> Callable[[WatchedEvent], None]:
        """A kazoo watch function that runs ``callback`` on the reactor thread."""

        def watch(event: WatchedEvent) -> None:  # kazoo's thread
            self.reactor.callFromThread(callback, event)

        return watch

    def create(
        self,
        path: str,
        value: bytes = b"",
        *,
        ephemeral: bool = False,
        acl: list[ACL] | None = None,
    ) -> Deferred[str]:
        return self._request(
            self.kazoo.create_async, path, value, acl=acl or self.acl, ephemeral=ephemeral
        )

    def ensure_path(self, path: str, acl: list[ACL] | None = None) -> Deferred[Any]:
        return self._request(self.kazoo.ensure_path_async, path, acl=acl or self.acl)

    def get(
        self, path: str, watch: Callable[[WatchedEvent], object] | None = None
    ) -> Deferred[tuple[bytes, ZnodeStat]]:
        """Fires with ``(data, ZnodeStat)``."""
        return self._request(self.kazoo.get_async, path, watch=watch and self.watcher(watch))

    def get_children(
        self, path: str, watch: Callable[[WatchedEvent], object] | None = None
    ) -> Deferred[list[str]]:
        return self._request(
            self.kazoo.get_children_async, path, watch=watch and self.watcher(watch)
        )

    def exists(
        self, path: str, watch: Callable[[WatchedEvent], object] | None = None
    ) -> Deferred[ZnodeStat | None]:
        """Fires with a ZnodeStat, or None when there is no node."""
        return self._request(self.kazoo.exists_async, path, watch=watch and self.watcher(watch))

    def get_acls(self, path: str) -> Deferred[tuple[list[ACL], ZnodeStat]]:
        """Fires with ``(list of ACL, ZnodeStat)``."""
        return self._request(self.kazoo.get_acls_async, path)

    def set(self, path: str, value: bytes) -> Deferred[ZnodeStat]:
        return self._request(self.kazoo.set_async, path, value)

    def delete(self, path: str, version: int = -1) -> Deferred[None]:
        """Delete ``path``; with ``version``, only if the node still has that
        version (else BadVersionError)."""
        return self._request(self.kazoo.delete_async, path, version)


def _settle(d: Deferred[Any], async_result: Any) -> None:
    if async_result.successful():
        d.callback(async_result.value)
    else:
        d.errback(async_result.exception)
