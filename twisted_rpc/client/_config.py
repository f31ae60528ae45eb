"""The consumer ini file (``[consumer]``, ``[providers]``, ``[registry]``,
``[tls]``), read and checked up front (see ``docs/config.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from twisted_rpc.client._options import ClientOptions
from twisted_rpc.client._service_config import MAX_TEXT, ServiceConfig, ServiceConfigError
from twisted_rpc.core._ini import REGISTRY_KEYS, ConfigError, Reader, RegistryConfig
from twisted_rpc.core._tls import ClientTLS
from twisted_rpc.discovery._types import ProviderAddress, parse_address

__all__ = ["ConsumerConfig", "load_consumer_config"]


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
    "max_write_buffer",
    "max_concurrent_dials",
    "max_dials_per_second",
    "stream_window",
    "protocol",
    "service_config",
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
            service_config=service_config,
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
