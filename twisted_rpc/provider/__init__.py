"""The provider: everything put together as a Twisted service.

The provider ini loader (``_config``), the ``twistd mprpc`` options and
``makeService`` (``_tap``, which the plugin ``twisted/plugins/mprpc_plugin.py``
names), and :class:`ProviderService` (``_service``): the dispatcher with the
built-in services, the native listener, the C++ listener when configured, the
gRPC listener when configured, the admin site, the registrations and the
graceful stop.

Layering: ``provider`` may import every other subpackage; nothing imports it
but the plugin and the top-level facade.
"""

from twisted_rpc.provider._config import (
    AdminConfig,
    GrpcConfig,
    ProviderConfig,
    load_provider_config,
    load_services,
)
from twisted_rpc.provider._options import ProviderOptions
from twisted_rpc.provider._service import ProviderService
from twisted_rpc.provider._tap import Options, makeService

__all__ = [
    "AdminConfig",
    "GrpcConfig",
    "Options",
    "ProviderConfig",
    "ProviderOptions",
    "ProviderService",
    "load_provider_config",
    "load_services",
    "makeService",
]
