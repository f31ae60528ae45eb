"""The types every registry shares: :class:`ProviderAddress` (where a provider
is dialled, with its weight and published data), :class:`Registration` (one
service served at one address) and the strict ``host:port`` parser.

A provider announces registrations through an
:class:`twisted_rpc.core.IServiceRegistry`; a consumer follows provider
lists through an :class:`twisted_rpc.core.IServiceDiscovery`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.abstract import isIPv6Address

__all__ = [
    "PROTOCOLS",
    "ProviderAddress",
    "Registration",
    "check_address",
    "dial_address",
    "parse_address",
]

PROTOCOLS = ("native", "grpc")
"""The wires a consumer dials: the native one, and gRPC (HTTP/2)."""


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


def dial_address(address: ProviderAddress, preferred: str = "native") -> ProviderAddress:
    """Where and how to dial ``address``: a copy whose ``data["protocol"]``
    names the wire (one of :data:`PROTOCOLS`) and whose port is that wire's.

    A node saying ``"protocol"`` is dialled so at its port; a node listing
    ``"protocols"`` (``{"native": port, "grpc": port}``, same host) is
    dialled with ``preferred`` if it lists it, else natively at its port;
    an address saying nothing (a static one) with ``preferred``.
    """
    data = address.data
    said = data.get("protocol")
    if said in PROTOCOLS:
        return address
    port = address.port
    protocol = preferred
    ports = data.get("protocols")
    if isinstance(ports, Mapping):
        chosen = ports.get(preferred)
        if type(chosen) is int and 0 < chosen < 65536:
            port = chosen
        else:
            protocol = "native"
    return ProviderAddress(address.host, port, address.weight, {**data, "protocol": protocol})


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def check_address(address: ProviderAddress) -> None:
    """Raise ValueError unless ``address`` can be dialled: a host name or IPv4
    literal (letters, digits, ``-``, ``.``, ``_``; at most 253 characters) or
    an IPv6 literal, and a port from 1 to 65535."""
    host, port = address.host, address.port
    if not isinstance(host, str) or not host:
        raise ValueError(f"empty or non-text host {host!r}")
    if ":" in host:
        if not isIPv6Address(host) or any(c.isspace() or not c.isprintable() for c in host):
            raise ValueError(f"not an IPv6 address: {host!r}")
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"not a host name or address: {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be 1 to 65535, not {port!r}")


def parse_address(text: str) -> ProviderAddress:
    """``"host:port"`` (or ``"[v6]:port"``) as a :class:`ProviderAddress`.

    Strict: surrounding white space aside, the host must pass
    :func:`check_address` (an IPv6 literal only in brackets) and the port be
    decimal digits from 1 to 65535.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected host:port, got {text!r}")
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"brackets hold an IPv6 address, got {text!r}")
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets ([::1]:8000), got {text!r}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise ValueError(f"bad port in {text!r}")
    address = ProviderAddress(host, int(port))
    try:
        check_address(address)
    except ValueError as e:
        raise ValueError(f"bad address {text!r}: {e}") from None
    return address


@dataclass(frozen=True, slots=True)
class Registration:
    """One service served at one address, with the data a registry publishes."""

    service: str
    address: ProviderAddress
    data: Mapping[str, Any] = field(default_factory=dict)
