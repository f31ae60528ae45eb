"""The ZooKeeper layouts: the one module that knows their paths and node data.

The native layout (``docs/registry.md``), one ephemeral node per provider of a
service, its data JSON (``host``, ``port``, ``weight`` and what the provider
publishes: ``workers``, how many worker processes serve the address, when
more than one does)::

    <root>/<package.Service>/providers/<host:port>

The C++ mprpc layout (``docs/mprpc-compat.md``), one ephemeral node per
method, its data the provider's address as text::

    /<Service>/<Method>                               b"ip:port"

The registry writes and reads both through these builders and codecs, and so
do the C++ client's directory and the ``mprpc`` command.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from twisted_rpc.discovery._types import PROTOCOLS, ProviderAddress, Registration, parse_address

__all__ = [
    "DEFAULT_ROOT",
    "PUBLISHED_KEY",
    "BadNode",
    "cpp_path",
    "decode_cpp",
    "decode_provider",
    "encode_cpp",
    "encode_provider",
    "provider_info",
    "provider_path",
    "providers_path",
]

DEFAULT_ROOT = "/mprpc"
"""The native layout's root unless configured otherwise (``[registry] root``)."""
MAX_WEIGHT = 1_000_000
PUBLISHED_KEY = "serviceConfig"
"""A provider node's key for the service config its provider publishes (a
gRPC-shaped ``{"methodConfig": [...]}`` holding only that node's service)."""
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")


# ---------------------------------------------------------------- native layout


def providers_path(root: str, service: str) -> str:
    """The node whose children are ``service``'s providers."""
    return f"{root}/{service}/providers"


def provider_path(root: str, service: str, name: str) -> str:
    """One provider's node: ``name`` is its ``host:port`` (``ProviderAddress.key``)."""
    return f"{providers_path(root, service)}/{name}"


def encode_provider(registration: Registration) -> bytes:
    """A provider node's data: its address, weight and published data, as JSON."""
    address = registration.address
    data = {
        "host": address.host,
        "port": address.port,
        "weight": address.weight,
        **registration.data,
    }
    if PUBLISHED_KEY in data:
        published = _published_for(data.pop(PUBLISHED_KEY), registration.service)
        if published is not None:
            data[PUBLISHED_KEY] = published
    return json.dumps(data, sort_keys=True).encode()


def _published_for(config: Any, service: str) -> dict[str, Any] | None:
    """The ``methodConfig`` entries of a (checked) service config that name
    ``service``, each with only those names; None if there are none."""
    entries = []
    for entry in config.get("methodConfig", ()) if isinstance(config, dict) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), list):
            continue
        names = [n for n in entry["name"] if isinstance(n, dict) and n.get("service") == service]
        if names:
            entries.append({**entry, "name": names})
    return {"methodConfig": entries} if entries else None


class BadNode(ValueError):
    """A provider node that cannot be used; its message says why."""


def decode_provider(name: str, data: bytes) -> ProviderAddress:
    """The provider a node named ``name`` with ``data`` names, or :class:`BadNode`.

    Our JSON gives the host and port; a node whose data is not that (another
    registry's, or none) is read from its name, ``host:port``.
    """
    try:
        info = json.loads(data)
    except (ValueError, RecursionError):
        info = None
    if not isinstance(info, dict):
        info = {}
    if "host" in info or "port" in info:
        return _checked(info.get("host"), info.get("port"), info.get("weight", 100), info)
    try:
        address = parse_address(name)
    except ValueError:
        raise BadNode("no host and port in its data, and its name is not host:port") from None
    return _checked(address.host, address.port, info.get("weight", 100), info)


def provider_info(name: str, data: bytes) -> dict[str, Any]:
    """A provider node's data as a dict for display, as lenient as can be: what
    is not a JSON object reads as ``{}``; ``address`` is the node's name unless
    the data gives one."""
    try:
        info = json.loads(data)
    except (ValueError, RecursionError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    info.setdefault("address", name)
    return info


def clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _checked(host: object, port: object, weight: object, info: dict[str, Any]) -> ProviderAddress:
    """A ProviderAddress from a node's values, or BadNode saying what is wrong."""
    if not isinstance(host, str) or not _valid_host(host):
        raise BadNode(f"bad host {clip(repr(host))}")
    if type(port) is not int or not 0 < port < 65536:
        raise BadNode(f"bad port {clip(repr(port))}")
    if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
        raise BadNode(f"bad weight {clip(repr(weight))} (an integer 0..{MAX_WEIGHT})")
    _check_protocols(info)
    return ProviderAddress(host, port, weight, info)


def _check_protocols(info: dict[str, Any]) -> None:
    """BadNode unless the node's ``protocol`` (the wire its port speaks) and
    ``protocols`` (wire -> port on the same host) are ones a consumer can
    dial. Wires not known here in ``protocols`` are ignored."""
    protocol = info.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise BadNode(f"unknown protocol {clip(repr(protocol))} (known: {', '.join(PROTOCOLS)})")
    ports = info.get("protocols")
    if ports is None:
        return
    if not isinstance(ports, dict):
        raise BadNode(f"protocols must map a wire to a port, not {clip(repr(ports))}")
    for name in PROTOCOLS:
        port = ports.get(name)
        if port is not None and (type(port) is not int or not 0 < port < 65536):
            raise BadNode(f"bad {name} port {clip(repr(port))} in protocols")


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address (v6 without brackets), nothing else."""
    if _HOSTNAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- C++ mprpc layout


def cpp_path(service: str, method: str) -> str:
    """The node of a method for C++ callers; ``service`` is the short name
    (no package), as C++ mprpc names it."""
    return f"/{service}/{method}"


def encode_cpp(address: ProviderAddress) -> bytes:
    """A C++-layout node's data: ``b"ip:port"``."""
    return address.key.encode()


def decode_cpp(data: bytes) -> ProviderAddress:
    """The address a C++-layout node holds (ValueError if it is not ``ip:port``)."""
    return parse_address(data.decode())
