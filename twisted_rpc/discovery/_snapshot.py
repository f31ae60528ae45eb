"""The discovery snapshot: a consumer's last provider lists, kept in a file.

A consumer following ZooKeeper writes the lists ZooKeeper gave it to a JSON
file (a temporary file in the same directory, then ``os.replace``: a reader
never sees half a file), at most once per ``write_delay`` seconds and only
while it is at most ``max_bytes`` long. Started while ZooKeeper is
unreachable, it reads that file and routes to a provider it lists **only
once that provider answers a Health check** (SERVING, within
``check_timeout``), so a cold start never routes to a dead host. As soon as
ZooKeeper answers for a service, the snapshot's list of it is dropped.

A missing file is quietly empty; a corrupt or oversized one is ignored with
a warning. See docs/registry.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.discovery._types import ProviderAddress, check_address

__all__ = [
    "DEFAULT_CHECK_TIMEOUT",
    "DEFAULT_MAX_SNAPSHOT_BYTES",
    "HealthCheck",
    "Snapshot",
    "decode_snapshot",
    "encode_snapshot",
    "read_snapshot",
    "write_snapshot",
]

log = Logger(namespace="twisted_rpc.discovery")

Lists = dict[str, tuple[ProviderAddress, ...]]
Listener = Callable[[tuple[ProviderAddress, ...]], object]
Follow = Callable[[str, Listener], Callable[[], None]]

HealthCheck = Callable[[str, ProviderAddress, float], Deferred[bool]]
"""``check(service, address, timeout)``: fires True if ``address`` answers
``mprpc.health.v1.Health/Check(service)`` with SERVING within ``timeout``."""

DEFAULT_MAX_SNAPSHOT_BYTES = 1024 * 1024
"""A snapshot file longer than this is neither read nor written."""
DEFAULT_CHECK_TIMEOUT = 2.0
"""Seconds a snapshot provider has to answer its Health check."""
_VERSION = 1


def encode_snapshot(lists: Mapping[str, tuple[ProviderAddress, ...]]) -> bytes:
    """The file's bytes for ``lists`` (services in name order)."""
    services = {
        service: [
            {"host": a.host, "port": a.port, "weight": a.weight, "data": dict(a.data)}
            for a in addresses
        ]
        for service, addresses in sorted(lists.items())
    }
    return json.dumps({"version": _VERSION, "services": services}, sort_keys=True).encode()


def decode_snapshot(raw: bytes) -> Lists:
    """The lists in a snapshot file's bytes; ValueError if it is not one."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != _VERSION:
        raise ValueError(f"not a version {_VERSION} snapshot")
    services = doc.get("services")
    if not isinstance(services, dict):
        raise ValueError("no services")
    lists: Lists = {}
    for service, entries in services.items():
        if not isinstance(entries, list):
            raise ValueError(f"{service!r}: not a list")
        lists[service] = tuple(_entry(service, e) for e in entries)
    return lists


def _entry(service: str, entry: Any) -> ProviderAddress:
    if not isinstance(entry, dict):
        raise ValueError(f"{service!r}: an entry is not an object")
    weight, data = entry.get("weight", 100), entry.get("data", {})
    if isinstance(weight, bool) or not isinstance(weight, int) or not isinstance(data, dict):
        raise ValueError(f"{service!r}: bad weight or data")
    address = ProviderAddress(entry.get("host"), entry.get("port"), weight, data)  # type: ignore[arg-type]
    try:
        check_address(address)
    except ValueError as e:
        raise ValueError(f"{service!r}: {e}") from None
    return address


def read_snapshot(path: str, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES) -> Lists:
    """The lists in the file at ``path``: empty (with a warning) if it is
    corrupt or longer than ``max_bytes``, empty (quietly) if it is missing."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warn("discovery snapshot {path}: {error}; not using it", path=path, error=e)
        return {}
    if len(raw) > max_bytes:
        log.warn(
            "discovery snapshot {path} is longer than {max_bytes} bytes; not using it",
            path=path,
            max_bytes=max_bytes,
        )
        return {}
    try:
        return decode_snapshot(raw)
    except ValueError as e:
        log.warn("discovery snapshot {path} is corrupt ({error}); not using it", path=path, error=e)
        return {}


