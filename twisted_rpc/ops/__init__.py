"""Operating providers: the built-in services, metrics, the admin site, logs, the command.

Health (``_health``) and Reflection (``_reflection``, with the client helpers
that call it), their message types (``_protos``), gRPC's standard health and
reflection services beside them (``_grpc_health``, ``_grpc_reflection``, their
descriptors in ``_grpc_protos``), Prometheus metrics (``_metrics``; the
consumer's in ``_client_metrics``), the admin HTTP site with its status page
(``_admin``), JSON log lines (``_logs``) and the ``mprpc`` command (``_cli``).

Layering: ``ops`` imports :mod:`twisted_rpc.core`, :mod:`twisted_rpc.server`
(the built-in services are served like any other), :mod:`twisted_rpc.client`
and :mod:`twisted_rpc.discovery` (reflection and the ``mprpc`` command call
providers and read the registry).
"""

from typing import Any

from twisted_rpc.ops._client_metrics import ClientMetrics
from twisted_rpc.ops._health import (
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    HealthService,
    HealthState,
    add_builtins,
)
from twisted_rpc.ops._logs import json_lines_observer, json_observer
from twisted_rpc.ops._metrics import ProviderMetrics
from twisted_rpc.ops._reflection import (
    ReflectionService,
    RemoteDescriptors,
    message_class,
    remote_service,
)

__all__ = [
    "NOT_SERVING",
    "SERVICE_UNKNOWN",
    "SERVING",
    "ClientMetrics",
    "HealthService",
    "HealthState",
    "ProviderMetrics",
    "ReflectionService",
    "RemoteDescriptors",
    "add_builtins",
    "admin_site",
    "json_lines_observer",
    "json_observer",
    "message_class",
    "remote_service",
]


def __getattr__(name: str) -> Any:
    # The admin site (twisted.web) is imported on first use only: a provider
    # without [admin] never loads it.
    if name == "admin_site":
        from twisted_rpc.ops._admin import admin_site

        return admin_site
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
