"""Service registry: the embedded static kind, and the types every kind shares.

A provider announces :class:`Registration` s through an
:class:`~twisted_rpc.interfaces.IServiceRegistry`; a consumer follows provider
lists through an :class:`~twisted_rpc.interfaces.IServiceDiscovery`. The
static kind keeps both in memory from configuration, so the framework runs
on a bare machine; the ZooKeeper kind implements the same interfaces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from twisted_rpc.interfaces import IServiceDiscovery, IServiceRegistry

__all__ = ["ProviderAddress", "Registration", "StaticRegistry", "parse_address"]


@dataclass(frozen=True, slots=True)
class ProviderAddress:
    """Where one provider of a service can be dialled."""

    host: str
    port: int
    weight: int = 100
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.key


def parse_address(text: str) -> ProviderAddress:
    """``"host:port"`` (or ``"[v6]:port"``) as a :class:`ProviderAddress`."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return ProviderAddress(host, number)


@dataclass(frozen=True, slots=True)
class Registration:
    """One service served at one address, with the data a registry publishes."""

    service: str
    address: ProviderAddress
    data: Mapping[str, Any] = field(default_factory=dict)


@implementer(IServiceDiscovery, IServiceRegistry)
class StaticRegistry:
    """Provider lists given up front; registrations only recorded.

    ``providers`` maps a service's full name to ``"host:port"`` strings (or
    :class:`ProviderAddress` es). Services not listed fall back to
    ``default`` (every service a single provider serves, say).
    """

    def __init__(
        self,
        providers: Mapping[str, Iterable[str | ProviderAddress]] | None = None,
        default: Iterable[str | ProviderAddress] = (),
    ) -> None:
        self._providers = {
            name: tuple(_address(a) for a in addresses)
            for name, addresses in (providers or {}).items()
        }
        self._default = tuple(_address(a) for a in default)
        self.registrations: list[Registration] = []

    def providers(self, service: str) -> tuple[ProviderAddress, ...]:
        return self._providers.get(service, self._default)

    def subscribe(
        self, service: str, listener: Callable[[tuple[ProviderAddress, ...]], object]
    ) -> Callable[[], None]:
        listener(self.providers(service))
        return lambda: None

    def register(self, registration: Registration) -> Deferred:
        self.registrations.append(registration)
        return succeed(None)

    def unregister_all(self) -> Deferred:
        self.registrations.clear()
        return succeed(None)

    def close(self) -> Deferred:
        return succeed(None)


def _address(a: str | ProviderAddress) -> ProviderAddress:
    return a if isinstance(a, ProviderAddress) else parse_address(a)
