"""The consumer ini file (``[consumer]``, ``[providers]``, ``[registry]``,
``[tls]``), read and checked up front (see ``docs/config.md``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.wrappers_pb2 import Int32Value, StringValue
from twisted.internet.defer import Deferred

from twisted_rpc.client._options import ClientOptions
from twisted_rpc.client._service_config import MAX_TEXT, ServiceConfig, ServiceConfigError
from twisted_rpc.core._ini import REGISTRY_KEYS, ConfigError, Reader, RegistryConfig
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._tls import ClientTLS
from twisted_rpc.discovery._static import StaticRegistry
from twisted_rpc.discovery._types import ProviderAddress, parse_address

if TYPE_CHECKING:
    from twisted_rpc.client._dials import ClientReactor
    from twisted_rpc.discovery._kazoo import IZooKeeperReactor

__all__ = [
    "ConsumerConfig",
    "config_discovery",
    "load_consumer_config",
    "snapshot_health_check",
]


@dataclass
class ConsumerConfig:
    """What a consumer ini file says (see :func:`load_consumer_config`): the
    client's settings as ``options`` (also readable as attributes,
    ``config.timeout``), the providers it lists and its registry."""

    path: str
    options: ClientOptions = field(default_factory=ClientOptions)
    providers: dict[str, list[ProviderAddress]] = field(default_factory=dict)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def __getattr__(self, name: str) -> Any:
        if name in _OPTION_NAMES:
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


_OPTION_NAMES = frozenset(f.name for f in fields(ClientOptions))
_DEFAULTS = ClientOptions()


_CONSUMER_KEYS = {
    "timeout",
    "connect_timeout",
    "max_frame_size",
    "balancer",
    "keepalive_interval",
    "keepalive_timeout",
    "keepalive_without_calls",
    "max_write_buffer",
    "max_concurrent_dials",
    "max_dials_per_second",
    "stream_window",
    "protocol",
    "compression",
    "compression_threshold",
    "snapshot",
    "service_config",
    "consecutive_failures",
    "base_ejection_time",
    "max_ejection_time",
    "max_ejection_percent",
    "latency_decay",
    "connections_per_provider",
    "max_queued_calls",
    "success_rate_min_calls",
    "success_rate_min_providers",
    "success_rate_ratio",
    "success_rate_window",
    "tracing",
    "awaitables",
}


_CONSUMER_TLS_KEYS = {"ca", "certificate", "private_key"}


def load_consumer_config(path: str) -> ConsumerConfig:
    """Read and check a consumer ini file."""
    r = Reader(
        path,
        {
            "consumer": _CONSUMER_KEYS,
            "registry": REGISTRY_KEYS,
            "providers": None,
            "tls": _CONSUMER_TLS_KEYS,
        },
    )
    providers: dict[str, list[ProviderAddress]] = {}
    if r.parser.has_section("providers"):
        for service, raw in r.parser["providers"].items():
            providers[service] = [
                r.parsed("providers", service, a, parse_address)
                for a in raw.replace(",", " ").split()
            ]
    service_config = _service_config(path, r.get("consumer", "service_config"))
    d = _DEFAULTS  # every default in one place: ClientOptions, which checks the values too
    try:
        options = ClientOptions(
            timeout=r.number("consumer", "timeout", 0.0) or None,
            balancer=r.get("consumer", "balancer", "round_robin") or "round_robin",
            connect_timeout=r.number("consumer", "connect_timeout", d.connect_timeout),
            max_frame_size=r.number("consumer", "max_frame_size", d.max_frame_size, int),
            keepalive_interval=r.number("consumer", "keepalive_interval", d.keepalive_interval),
            keepalive_timeout=r.number("consumer", "keepalive_timeout", d.keepalive_timeout),
            keepalive_without_calls=r.flag(
                "consumer", "keepalive_without_calls", d.keepalive_without_calls
            ),
            max_write_buffer=r.number("consumer", "max_write_buffer", d.max_write_buffer, int),
            max_concurrent_dials=r.number(
                "consumer", "max_concurrent_dials", d.max_concurrent_dials, int
            ),
            max_dials_per_second=r.number(
                "consumer", "max_dials_per_second", d.max_dials_per_second, float
            ),
            stream_window=r.number(
                "consumer", "stream_window", d.stream_window, int, minimum=float("-inf")
            ),
            protocol=r.get("consumer", "protocol", d.protocol) or d.protocol,
            snapshot=_relative(path, r.get("consumer", "snapshot", "") or ""),
            service_config=service_config,
            compression=r.get("consumer", "compression", "") or None,
            compression_threshold=r.number(
                "consumer", "compression_threshold", d.compression_threshold, int
            ),
            consecutive_failures=r.number(
                "consumer", "consecutive_failures", d.consecutive_failures, int
            ),
            base_ejection_time=r.number("consumer", "base_ejection_time", d.base_ejection_time),
            max_ejection_time=r.number("consumer", "max_ejection_time", d.max_ejection_time),
            max_ejection_percent=r.number(
                "consumer", "max_ejection_percent", d.max_ejection_percent, int
            ),
            latency_decay=r.number("consumer", "latency_decay", d.latency_decay),
            connections_per_provider=_connections(r.get("consumer", "connections_per_provider")),
            max_queued_calls=r.number("consumer", "max_queued_calls", d.max_queued_calls, int),
            success_rate_min_calls=r.number(
                "consumer", "success_rate_min_calls", d.success_rate_min_calls, int
            ),
            success_rate_min_providers=r.number(
                "consumer", "success_rate_min_providers", d.success_rate_min_providers, int
            ),
            success_rate_ratio=r.number("consumer", "success_rate_ratio", d.success_rate_ratio),
            success_rate_window=r.number("consumer", "success_rate_window", d.success_rate_window),
            tracing=tracing_setting(r.get("consumer", "tracing"), f"{path}: [consumer] tracing"),
            awaitables=r.get("consumer", "awaitables", d.awaitables) or d.awaitables,
            tls=ClientTLS(
                r.get("tls", "ca", "") or "",
                r.get("tls", "certificate", "") or "",
                r.get("tls", "private_key", "") or "",
            )
            if r.parser.has_section("tls")
            else None,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: [consumer] {e}") from None
    return ConsumerConfig(path=path, options=options, providers=providers, registry=r.registry())


TRACERS = ("opentelemetry",)
"""What ``tracing =`` may name (``none``, ``no`` or nothing: no tracing)."""


def tracing_setting(raw: str | None, where: str) -> bool:
    """``tracing = opentelemetry`` (True) or ``none`` (False); ConfigError for
    anything else, or when OpenTelemetry is not installed."""
    value = (raw or "none").strip().lower()
    if value in ("none", "no", "off"):
        return False
    if value not in TRACERS:
        raise ConfigError(f"{where} = {raw!r} (expected opentelemetry or none)")
    try:
        import twisted_rpc.core._tracing  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{where} = {raw}: {e}") from None
    return True


def _connections(raw: str | None) -> int | str:
    """``connections_per_provider`` as written: ``auto`` (or empty), else a count."""
    raw = (raw or "auto").strip()
    if raw == "auto":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"connections_per_provider must be 'auto' or a number, not {raw!r}"
        ) from None


def config_discovery(
    config: ConsumerConfig, options: ClientOptions, reactor: ClientReactor
) -> dict[str, Any]:
    """``Client``'s keywords for the registry ``config`` names: a
    ZooKeeperRegistry (``discovery``, kazoo imported only then), else the
    file's ``providers``."""
    if config.registry.kind == "zookeeper":
        from twisted_rpc.discovery._zkregistry import ZooKeeperRegistry

        reg = config.registry
        # Every real reactor provides IReactorFromThreads too (what
        # ZooKeeper needs besides the clock); ClientReactor leaves it out
        # since only this registry uses it.
        registry = ZooKeeperRegistry(
            cast("IZooKeeperReactor", reactor),
            reg.hosts,
            root=reg.root,
            session_timeout=reg.session_timeout,
            auth=reg.auth,
            snapshot=options.snapshot,
            health_check=snapshot_health_check(reactor, options) if options.snapshot else None,
        )
        return {"discovery": registry}
    return {
        "providers": {name: [str(a) for a in addrs] for name, addrs in config.providers.items()}
    }


