"""Every provider setting and its default in one place: :class:`ProviderOptions`.

Built by the ini loader (``ProviderConfig.options()``) and by code alike
(``ProviderService(reactor, services, ProviderOptions(listen=...))`` or the
same settings as keywords). Endpoint strings are checked here against the
endpoint types Twisted knows (its built-ins and the installed
``IStreamServerEndpointStringParser`` plugins), without building an endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from twisted.internet.endpoints import _parseServer

from twisted_rpc.client._service_config import ServiceConfig
from twisted_rpc.core import _codec as wire
from twisted_rpc.discovery._layout import PUBLISHED_KEY
from twisted_rpc.discovery._types import ProviderAddress
from twisted_rpc.provider._systemd import check_systemd_arguments
from twisted_rpc.server._factory import ServerLimits

if TYPE_CHECKING:  # (pyOpenSSL is imported only when TLS is used)
    from twisted.internet.ssl import CertificateOptions

__all__ = [
    "DEFAULT_ADMIN_MAX_CONNECTIONS",
    "MAX_PUBLISHED_CONFIG",
    "ProviderOptions",
    "check_published_config",
    "check_server_endpoint",
]

MAX_PUBLISHED_CONFIG = 8 * 1024
"""Bytes of JSON at most in the ``methodConfig`` a provider publishes (its
node's data must stay under consumers' ``max_node_data``, 16 KiB)."""

DEFAULT_ADMIN_MAX_CONNECTIONS = 64
"""The same default as ``twisted_rpc.ops``' admin site (not imported from it:
the admin site is imported only when configured)."""


def check_server_endpoint(description: str) -> None:
    """Raise ValueError unless ``description`` is a server endpoint string
    Twisted can build (``tcp:0:interface=127.0.0.1``, ``unix:/run/p.sock``,
    ``ssl:...``, ``tcp6:...``, ``systemd:...`` or an installed plugin's).

    The built-in types' arguments are checked too (a port must be a number,
    no unknown keyword), and ``systemd``'s (``domain=`` and one of ``index=``
    or ``name=``; whether the descriptor was inherited is checked at start);
    another plugin's arguments are left to the plugin.
    """
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"an endpoint must be a non-empty string, not {description!r}")
    try:
        kind, args, kwargs = _parseServer(description, None)
        if getattr(kind, "prefix", None) == "systemd":
            check_systemd_arguments(list(args), kwargs)
    except Exception as e:
        raise ValueError(f"{description!r} is not a valid endpoint: {e}") from None


def check_published_config(value: object) -> dict[str, Any]:
    """The service config a provider publishes in its registry nodes
    (``registration_data["serviceConfig"]``, ``[provider] service_config``):
    a gRPC-shaped JSON object (or its text) checked by the consumer's own
    parser, at most MAX_PUBLISHED_CONFIG bytes of ``methodConfig``; only
    ``methodConfig`` is kept (consumers never take ``retryThrottling``).
    ValueError (a ServiceConfigError) if it is not that."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"service_config: not JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"service_config: expected a JSON object, got {type(value).__name__}")
    ServiceConfig.parse(value)
    published = {"methodConfig": list(value.get("methodConfig", []))}
    size = len(json.dumps(published, sort_keys=True))
    if size > MAX_PUBLISHED_CONFIG:
        raise ValueError(
            f"service_config: {size} bytes of methodConfig to publish (at most"
            f" {MAX_PUBLISHED_CONFIG})"
        )
    return published


def _seconds(name: str, value: float) -> None:
    if type(value) not in (int, float) or not 0 <= value < float("inf"):
        raise ValueError(f"ProviderOptions.{name} must be seconds >= 0, not {value!r}")


