"""The static registry: provider lists given up front, registrations only recorded.

It keeps both sides in memory from configuration, so the framework runs on
a bare machine; the ZooKeeper registry implements the same interfaces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from twisted_rpc.core._interfaces import IServiceDiscovery, IServiceRegistry
from twisted_rpc.discovery._types import ProviderAddress, Registration, parse_address

__all__ = ["StaticRegistry"]


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

    def register(self, registration: Registration) -> Deferred[None]:
        self.registrations.append(registration)
        return succeed(None)

    def unregister_all(self) -> Deferred[None]:
        self.registrations.clear()
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)


def _address(a: str | ProviderAddress) -> ProviderAddress:
    return a if isinstance(a, ProviderAddress) else parse_address(a)
