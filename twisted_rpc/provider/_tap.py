"""``twistd mprpc``: options and the service tree of a provider."""

from __future__ import annotations

import os
import time
from typing import Any, cast

from twisted.application.service import IService
from twisted.python import usage

from twisted_rpc._version import __version__
from twisted_rpc.core._ini import ConfigError
from twisted_rpc.core._interfaces import IServiceRegistry
from twisted_rpc.cpp._conf import load_cpp_conf
from twisted_rpc.discovery._kazoo import IZooKeeperReactor
from twisted_rpc.discovery._static import StaticRegistry
from twisted_rpc.discovery._zkregistry import ZooKeeperRegistry
from twisted_rpc.ops._logs import json_observer
from twisted_rpc.provider._config import (
    ProviderConfig,
    check_service_specs,
    load_provider_config,
    load_services,
    parse_workers,
)
from twisted_rpc.provider._service import ProviderReactor, ProviderService


class Options(usage.Options):
    """Command-line options of ``twistd mprpc``."""

    synopsis = "--config etc/provider.ini | --cpp-config test.conf --service module:Class"
    longdesc = (
        "Serve protobuf RPC services (twisted_rpc) as configured in an ini file, "
        "or, for a C++ mprpc deployment, as its key=value config file says "
        "(docs/mprpc-compat.md)."
    )
    optParameters = [
        ["config", "c", None, "Provider config file (ini); see docs/config.md."],
        [
            "cpp-config",
            None,
            None,
            "A C++ mprpc config file (rpcserverip, rpcserverport, zookeeperip, "
            "zookeeperport): serve the C++ mprpc protocol there and register in its ZooKeeper.",
        ],
        ["mprpc-config", None, None, "The old name of --cpp-config."],
        [
            "workers",
            None,
            None,
            "Worker processes serving the same sockets (N or auto; overrides [provider] workers).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (Twisted's is not annotated)
        self["service"] = []

    def opt_service(self, spec: str) -> None:
        """A module:Class service to serve (repeatable; adds to [provider] services)."""
        self["service"].append(spec)

    def postOptions(self) -> None:
        if self["mprpc-config"]:
            if self["cpp-config"]:
                raise usage.UsageError("--cpp-config and --mprpc-config are one option: give one")
            self["cpp-config"] = self["mprpc-config"]
        if not self["config"] and not self["cpp-config"]:
            raise usage.UsageError("--config or --cpp-config is required")
        try:
            config = self._load()
            if self["workers"] is not None:
                config.workers = parse_workers(self["workers"], "--workers")
            if config.workers > 1:
                from twisted_rpc.provider._supervisor import check_worker_endpoints

                check_worker_endpoints(config)
            services = load_services(
                config.services, f"{config.path}: services", config.strict_handlers
            )
        except ConfigError as e:
            # One clear line and a non-zero exit, not a usage text or a traceback.
            raise SystemExit(f"twistd mprpc: config error: {e}") from None
        self["provider_config"] = config
        self["service_instances"] = services

    def _load(self) -> ProviderConfig:
        if self["config"]:
            config = load_provider_config(self["config"])
        else:
            config = ProviderConfig(
                path=self["cpp-config"], listen=None, advertise=None, services=[]
            )
        config.services = config.services + self["service"]
        check_service_specs(self["service"], "--service")
        if self["cpp-config"]:
            config.cpp = load_cpp_conf(self["cpp-config"]).listener()
        if not config.services:
            raise ConfigError(f"{config.path}: no services to serve (give --service module:Class)")
        return config


def makeService(
    options: Options | dict[str, Any], reactor: ProviderReactor | None = None
) -> IService:
    """The provider's service tree, from parsed options."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: ProviderConfig = options["provider_config"]
    if config.workers > 1:
        from twisted_rpc.provider._supervisor import supervisor_service

        return supervisor_service(options, config, reactor, _registries(config, reactor))
    registry, cpp_registry = _registries(config, reactor)
    provider_options = config.options(registration_data=registration_data(config))
    provider = ProviderService(
        reactor,
        options["service_instances"],
        provider_options,
        registry=registry,
        cpp_registry=cpp_registry,
    )
    return with_registries(provider, config, registry, cpp_registry)


def registration_data(config: ProviderConfig) -> dict[str, Any]:
    """What each registration says besides the address (weight, pid, ...)."""
    return {
        "weight": config.registry.weight,
        "pid": os.getpid(),
        "version": __version__,
        "started_at": time.time(),
    }


def with_registries(
    provider: ProviderService,
    config: ProviderConfig,
    registry: IServiceRegistry,
    cpp_registry: ZooKeeperRegistry | None,
) -> ProviderService:
    """``provider`` with its log observer and its ZooKeeper registries as children."""
    if config.log_format == "json":
        provider.log_observer = json_observer()
    for each in {id(r): r for r in (registry, cpp_registry)}.values():
        if isinstance(each, ZooKeeperRegistry):
            each.setServiceParent(provider)  # type: ignore[no-untyped-call]  # (not annotated)
    return provider


def _registries(
    config: ProviderConfig, reactor: ProviderReactor
) -> tuple[IServiceRegistry, ZooKeeperRegistry | None]:
    """The registry ``[registry]`` names and the C++ layout's, if any."""
    # Every real reactor provides IReactorFromThreads too (what ZooKeeper needs
    # besides the clock); ProviderReactor leaves it out since only the
    # ZooKeeper registries use it.
    zk_reactor = cast(IZooKeeperReactor, reactor)
    reg = config.registry
    if reg.kind == "zookeeper":
        registry: IServiceRegistry = ZooKeeperRegistry(
            zk_reactor, reg.hosts, root=reg.root, session_timeout=reg.session_timeout, auth=reg.auth
        )
    else:
        registry = StaticRegistry()
    cpp = config.cpp
    cpp_registry = None
    if cpp is not None and cpp.zookeeper is not None:
        if isinstance(registry, ZooKeeperRegistry) and reg.hosts == cpp.zookeeper:
            cpp_registry = registry
        else:
            cpp_registry = ZooKeeperRegistry(
                zk_reactor, cpp.zookeeper, session_timeout=reg.session_timeout
            )
    return registry, cpp_registry
