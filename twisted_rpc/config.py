"""Provider and consumer configuration files (ini), validated up front.

Every problem is a :class:`ConfigError` whose message is one line naming the
file, the section and key, and what is wrong. ``docs/config.md`` lists the keys.
"""

from __future__ import annotations

import configparser
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from twisted_rpc.client._balancer import balancer_named
from twisted_rpc.client._connection import DEFAULT_MAX_WRITE_BUFFER, timeout_error
from twisted_rpc.client._dials import DEFAULT_MAX_CONCURRENT_DIALS, DEFAULT_MAX_DIALS_PER_SECOND
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._service import Service
from twisted_rpc.core._tls import ClientTLS, server_options
from twisted_rpc.discovery._types import ProviderAddress, parse_address
from twisted_rpc.server._factory import ServerLimits

__all__ = [
    "ConfigError",
    "ConsumerConfig",
    "CppConf",
    "CppListenerConfig",
    "ProviderConfig",
    "RegistryConfig",
    "load_consumer_config",
    "load_cpp_conf",
    "load_provider_config",
    "load_services",
]


class ConfigError(Exception):
    """A configuration file is missing, malformed or names something unusable."""


REGISTRY_KINDS = ("static", "zookeeper")


@dataclass
class RegistryConfig:
    kind: str = "static"
    hosts: str = "127.0.0.1:2181"
    root: str = "/mprpc"
    session_timeout: float = 10.0
    weight: int = 100
    auth: str = ""


@dataclass
class AdminConfig:
    """The admin HTTP endpoint (``[admin]``): metrics, status page, JSON."""

    listen: str
    max_connections: int = 64
    """Admin connections open at once; more are closed at once (logged)."""


@dataclass
class CppListenerConfig:
    """The C++-mprpc-compatible listener of a provider (``[mprpc]``)."""

    listen: str
    advertise: ProviderAddress | None = None
    zookeeper: str | None = None
    """Connect string of the ZooKeeper to register ``/<Service>/<Method>`` in (None: don't)."""


@dataclass
class CppConf:
    """A C++ mprpc ``key=value`` config file (``rpcserverip``, ``rpcserverport``,
    ``zookeeperip``, ``zookeeperport``)."""

    path: str
    ip: str | None
    port: int | None
    zookeeper: str | None

    def listener(self) -> CppListenerConfig:
        if self.ip is None or self.port is None:
            raise ConfigError(f"{self.path}: rpcserverip and rpcserverport are required")
        return CppListenerConfig(
            listen=f"tcp:{self.port}:interface={self.ip}",
            advertise=ProviderAddress(self.ip, self.port),
            zookeeper=self.zookeeper,
        )


@dataclass
class ProviderConfig:
    path: str
    listen: str | None
    advertise: ProviderAddress | None
    services: list[str]
    grace_period: float = 10.0
    max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE
    limits: ServerLimits = field(default_factory=ServerLimits)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tls_options: Any = None
    mprpc: CppListenerConfig | None = None
    health: bool = True
    reflection: bool = True
    slow_call_threshold: float = 0.0
    admin: AdminConfig | None = None
    log_format: str = "text"


@dataclass
class ConsumerConfig:
    path: str
    timeout: float | None = None
    connect_timeout: float = 5.0
    max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE
    balancer: str = "round_robin"
    keepalive_interval: float = 0.0
    keepalive_timeout: float = 10.0
    max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER
    max_concurrent_dials: int = DEFAULT_MAX_CONCURRENT_DIALS
    max_dials_per_second: float = DEFAULT_MAX_DIALS_PER_SECOND
    tls: ClientTLS | None = None
    providers: dict[str, list[ProviderAddress]] = field(default_factory=dict)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


