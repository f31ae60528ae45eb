"""``twistd mprpc``: options and the service tree of a provider."""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from twisted_rpc import __version__
from twisted_rpc.config import ConfigError, ProviderConfig, load_provider_config, load_services
from twisted_rpc.interfaces import IServiceRegistry
from twisted_rpc.provider import ProviderService
from twisted_rpc.registry import StaticRegistry
from twisted_rpc.zkregistry import ZooKeeperRegistry


class Options(usage.Options):
    """Command-line options of ``twistd mprpc``."""

    synopsis = "--config etc/provider.ini"
    longdesc = "Serve protobuf RPC services (twisted_rpc) as configured in an ini file."
    optParameters = [["config", "c", None, "Provider config file (ini); see docs/config.md."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            config = load_provider_config(self["config"])
            services = load_services(config.services, f"{config.path}: [provider] services")
        except ConfigError as e:
            # One clear line and a non-zero exit, not a usage text or a traceback.
            raise SystemExit(f"twistd mprpc: config error: {e}") from None
        self["provider_config"] = config
        self["service_instances"] = services


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> IService:
    """The provider's service tree, from parsed options."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: ProviderConfig = options["provider_config"]
    reg = config.registry
    if reg.kind == "zookeeper":
        registry: IServiceRegistry = ZooKeeperRegistry(
            reactor, reg.hosts, root=reg.root, session_timeout=reg.session_timeout, auth=reg.auth
        )
    else:
        registry = StaticRegistry()
    provider = ProviderService(
        reactor,
        config.listen,
        options["service_instances"],
        advertise=config.advertise,
        registry=registry,
        grace_period=config.grace_period,
        max_frame_size=config.max_frame_size,
        limits=config.limits,
        tls_options=config.tls_options,
        registration_data={
            "weight": config.registry.weight,
            "pid": os.getpid(),
            "version": __version__,
            "started_at": time.time(),
        },
    )
    if isinstance(registry, ZooKeeperRegistry):
        registry.setServiceParent(provider)
    return provider