@dataclass(frozen=True)
class ProviderOptions:
    """What a provider serves on and how (``[provider]``, ``[cpp]``, ``[grpc]``,
    ``[admin]`` of ``docs/config.md``); the collaborators (services, registries,
    interceptors) are given to :class:`ProviderService` beside it."""

    listen: str | None = None
    """Endpoint of the native listener (``tcp:7000:interface=0.0.0.0``); None: none."""
    advertise: ProviderAddress | None = None
    """Address registered for the native listener (default: the bound one)."""
    grace_period: float = 10.0
    """Seconds calls in flight get to finish when the provider stops."""
    max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE
    limits: ServerLimits = field(default_factory=ServerLimits)
    tls_options: CertificateOptions | None = None
    """``twisted_rpc.server_options(...)``: the native listener speaks TLS."""
    registration_data: Mapping[str, Any] = field(default_factory=dict)
    """Extra data in each registration (weight, pid, version...);
    ``"serviceConfig"``: a gRPC-shaped service config whose ``methodConfig``
    entries each node publishes for its service (checked; docs/resilience.md)."""
    cpp_listen: str | None = None
    """Endpoint of the listener for C++ mprpc callers; None: none."""
    cpp_advertise: ProviderAddress | None = None
    health: bool = True
    reflection: bool = True
    admin_listen: str | None = None
    """Endpoint of the admin HTTP site (metrics, status); None: no admin site."""
    admin_max_connections: int = DEFAULT_ADMIN_MAX_CONNECTIONS
    slow_call_threshold: float = 0.0
    """Log calls slower than this many seconds (0: none)."""
    grpc_listen: tuple[str, ...] = ()
    """Endpoints of the gRPC listener (HTTP/2; TLS with ALPN ``h2`` when
    ``tls_options`` is set); a string is taken as one endpoint. Empty: none."""
    grpc_advertise: ProviderAddress | None = None
    """Address registered for the gRPC listener (default: the first bound one)."""
    tracing: bool = False
    """OpenTelemetry spans for every call and stream served, children of the
    callers' (needs ``twisted_rpc[otel]``; docs/tracing.md)."""

    def __post_init__(self) -> None:
        grpc_listen = self.grpc_listen
        if isinstance(grpc_listen, str):
            grpc_listen = (grpc_listen,)
        if not isinstance(grpc_listen, (tuple, list)):
            raise ValueError(
                f"ProviderOptions.grpc_listen must be endpoint strings, not {grpc_listen!r}"
            )
        object.__setattr__(self, "grpc_listen", tuple(grpc_listen))
        if self.listen is None and self.cpp_listen is None and not self.grpc_listen:
            raise ValueError("a provider needs listen, cpp_listen or both, or grpc_listen")
        endpoints = [("listen", self.listen), ("cpp_listen", self.cpp_listen)]
        endpoints += [("admin_listen", self.admin_listen)]
        endpoints += [("grpc_listen", each) for each in self.grpc_listen]
        for name, value in endpoints:
            if value is not None:
                try:
                    check_server_endpoint(value)
                except ValueError as e:
                    raise ValueError(f"ProviderOptions.{name} = {e}") from None
        for name in ("advertise", "cpp_advertise", "grpc_advertise"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, ProviderAddress):
                raise ValueError(f"ProviderOptions.{name} must be a ProviderAddress, not {value!r}")
        _seconds("grace_period", self.grace_period)
        _seconds("slow_call_threshold", self.slow_call_threshold)
        if type(self.max_frame_size) is not int or self.max_frame_size < 64:
            raise ValueError(
                f"ProviderOptions.max_frame_size must be an int >= 64, not {self.max_frame_size!r}"
            )
        if type(self.admin_max_connections) is not int or self.admin_max_connections < 1:
            raise ValueError(
                "ProviderOptions.admin_max_connections must be a positive int, "
                f"not {self.admin_max_connections!r}"
            )
        if not isinstance(self.limits, ServerLimits):
            raise ValueError(f"ProviderOptions.limits must be a ServerLimits, not {self.limits!r}")
        if not isinstance(self.registration_data, Mapping):
            data = self.registration_data
            raise ValueError(f"ProviderOptions.registration_data must be a mapping, not {data!r}")
        if PUBLISHED_KEY in self.registration_data:
            try:
                published = check_published_config(self.registration_data[PUBLISHED_KEY])
            except ValueError as e:
                raise ValueError(
                    f"ProviderOptions.registration_data[{PUBLISHED_KEY!r}]: {e}"
                ) from None
            data = {**self.registration_data, PUBLISHED_KEY: published}
            object.__setattr__(self, "registration_data", data)
        for name in ("health", "reflection", "tracing"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"ProviderOptions.{name} must be a bool")

    def dispatcher_interceptors(self, given: Sequence[Any]) -> list[Any]:
        """The dispatcher's interceptors: ``given``, after the tracing one
        (outermost: its span covers theirs) when ``tracing`` is on."""
        if not self.tracing:
            return list(given)
        from twisted_rpc.core._tracing import ServerTracing

        return [ServerTracing(), *given]

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The settings, as keywords of ``ProviderService``."""
        return frozenset(f.name for f in fields(cls))