_PROVIDER_KEYS = {
    "listen",
    "advertise",
    "services",
    "grace_period",
    "max_frame_size",
    "max_calls_per_connection",
    "max_calls",
    "max_connections",
    "idle_timeout",
    "max_long_lived_calls_per_connection",
    "max_long_lived_calls",
    "max_metadata_size",
    "max_metadata_entries",
    "frame_timeout",
    "max_connections_per_peer",
    "max_buffered_bytes",
    "health",
    "reflection",
    "slow_call_threshold",
    "log_format",
}
_CONSUMER_KEYS = {
    "timeout",
    "connect_timeout",
    "max_frame_size",
    "balancer",
    "keepalive_interval",
    "keepalive_timeout",
    "max_write_buffer",
    "max_concurrent_dials",
    "max_dials_per_second",
}
_REGISTRY_KEYS = {"kind", "hosts", "root", "session_timeout", "weight", "auth"}
_MPRPC_KEYS = {"listen", "advertise", "zookeeper", "config"}
_PROVIDER_TLS_KEYS = {"certificate", "private_key", "client_ca"}
_CONSUMER_TLS_KEYS = {"ca", "certificate", "private_key"}


class _Reader:
    """Typed, one-line-error access to an ini file's values."""

    def __init__(self, path: str, sections: dict[str, set[str] | None]) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such config file")
        parser = configparser.ConfigParser(
            inline_comment_prefixes=("#", ";"), interpolation=None, strict=True
        )
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except (configparser.Error, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None
        for section in parser.sections():
            if section not in sections:
                raise ConfigError(
                    f"{path}: unknown section [{section}] (known: {', '.join(sorted(sections))})"
                )
            known = sections[section]
            if known is None:
                continue
            for key in parser[section]:
                if key not in known:
                    raise ConfigError(
                        f"{path}: unknown key {key!r} in [{section}] "
                        f"(known: {', '.join(sorted(known))})"
                    )
        self.parser = parser

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        if self.parser.has_option(section, key):
            value = self.parser.get(section, key).strip()
            return value if value else default
        return default

    def require(self, section: str, key: str) -> str:
        value = self.get(section, key)
        if value is None:
            raise ConfigError(f"{self.path}: [{section}] {key} is required")
        return value

    def number(self, section: str, key: str, default: float, kind: type = float, minimum=0):
        raw = self.get(section, key)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{self.path}: [{section}] {key} = {raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{self.path}: [{section}] {key} = {raw!r} is not a finite number")
        if value < minimum:
            raise ConfigError(f"{self.path}: [{section}] {key} must be at least {minimum}")
        return value

    def flag(self, section: str, key: str, default: bool) -> bool:
        raw = (self.get(section, key, "") or "").lower()
        if not raw:
            return default
        if raw not in ("yes", "no", "true", "false", "on", "off"):
            raise ConfigError(f"{self.path}: [{section}] {key} = {raw!r} (expected yes or no)")
        return raw in ("yes", "true", "on")

    def address(self, section: str, key: str, raw: str) -> ProviderAddress:
        try:
            return parse_address(raw)
        except ValueError as e:
            raise ConfigError(f"{self.path}: [{section}] {key}: {e}") from None

    def registry(self) -> RegistryConfig:
        s = "registry"
        kind = self.get(s, "kind", "static")
        if kind not in REGISTRY_KINDS:
            raise ConfigError(
                f"{self.path}: [registry] kind = {kind!r} (expected one of: "
                f"{', '.join(REGISTRY_KINDS)})"
            )
        reg = RegistryConfig(kind=kind)
        reg.hosts = self.get(s, "hosts", reg.hosts) or reg.hosts
        reg.root = self.get(s, "root", reg.root) or reg.root
        if not reg.root.startswith("/"):
            raise ConfigError(f"{self.path}: [registry] root must start with '/'")
        reg.session_timeout = self.number(s, "session_timeout", reg.session_timeout, minimum=1)
        reg.weight = self.number(s, "weight", reg.weight, int, minimum=0)
        reg.auth = self.get(s, "auth", "") or ""
        if reg.auth and not reg.auth.startswith("digest:"):
            raise ConfigError(f"{self.path}: [registry] auth must look like digest:user:password")
        return reg


def load_provider_config(path: str) -> ProviderConfig:
    """Read and check a provider ini file (the services are not imported here)."""
    r = _Reader(
        path,
        {
            "provider": _PROVIDER_KEYS,
            "registry": _REGISTRY_KEYS,
            "tls": _PROVIDER_TLS_KEYS,
            "mprpc": _MPRPC_KEYS,
            "admin": {"listen", "max_connections"},
        },
    )
    if not r.parser.has_section("provider"):
        raise ConfigError(f"{path}: missing section [provider]")
    listen = r.require("provider", "listen")
    _check_endpoint(f"{path}: [provider] listen", listen)
    raw_advertise = r.get("provider", "advertise")
    advertise = r.address("provider", "advertise", raw_advertise) if raw_advertise else None
    services = r.require("provider", "services").split()
    check_service_specs(services, f"{path}: [provider] services")
    tls_options = None
    if r.parser.has_section("tls"):
        try:
            tls_options = server_options(
                r.require("tls", "certificate"),
                r.require("tls", "private_key"),
                r.get("tls", "client_ca", "") or "",
            )
        except ValueError as e:
            raise ConfigError(f"{path}: [tls] {e}") from None
    registry = r.registry()
    return ProviderConfig(
        tls_options=tls_options,
        path=path,
        listen=listen,
        advertise=advertise,
        services=services,
        grace_period=r.number("provider", "grace_period", 10.0),
        max_frame_size=r.number("provider", "max_frame_size", wire.DEFAULT_MAX_FRAME_SIZE, int, 64),
        limits=ServerLimits(
            max_calls_per_connection=r.number(
                "provider", "max_calls_per_connection", 1000, int, minimum=1
            ),
            max_calls=r.number("provider", "max_calls", 10000, int, minimum=1),
            max_connections=r.number("provider", "max_connections", 1000, int, minimum=1),
            idle_timeout=r.number("provider", "idle_timeout", 0.0),
            **_hardening_limits(r),
        ),
        registry=registry,
        mprpc=_mprpc_listener(r, registry),
        health=r.flag("provider", "health", True),
        reflection=r.flag("provider", "reflection", True),
        slow_call_threshold=r.number("provider", "slow_call_threshold", 0.0),
        admin=_admin(r),
        log_format=_log_format(r),
    )


def _hardening_limits(r: _Reader) -> dict[str, Any]:
    """The ``[provider]`` limits on what one peer may hold (docs/config.md)."""
    d = ServerLimits()
    p = "provider"
    return {
        "max_long_lived_calls_per_connection": r.number(
            p, "max_long_lived_calls_per_connection", d.max_long_lived_calls_per_connection, int, 1
        ),
        "max_long_lived_calls": r.number(p, "max_long_lived_calls", d.max_long_lived_calls, int, 1),
        "max_metadata_size": r.number(p, "max_metadata_size", d.max_metadata_size, int, 1),
        "max_metadata_entries": r.number(p, "max_metadata_entries", d.max_metadata_entries, int, 1),
        "frame_timeout": r.number(p, "frame_timeout", d.frame_timeout),
        "max_connections_per_peer": r.number(
            p, "max_connections_per_peer", d.max_connections_per_peer, int, 1
        ),
        "max_buffered_bytes": r.number(p, "max_buffered_bytes", d.max_buffered_bytes, int, 1),
    }


def _log_format(r: _Reader) -> str:
    value = r.get("provider", "log_format", "text") or "text"
    if value not in ("text", "json"):
        raise ConfigError(f"{r.path}: [provider] log_format = {value!r} (expected text or json)")
    return value


def _admin(r: _Reader) -> AdminConfig | None:
    if not r.parser.has_section("admin"):
        return None
    listen = r.require("admin", "listen")
    _check_endpoint(f"{r.path}: [admin] listen", listen)
    return AdminConfig(listen, r.number("admin", "max_connections", 64, int, minimum=1))


def _check_endpoint(where: str, listen: str) -> None:
    try:
        serverFromString(MemoryReactor(), listen)
    except Exception as e:
        raise ConfigError(f"{where} = {listen!r} is not a valid endpoint: {e}") from None


def _mprpc_listener(r: _Reader, registry: RegistryConfig) -> CppListenerConfig | None:
    s = "mprpc"
    if not r.parser.has_section(s):
        return None
    conf_path = r.get(s, "config")
    if conf_path:
        if not os.path.isabs(conf_path):
            conf_path = os.path.join(os.path.dirname(r.path), conf_path)
        listener = load_cpp_conf(conf_path).listener()
    else:
        listener = CppListenerConfig(r.require(s, "listen"))
    if r.get(s, "listen"):
        listener.listen = r.require(s, "listen")
    _check_endpoint(f"{r.path}: [mprpc] listen", listener.listen)
    raw_advertise = r.get(s, "advertise")
    if raw_advertise:
        listener.advertise = r.address(s, "advertise", raw_advertise)
    flag = (r.get(s, "zookeeper", "") or "").lower()
    if flag not in ("", "yes", "no", "true", "false"):
        raise ConfigError(f"{r.path}: [mprpc] zookeeper = {flag!r} (expected yes or no)")
    if flag in ("no", "false"):
        listener.zookeeper = None
    elif flag in ("yes", "true") and listener.zookeeper is None:
        listener.zookeeper = registry.hosts
    return listener


def load_cpp_conf(path: str) -> CppConf:
    """Read a C++ mprpc config file as the original (``MprpcConfig::LoadConfigFile``)
    and its users read it.

    - ``key=value`` lines, split at the first ``=``, key and value trimmed; lines
      starting with ``#``, blank lines and lines without ``=`` are skipped, and
      unknown keys ignored. (The original trims spaces only; tabs and ``\\r`` are
      trimmed here too.)
    - A key given twice keeps its FIRST value (the original inserts into a
      ``std::unordered_map``, which ignores a second insert), with a warning.
    - ``rpcserverport`` is read as ``atoi`` reads it: its leading digits
      (``8000 # rpc`` is 8000, with a warning); no digits, or a number that is
      not a port, is an error.
    - ZooKeeper is ``zookeeperip + ":" + zookeeperport``, passed whole to the
      client as the original passes it to ``zookeeper_init``, which takes
      everything from the first ``/`` as a chroot: ``zookeeperport=2181/chroot``
      connects to port 2181 with the chroot ``/chroot``, in C++ and here. A
      connect string ``zookeeper_init`` would refuse (a host without a numeric
      port, a malformed chroot) is an error here.
    """
    import re

    from twisted.logger import Logger

    log = Logger(namespace="twisted_rpc.config")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    values: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key in values:
            if value != values[key]:
                log.warn(
                    "{path}:{line}: {key} given again ({value!r}); the first value "
                    "({first!r}, line {first_line}) is kept, as the C++ reader keeps it",
                    path=path,
                    line=number,
                    key=key,
                    value=value,
                    first=values[key],
                    first_line=first_line[key],
                )
            continue
        values[key] = value
        first_line[key] = number

    def is_port(text: str) -> bool:
        return text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536

    def port(key: str) -> int | None:
        raw = values.get(key)
        if raw is None:
            return None
        digits = re.match(r"\+?([0-9]+)", raw)
        if digits is None or not is_port(digits.group(1)):
            raise ConfigError(f"{path}: {key}={raw!r} is not a port number")
        if digits.end() != len(raw):
            log.warn(
                "{path}: {key}={raw!r} read as {port}, as the C++ atoi reads it",
                path=path,
                key=key,
                raw=raw,
                port=int(digits.group(1)),
            )
        return int(digits.group(1))

    def zookeeper(connect: str) -> str:
        """``zookeeperip:zookeeperport`` checked as ``zookeeper_init`` checks it: the
        chroot starts at the first ``/`` (``/`` alone is none), then every
        comma-separated host needs ``:port``."""
        hosts, slash, chroot = connect.partition("/")
        where = f"{path}: zookeeperip:zookeeperport = {connect!r}"
        for host in hosts.split(","):
            name, colon, number = host.strip().rpartition(":")
            if not colon or not name or not is_port(number):
                raise ConfigError(f"{where}: {host.strip()!r} is not host:port")
        chroot = slash + chroot
        if chroot == "/":
            chroot = ""
        segments = chroot.split("/")[1:]
        if chroot and any(s in ("", ".", "..") for s in segments):
            raise ConfigError(f"{where}: {chroot!r} is not a ZooKeeper path for a chroot")
        return hosts + chroot

    zk_ip, zk_port = values.get("zookeeperip"), values.get("zookeeperport")
    if (zk_ip is None) != (zk_port is None):
        raise ConfigError(f"{path}: zookeeperip and zookeeperport go together")
    return CppConf(
        path=path,
        ip=values.get("rpcserverip") or None,
        port=port("rpcserverport"),
        zookeeper=zookeeper(f"{zk_ip}:{zk_port}") if zk_ip else None,
    )


def load_consumer_config(path: str) -> ConsumerConfig:
    """Read and check a consumer ini file."""
    r = _Reader(
        path,
        {
            "consumer": _CONSUMER_KEYS,
            "registry": _REGISTRY_KEYS,
            "providers": None,
            "tls": _CONSUMER_TLS_KEYS,
        },
    )
    providers: dict[str, list[ProviderAddress]] = {}
    if r.parser.has_section("providers"):
        for service, raw in r.parser["providers"].items():
            providers[service] = [
                r.address("providers", service, a) for a in raw.replace(",", " ").split()
            ]
    timeout = r.number("consumer", "timeout", 0.0)
    if timeout_error(timeout) is not None:
        raise ConfigError(f"{path}: [consumer] timeout: {timeout_error(timeout)}")
    balancer = r.get("consumer", "balancer", "round_robin") or "round_robin"
    try:
        balancer_named(balancer)
    except ValueError as e:
        raise ConfigError(f"{path}: [consumer] balancer: {e}") from None
    return ConsumerConfig(
        path=path,
        timeout=timeout or None,
        connect_timeout=r.number("consumer", "connect_timeout", 5.0, minimum=0.001),
        max_frame_size=r.number("consumer", "max_frame_size", wire.DEFAULT_MAX_FRAME_SIZE, int, 64),
        balancer=balancer,
        keepalive_interval=r.number("consumer", "keepalive_interval", 0.0),
        keepalive_timeout=r.number("consumer", "keepalive_timeout", 10.0, minimum=0.001),
        max_write_buffer=r.number("consumer", "max_write_buffer", DEFAULT_MAX_WRITE_BUFFER, int, 0),
        max_concurrent_dials=r.number(
            "consumer", "max_concurrent_dials", DEFAULT_MAX_CONCURRENT_DIALS, int, 1
        ),
        max_dials_per_second=r.number(
            "consumer", "max_dials_per_second", DEFAULT_MAX_DIALS_PER_SECOND, float, 0.001
        ),
        tls=ClientTLS(
            r.get("tls", "ca", "") or "",
            r.get("tls", "certificate", "") or "",
            r.get("tls", "private_key", "") or "",
        )
        if r.parser.has_section("tls")
        else None,
        providers=providers,
        registry=r.registry(),
    )


def check_service_specs(specs: list[str], where: str) -> None:
    """Each spec must look like ``module:Class`` (nothing is imported here)."""
    for spec in specs:
        module, sep, name = spec.partition(":")
        if not sep or not module or not name:
            raise ConfigError(f"{where}: {spec!r} is not module:Class")


def load_services(specs: list[str], where: str = "services") -> list[Service]:
    """Import ``module:Class`` specs and instantiate each Service class.

    The working directory is on the import path, as for ``python -m``.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    instances = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise ConfigError(
                f"{where}: cannot import {module_name}: {type(e).__name__}: {e}"
            ) from None
        cls = module
        for part in attr.split("."):
            cls = getattr(cls, part, None)
            if cls is None:
                raise ConfigError(f"{where}: {module_name} has no {attr}")
        if not (isinstance(cls, type) and issubclass(cls, Service) and cls.descriptor is not None):
            raise ConfigError(
                f"{where}: {spec} is not a twisted_rpc.Service subclass with a descriptor"
            )
        try:
            instances.append(cls())
        except Exception as e:
            raise ConfigError(f"{where}: {spec}() failed: {type(e).__name__}: {e}") from None
    return instances
