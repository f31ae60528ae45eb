"""The provider ini file (``[provider]``, ``[registry]``, ``[tls]``, ``[cpp]``,
``[grpc]``, ``[admin]``), read and checked up front (see ``docs/config.md``), and the
``module:Class`` service specs it names.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from twisted_rpc.client._config import tracing_setting
from twisted_rpc.client._service_config import MAX_TEXT
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._flow import check_window
from twisted_rpc.core._ini import REGISTRY_KEYS, ConfigError, Reader, RegistryConfig
from twisted_rpc.core._service import Service, check_handlers
from twisted_rpc.core._tls import server_options
from twisted_rpc.cpp._conf import CPP_KEYS, CPP_SECTIONS, CppListenerConfig, read_cpp_section
from twisted_rpc.discovery._layout import PUBLISHED_KEY
from twisted_rpc.discovery._types import ProviderAddress, parse_address
from twisted_rpc.provider._options import (
    DEFAULT_ADMIN_MAX_CONNECTIONS,
    ProviderOptions,
    check_published_config,
    check_server_endpoint,
)
from twisted_rpc.provider._systemd import check_distinct_descriptors, inherited_descriptor
from twisted_rpc.server._factory import ServerLimits

log = Logger(namespace="twisted_rpc.provider")

if TYPE_CHECKING:  # (pyOpenSSL is imported only when TLS is used)
    from twisted.internet.ssl import CertificateOptions

__all__ = [
    "AdminConfig",
    "GrpcConfig",
    "ProviderConfig",
    "check_service_specs",
    "load_provider_config",
    "load_services",
    "parse_workers",
]

MAX_WORKERS = 256


@dataclass
class AdminConfig:
    """The admin HTTP endpoint (``[admin]``): metrics, status page, JSON."""

    listen: str
    max_connections: int = DEFAULT_ADMIN_MAX_CONNECTIONS
    """Admin connections open at once; more are closed at once (logged)."""


@dataclass
class GrpcConfig:
    """The gRPC listener (``[grpc]``): HTTP/2, the same services and limits."""

    listen: tuple[str, ...]
    """One or more server endpoint strings (whitespace-separated in the file)."""
    advertise: ProviderAddress | None = None
    """The address registered for it (default: the first bound one)."""


@dataclass
class ProviderConfig:
    """What a provider ini file says (see :func:`load_provider_config`)."""

    path: str
    listen: str | None
    advertise: ProviderAddress | None
    services: list[str]
    grace_period: float = 10.0
    max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE
    limits: ServerLimits = field(default_factory=ServerLimits)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tls_options: CertificateOptions | None = None
    cpp: CppListenerConfig | None = None
    """The listener for C++ mprpc callers (``[cpp]``), if any."""
    health: bool = True
    reflection: bool = True
    slow_call_threshold: float = 0.0
    admin: AdminConfig | None = None
    log_format: str = "text"
    grpc: GrpcConfig | None = None
    """The gRPC listener (``[grpc]``), if any."""
    service_config: dict[str, Any] | None = None
    """The ``methodConfig`` its registry nodes publish (``[provider] service_config``)."""
    tracing: bool = False
    """``[provider] tracing = opentelemetry``: spans for the calls served."""

    strict_handlers: bool = True
    """A public method that looks like a misspelt handler is a startup error
    (``[provider] strict_handlers``; no: a warning)."""
    workers: int = 1
    """Worker processes (``[provider] workers``; 1: one process, no supervisor)."""
    worker_sockets: str = "reuseport"
    """How workers listen: ``reuseport`` (each its own socket, SO_REUSEPORT:
    the kernel spreads connections) or ``shared`` (the supervisor's socket,
    inherited: the first worker awake takes a connection)."""

    def options(self, **settings: Any) -> ProviderOptions:
        """The :class:`ProviderOptions` this file says (``settings`` override)."""
        cpp = self.cpp
        built: dict[str, Any] = {
            "listen": self.listen,
            "advertise": self.advertise,
            "grace_period": self.grace_period,
            "max_frame_size": self.max_frame_size,
            "limits": self.limits,
            "tls_options": self.tls_options,
            "registration_data": {"weight": self.registry.weight},
            "cpp_listen": cpp.listen if cpp else None,
            "cpp_advertise": cpp.advertise if cpp else None,
            "health": self.health,
            "reflection": self.reflection,
            "admin_listen": self.admin.listen if self.admin else None,
            "admin_max_connections": (
                self.admin.max_connections if self.admin else DEFAULT_ADMIN_MAX_CONNECTIONS
            ),
            "slow_call_threshold": self.slow_call_threshold,
            "grpc_listen": self.grpc.listen if self.grpc else (),
            "grpc_advertise": self.grpc.advertise if self.grpc else None,
            "tracing": self.tracing,
        }
        built.update(settings)
        data = built["registration_data"]
        if self.service_config and PUBLISHED_KEY not in data:  # (also under twistd's data)
            built["registration_data"] = {**data, PUBLISHED_KEY: self.service_config}
        try:
            return ProviderOptions(**built)
        except ValueError as e:
            raise ConfigError(f"{self.path}: {e}") from None


def check_endpoint(where: str, listen: str) -> None:
    """Raise ConfigError unless ``listen`` is a server endpoint Twisted knows
    (and, for ``systemd:``, names a listening socket this process inherited)."""
    try:
        check_server_endpoint(listen)
        inherited_descriptor(listen)
    except ValueError as e:
        raise ConfigError(f"{where} = {e}") from None


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
    "max_streams_per_connection",
    "max_streams",
    "stream_window",
    "stream_idle_timeout",
    "max_message_size",
    "adaptive_limit",
    "adaptive_min_limit",
    "adaptive_max_limit",
    "compression",
    "compression_threshold",
    "health",
    "reflection",
    "slow_call_threshold",
    "log_format",
    "service_config",
    "tracing",
    "strict_handlers",
    "workers",
    "worker_sockets",
}


_PROVIDER_TLS_KEYS = {"certificate", "private_key", "client_ca"}


def load_provider_config(path: str) -> ProviderConfig:
    """Read and check a provider ini file (the services are not imported here)."""
    r = Reader(
        path,
        {
            "provider": _PROVIDER_KEYS,
            "registry": REGISTRY_KEYS,
            "tls": _PROVIDER_TLS_KEYS,
            **dict.fromkeys(CPP_SECTIONS, CPP_KEYS),
            "admin": {"listen", "max_connections"},
            "grpc": {"listen", "advertise"},
        },
    )
    if not r.parser.has_section("provider"):
        raise ConfigError(f"{path}: missing section [provider]")
    grpc = _grpc(r)
    listen = r.require("provider", "listen") if grpc is None else r.get("provider", "listen")
    if listen is not None:
        check_endpoint(f"{path}: [provider] listen", listen)
    raw_advertise = r.get("provider", "advertise")
    advertise = None
    if raw_advertise:
        advertise = r.parsed("provider", "advertise", raw_advertise, parse_address)
    services = r.require("provider", "services").replace(",", " ").split()
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
    cpp = read_cpp_section(r, registry)
    if cpp is not None:
        check_endpoint(f"{path}: [cpp] listen", cpp.listen)
    admin = _admin(r)
    _check_adopted(path, listen, cpp, admin, grpc)
    return ProviderConfig(
        tls_options=tls_options,
        path=path,
        listen=listen,
        advertise=advertise,
        services=services,
        grace_period=r.number("provider", "grace_period", _default("grace_period")),
        max_frame_size=r.number("provider", "max_frame_size", _default("max_frame_size"), int, 64),
        limits=_limits(r),
        registry=registry,
        cpp=cpp,
        health=r.flag("provider", "health", True),
        reflection=r.flag("provider", "reflection", True),
        slow_call_threshold=r.number(
            "provider", "slow_call_threshold", _default("slow_call_threshold")
        ),
        admin=admin,
        log_format=_log_format(r),
        grpc=grpc,
        service_config=_published_config(r),
        tracing=tracing_setting(r.get("provider", "tracing"), f"{path}: [provider] tracing"),
        strict_handlers=r.flag("provider", "strict_handlers", True),
        workers=parse_workers(r.get("provider", "workers", "1") or "1", f"{path}: [provider]"),
        worker_sockets=_worker_sockets(r),
    )


def _published_config(r: Reader) -> dict[str, Any] | None:
    """The JSON file ``[provider] service_config`` names (relative to the ini
    file), checked as a consumer's is, for the registry nodes to publish."""
    name = r.get("provider", "service_config")
    if not name:
        return None
    where = f"{r.path}: [provider] service_config = {name}"
    path = os.path.join(os.path.dirname(os.path.abspath(r.path)), os.path.expanduser(name))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_TEXT + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read it: {e}") from None
    if len(text) > MAX_TEXT:
        raise ConfigError(f"{where}: longer than {MAX_TEXT} characters")
    try:
        return check_published_config(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_adopted(
    path: str,
    listen: str | None,
    cpp: CppListenerConfig | None,
    admin: AdminConfig | None,
    grpc: GrpcConfig | None,
) -> None:
    """ConfigError if two listeners name the same inherited (systemd) descriptor."""
    listeners = {"[provider] listen": listen, "[cpp] listen": cpp.listen if cpp else None}
    listeners["[admin] listen"] = admin.listen if admin else None
    listeners.update({f"[grpc] listen {each}": each for each in (grpc.listen if grpc else ())})
    try:
        check_distinct_descriptors(listeners)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def _worker_sockets(r: Reader) -> str:
    value = r.get("provider", "worker_sockets", "reuseport") or "reuseport"
    if value not in ("shared", "reuseport"):
        raise ConfigError(
            f"{r.path}: [provider] worker_sockets = {value!r} (expected shared or reuseport)"
        )
    return value


def parse_workers(value: str, where: str) -> int:
    """``workers``: a positive int, or ``auto`` (one per core), else ConfigError."""
    value = value.strip()
    if value == "auto":
        return os.cpu_count() or 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_WORKERS:
        raise ConfigError(f"{where} workers = {value!r} (expected 1..{MAX_WORKERS} or auto)")
    return n


def _default(name: str) -> Any:
    """The default of a :class:`ProviderOptions` setting: defaults live there."""
    return next(f.default for f in fields(ProviderOptions) if f.name == name)


def _limits(r: Reader) -> ServerLimits:
    """The ``[provider]`` limits (docs/config.md), defaults from ServerLimits."""
    try:
        return _read_limits(r)
    except ValueError as e:  # a relation between keys (each alone was checked)
        raise ConfigError(f"{r.path}: [provider] {e}") from None


def _read_limits(r: Reader) -> ServerLimits:
    d = ServerLimits()
    p = "provider"
    return ServerLimits(
        max_calls_per_connection=r.number(
            p, "max_calls_per_connection", d.max_calls_per_connection, int, 1
        ),
        max_calls=r.number(p, "max_calls", d.max_calls, int, 1),
        max_connections=r.number(p, "max_connections", d.max_connections, int, 1),
        idle_timeout=r.number(p, "idle_timeout", d.idle_timeout),
        max_long_lived_calls_per_connection=r.number(
            p, "max_long_lived_calls_per_connection", d.max_long_lived_calls_per_connection, int, 1
        ),
        max_long_lived_calls=r.number(p, "max_long_lived_calls", d.max_long_lived_calls, int, 1),
        max_metadata_size=r.number(p, "max_metadata_size", d.max_metadata_size, int, 1),
        max_metadata_entries=r.number(p, "max_metadata_entries", d.max_metadata_entries, int, 1),
        frame_timeout=r.number(p, "frame_timeout", d.frame_timeout),
        max_connections_per_peer=r.number(
            p, "max_connections_per_peer", d.max_connections_per_peer, int, 1
        ),
        max_buffered_bytes=r.number(p, "max_buffered_bytes", d.max_buffered_bytes, int, 1),
        max_streams_per_connection=r.number(
            p, "max_streams_per_connection", d.max_streams_per_connection, int, 1
        ),
        max_streams=r.number(p, "max_streams", d.max_streams, int, 1),
        stream_window=_window(r, p, "stream_window", d.stream_window),
        stream_idle_timeout=r.number(p, "stream_idle_timeout", d.stream_idle_timeout),
        max_message_size=r.number(p, "max_message_size", d.max_message_size, int, 1),
        adaptive_limit=r.flag(p, "adaptive_limit", d.adaptive_limit),
        adaptive_min_limit=r.number(p, "adaptive_min_limit", d.adaptive_min_limit, int, 1),
        adaptive_max_limit=r.number(p, "adaptive_max_limit", d.adaptive_max_limit, int, 1),
        compression_threshold=r.number(p, "compression_threshold", d.compression_threshold, int, 0),
        compression=r.get(p, "compression", "") or None,
    )


def _window(r: Reader, section: str, key: str, default: int) -> int:
    """A stream window in bytes (``check_window``'s bounds), or ConfigError."""
    value = r.number(section, key, default, int, minimum=float("-inf"))
    try:
        return check_window(value, f"{r.path}: [{section}] {key}")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _log_format(r: Reader) -> str:
    value = r.get("provider", "log_format", "text") or "text"
    if value not in ("text", "json"):
        raise ConfigError(f"{r.path}: [provider] log_format = {value!r} (expected text or json)")
    return value


def _grpc(r: Reader) -> GrpcConfig | None:
    if not r.parser.has_section("grpc"):
        return None
    listen = tuple(r.require("grpc", "listen").split())
    for each in listen:
        check_endpoint(f"{r.path}: [grpc] listen", each)
    raw = r.get("grpc", "advertise")
    advertise = r.parsed("grpc", "advertise", raw, parse_address) if raw else None
    return GrpcConfig(listen, advertise)


def _admin(r: Reader) -> AdminConfig | None:
    if not r.parser.has_section("admin"):
        return None
    listen = r.require("admin", "listen")
    check_endpoint(f"{r.path}: [admin] listen", listen)
    return AdminConfig(
        listen,
        r.number("admin", "max_connections", DEFAULT_ADMIN_MAX_CONNECTIONS, int, minimum=1),
    )


def check_service_specs(specs: list[str], where: str) -> None:
    """Each spec must look like ``module:Class``, once (nothing is imported here)."""
    seen: set[str] = set()
    for spec in specs:
        module, sep, name = spec.partition(":")
        dotted = [*module.split("."), *name.split(".")]
        if not sep or not all(part.isidentifier() for part in dotted):
            raise ConfigError(f"{where}: {spec!r} is not module:Class")
        if spec in seen:
            raise ConfigError(f"{where}: {spec} is listed twice")
        seen.add(spec)


def load_services(
    specs: list[str], where: str = "services", strict_handlers: bool = True
) -> list[Service]:
    """Import ``module:Class`` specs and instantiate each Service class.

    The working directory is on the import path, as for ``python -m``.
    Each RPC with no handler is logged (a warning); a public method that
    looks like a misspelt handler of one (``stock`` for ``Stock``) is a
    ConfigError, or with ``strict_handlers`` false a warning too
    (:func:`twisted_rpc.core._service.check_handlers`).
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    check_service_specs(specs, where)
    instances: list[Service] = []
    served: dict[str, str] = {}
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise ConfigError(
                f"{where}: cannot import {module_name}: {type(e).__name__}: {e}"
            ) from None
        cls: object = module
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
        name = cls.service_info().name
        if name in served:
            raise ConfigError(f"{where}: {served[name]} and {spec} both serve {name}")
        served[name] = spec
        warnings, errors = check_handlers(instances[-1])
        if errors and strict_handlers:
            raise ConfigError(f"{where}: {errors[0]} ([provider] strict_handlers = no: a warning)")
        for text in warnings + errors:
            log.warn("{text}", text=text)
    return instances
