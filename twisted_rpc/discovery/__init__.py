"""Where providers are found: registries and the types they share.

The shared types (``_types``: provider addresses, registrations, the strict
``host:port`` parser), the static registry (``_static``), kazoo behind
Deferreds (``_kazoo``, the one module that imports kazoo), the one module that
knows the ZooKeeper layouts, native and C++ (``_layout``), and the ZooKeeper
registry (``_zkregistry``, with its provider side ``_zkannounce`` and its
consumer side ``_zkfollow``).

Layering: ``discovery`` imports :mod:`twisted_rpc.core` only.
"""

from twisted_rpc.discovery._static import StaticRegistry
from twisted_rpc.discovery._types import ProviderAddress, Registration, parse_address
from twisted_rpc.discovery._zkregistry import UnsafeParentError, ZooKeeperRegistry

__all__ = [
    "ProviderAddress",
    "Registration",
    "StaticRegistry",
    "UnsafeParentError",
    "ZooKeeperRegistry",
    "parse_address",
]