def write_snapshot(path: str, raw: bytes) -> None:
    """Replace the file at ``path`` with ``raw`` atomically (temp file, then
    ``os.replace``; the temporary file is removed if anything fails)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".snapshot-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


class _Gate:
    """A service whose ZooKeeper list has not come yet: the snapshot's
    providers, used only once they pass their Health check."""

    __slots__ = ("listeners", "checked", "pending")

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.checked: list[ProviderAddress] = []
        self.pending: dict[ProviderAddress, Deferred[bool]] = {}


class Snapshot:
    """Keeps a registry's provider lists in ``path`` and, with a
    ``health_check``, serves the checked ones until ZooKeeper answers
    (see the module's docstring). ``writer`` is for tests."""

    def __init__(
        self,
        reactor: IReactorTime,
        path: str,
        *,
        health_check: HealthCheck | None = None,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
        write_delay: float = 1.0,
        writer: Callable[[str, bytes], None] = write_snapshot,
    ) -> None:
        if not path:
            raise ValueError("a snapshot needs a file path")
        if not check_timeout > 0 or max_bytes < 1 or write_delay < 0:
            raise ValueError("check_timeout and max_bytes must be positive, write_delay >= 0")
        self.reactor = reactor
        self.path = path
        self.health_check = health_check
        self.check_timeout = check_timeout
        self.max_bytes = max_bytes
        self.write_delay = write_delay
        self.writer = writer
        self.loaded: Lists = read_snapshot(path, max_bytes)
        self.live: Lists = {}
        """The lists ZooKeeper gave, by service (what the next write holds)."""
        self._gates: dict[str, _Gate] = {}
        self._write_timer: IDelayedCall | None = None
        self._closed = False

    # ---------------------------------------------------------------- routing

    def subscribe(self, service: str, listener: Listener, follow: Follow) -> Callable[[], None]:
        """Follow ``service`` through ``follow`` (the registry's own
        subscribe); until it answers, ``listener`` gets the snapshot's
        providers that passed their check."""
        gate = None
        if service not in self.live and self.health_check is not None:
            gate = self._gates.get(service)
            if gate is None:
                gate = self._gates[service] = _Gate()
                for address in self.loaded.get(service, ()):
                    self._check(service, gate, address)
            gate.listeners.append(listener)
            if gate.checked:
                listener(tuple(gate.checked))

        def answered(addresses: tuple[ProviderAddress, ...]) -> None:
            self._answered(service, addresses)
            listener(addresses)

        unfollow = follow(service, answered)

        def unsubscribe() -> None:
            unfollow()
            if gate is not None and listener in gate.listeners:
                gate.listeners.remove(listener)
                if not gate.listeners and self._gates.get(service) is gate:
                    self._drop(service)

        return unsubscribe

    def providers(self, service: str) -> tuple[ProviderAddress, ...] | None:
        """The checked snapshot providers of a service ZooKeeper has not
        answered for yet (None once it has, or with no snapshot list)."""
        gate = self._gates.get(service)
        return tuple(gate.checked) if gate is not None else None

    def _check(self, service: str, gate: _Gate, address: ProviderAddress) -> None:
        assert self.health_check is not None
        d = self.health_check(service, address, self.check_timeout)
        gate.pending[address] = d
        timer = self.reactor.callLater(self.check_timeout, d.cancel)

        def passed(serving: bool) -> None:
            if timer.active():
                timer.cancel()
            if gate.pending.pop(address, None) is None or self._gates.get(service) is not gate:
                return  # ZooKeeper answered meanwhile
            if not serving:
                log.info(
                    "{service}: snapshot provider {address} is not serving; not using it",
                    service=service,
                    address=address,
                )
                return
            gate.checked.append(address)
            checked = tuple(gate.checked)
            log.info(
                "{service}: ZooKeeper not answered yet; using snapshot provider {address}"
                " (its Health check passed)",
                service=service,
                address=address,
            )
            for listener in list(gate.listeners):
                try:
                    listener(checked)
                except Exception:
                    log.failure("{service}: a provider list listener failed", service=service)

        def failed(failure: Failure) -> bool:
            if self._gates.get(service) is not gate:
                return False  # cancelled: ZooKeeper answered
            log.info(
                "{service}: snapshot provider {address} failed its Health check ({error});"
                " not using it",
                service=service,
                address=address,
                error=failure.getErrorMessage() or repr(failure.value),
            )
            return False

        d.addErrback(failed).addCallback(passed).addErrback(
            lambda f: log.failure("{service}: snapshot check", f, service=service)
        )

    def _drop(self, service: str) -> None:
        gate = self._gates.pop(service, None)
        if gate is None:
            return
        pending, gate.pending = gate.pending, {}
        for d in pending.values():
            d.cancel()

    def _answered(self, service: str, addresses: tuple[ProviderAddress, ...]) -> None:
        if service in self._gates:
            log.info("{service}: ZooKeeper answered; dropping the snapshot's list", service=service)
            self._drop(service)
        if self.live.get(service) == addresses and service in self.live:
            return
        self.live[service] = addresses
        if self._write_timer is None and not self._closed:
            self._write_timer = self.reactor.callLater(self.write_delay, self.write)

    # ---------------------------------------------------------------- the file

    def write(self) -> None:
        """Write the lists now: ZooKeeper's, over the loaded snapshot's
        lists of services it has not answered for (so a short run does not
        lose them)."""
        if self._write_timer is not None and self._write_timer.active():
            self._write_timer.cancel()
        self._write_timer = None
        raw = encode_snapshot({**self.loaded, **self.live})
        if len(raw) > self.max_bytes:
            log.warn(
                "discovery snapshot would be {size} bytes (at most {max_bytes}); not writing it",
                size=len(raw),
                max_bytes=self.max_bytes,
            )
            return
        try:
            self.writer(self.path, raw)
        except OSError as e:
            log.warn("writing discovery snapshot {path}: {error}", path=self.path, error=e)

    def close(self) -> None:
        """Cancel every check; write what is pending."""
        self._closed = True
        for service in list(self._gates):
            self._drop(service)
        if self._write_timer is not None:
            self.write()