def _relative(ini: str, path: str) -> str:
    """``path`` as given if absolute (or empty), else relative to the ini file."""
    if not path or os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(ini)), path)


# Health/Check's messages have the wire form of these wrappers: HealthCheckRequest
# is ``string service = 1``, HealthCheckResponse ``ServingStatus status = 1`` (an
# enum: a varint); the client layer does not import ops, where the Health
# descriptors live.
_HEALTH = "mprpc.health.v1.Health"
_CHECK = MethodInfo(_HEALTH, "Check", f"{_HEALTH}/Check".encode(), StringValue, Int32Value)
_SERVING = 1


def snapshot_health_check(
    reactor: ClientReactor, options: ClientOptions
) -> Callable[[str, ProviderAddress, float], Deferred[bool]]:
    """The check a ZooKeeper registry's snapshot runs on each provider it
    lists: ``mprpc.health.v1.Health/Check(service)`` on a connection of its
    own (dialled with ``options``), True if it answers SERVING."""
    from twisted_rpc.client._client import Client

    own = options.replace(snapshot="", max_concurrent_dials=1)

    async def check(service: str, address: ProviderAddress, timeout: float) -> bool:
        client = Client(reactor, own, discovery=StaticRegistry({_HEALTH: [address]}))
        try:
            reply = await client.call(_CHECK, StringValue(value=service), timeout=timeout)
        finally:
            await client.close()
        return isinstance(reply, Int32Value) and reply.value == _SERVING

    def start(service: str, address: ProviderAddress, timeout: float) -> Deferred[bool]:
        return Deferred.fromCoroutine(check(service, address, timeout))

    return start


def _service_config(path: str, name: str | None) -> ServiceConfig | None:
    """The JSON file ``[consumer] service_config`` names (relative to the
    ini file), read and checked."""
    if name is None:
        return None
    where = f"{path}: [consumer] service_config = {name}"
    json_path = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(name))
    try:
        with open(json_path, encoding="utf-8") as f:
            text = f.read(MAX_TEXT + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read it: {e}") from None
    try:
        return ServiceConfig.parse(text)
    except ServiceConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
