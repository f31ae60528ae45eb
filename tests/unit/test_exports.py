"""The public API: what ``twisted_rpc`` and each subpackage export, and the layering.

Adding or removing a public name is a decision: this file pins them (klein's
test_exports is the model). The layering test keeps each subpackage to the
layers below it (docs/architecture.md).
"""

from __future__ import annotations

import ast
import configparser
import importlib
from pathlib import Path

import pytest

import twisted_rpc

PACKAGE = Path(twisted_rpc.__file__).parent
ROOT = PACKAGE.parent

ERRORS = {
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RpcError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "UnknownRemoteError",
}
INTERFACES = {
    "ICallObserver",
    "IClientInterceptor",
    "IClientStreamInterceptor",
    "IDrainable",
    "IServerInterceptor",
    "IServerStreamInterceptor",
    "IServiceDiscovery",
    "IServiceRegistry",
}

EXPORTS = {
    "twisted_rpc": ERRORS
    | INTERFACES
    | {
        "AsyncioBidiStream",
        "AsyncioClientStream",
        "AsyncioServerStream",
        "AsyncioServiceProxy",
        "Balancer",
        "BidiStream",
        "CallContext",
        "Channel",
        "Client",
        "ClientCall",
        "ClientOptions",
        "ClientStream",
        "ClientTLS",
        "ConfigError",
        "Dispatcher",
        "FunctionInterceptor",
        "LeastOutstanding",
        "MethodInfo",
        "NotSentError",
        "ProviderAddress",
        "ProviderOptions",
        "ProviderService",
        "Registration",
        "RequestStream",
        "RoundRobin",
        "ServerStream",
        "Service",
        "ServiceConfig",
        "ServiceConfigError",
        "ServiceProxy",
        "ServerLimits",
        "StaticRegistry",
        "StatusCode",
        "WeightedRandom",
        "ZooKeeperRegistry",
        "__version__",
        "balancer_named",
        "code_name",
        "load_consumer_config",
        "load_provider_config",
        "parse_address",
        "server_options",
        "wrap_server_factory",
    },
    "twisted_rpc.core": ERRORS
    | INTERFACES
    | {
        "ClientTLS",
        "ConfigError",
        "MethodInfo",
        "Service",
        "ServiceInfo",
        "StatusCode",
        "code_name",
        "describe",
        "server_options",
        "wrap_server_factory",
    },
    "twisted_rpc.server": {
        "CallContext",
        "Dispatcher",
        "FunctionInterceptor",
        "ServerConnection",
        "ServerFactory",
        "ServerLimits",
        "ServerMethod",
        "RequestStream",
    },
    "twisted_rpc.client": {
        "AsyncioBidiStream",
        "AsyncioClientStream",
        "AsyncioServerStream",
        "AsyncioServiceProxy",
        "Balancer",
        "BidiStream",
        "Channel",
        "ChannelEvent",
        "ChannelState",
        "Client",
        "ClientCall",
        "ClientConnection",
        "ClientOptions",
        "ClientStream",
        "ConnectionState",
        "ConsumerConfig",
        "InvalidTransition",
        "LeastOutstanding",
        "MAX_TIMEOUT",
        "NotSentError",
        "RoundRobin",
        "ServerStream",
        "ServiceProxy",
        "StreamCall",
        "HedgingPolicy",
        "MethodConfig",
        "MethodName",
        "RetryPolicy",
        "RetryThrottling",
        "ServiceConfig",
        "ServiceConfigError",
        "WeightedRandom",
        "backoff_policy",
        "balancer_named",
        "load_consumer_config",
    },
    "twisted_rpc.discovery": {
        "ProviderAddress",
        "Registration",
        "StaticRegistry",
        "UnsafeParentError",
        "ZooKeeperRegistry",
        "parse_address",
    },
    "twisted_rpc.ops": {
        "ClientMetrics",
        "HealthService",
        "HealthState",
        "NOT_SERVING",
        "ProviderMetrics",
        "ReflectionService",
        "RemoteDescriptors",
        "SERVICE_UNKNOWN",
        "SERVING",
        "add_builtins",
        "admin_site",
        "json_lines_observer",
        "json_observer",
        "message_class",
        "remote_service",
    },
    "twisted_rpc.cpp": {
        "CppClient",
        "CppConf",
        "CppDirectory",
        "CppListenerConfig",
        "CppProtocolError",
        "CppProxy",
        "CppRequest",
        "CppServerFactory",
        "RequestReader",
        "StaticCppDirectory",
        "ZooKeeperCppDirectory",
        "encode_request",
        "load_cpp_conf",
    },
    "twisted_rpc.grpc": {
        "GrpcClientConnection",
        "GrpcServerConnection",
        "GrpcServerFactory",
        "GrpcWireError",
    },
    "twisted_rpc.protoc": {"generate", "main", "plugin_main"},
    "twisted_rpc.provider": {
        "AdminConfig",
        "GrpcConfig",
        "Options",
        "ProviderConfig",
        "ProviderOptions",
        "ProviderService",
        "load_provider_config",
        "load_services",
        "makeService",
    },
}

# What each part of the package may import of twisted_rpc (besides itself and _version).
MAY_IMPORT = {
    "core": set(),
    "server": {"core"},
    "discovery": {"core"},
    "client": {"core", "discovery"},
    "ops": {"core", "server", "client", "discovery"},
    "cpp": {"core", "server", "discovery"},
    "grpc": {"core", "server", "client", "discovery"},
    "provider": {"core", "server", "client", "discovery", "ops", "cpp", "grpc"},
    "testing": {"core", "server", "client", "ops"},
    "protoc": set(),  # it writes text; the code it writes imports the facade
    "pytest_plugin": {"testing"},
}


@pytest.mark.parametrize("module", sorted(EXPORTS))
def test_all_is_pinned(module):
    assert set(importlib.import_module(module).__all__) == EXPORTS[module]


@pytest.mark.parametrize("module", sorted(EXPORTS))
def test_every_exported_name_imports(module):
    imported = importlib.import_module(module)
    for name in imported.__all__:
        assert getattr(imported, name, None) is not None, f"{module}.{name}"


def test_the_facade_exports_every_rpc_error():
    errors = {
        name
        for name, value in vars(twisted_rpc.core).items()
        if isinstance(value, type) and issubclass(value, twisted_rpc.RpcError)
    }
    assert errors <= set(twisted_rpc.__all__)
    assert errors == ERRORS


def test_what_a_user_imports_first():
    from twisted_rpc import (  # noqa: F401
        Client,
        PermissionDeniedError,
        ProviderService,
        RpcError,
        Service,
        StaticRegistry,
        StatusCode,
        ZooKeeperRegistry,
    )


def _part(path: Path) -> str:
    """``core``, ``server``...: the subpackage of a module (``testing``, ``_version``...
    for a top-level one)."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "twisted_rpc":
                names = [f"twisted_rpc.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("twisted_rpc."):
                parts.add(name.split(".")[1])
    return parts


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        if part not in MAY_IMPORT:
            continue  # the facade (__init__) and the tap shim may import anything
        allowed = MAY_IMPORT[part] | {part, "_version"}
        for imported in sorted(_imported_parts(path) - allowed):
            wrong.append(f"{path.relative_to(ROOT)} imports twisted_rpc.{imported}")
    assert not wrong


def test_no_module_is_over_500_lines_and_the_top_level_shows_the_subpackages():
    long = [
        f"{path.relative_to(ROOT)}: {n}"
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 530
    ]
    assert not long
    top = {p.name for p in PACKAGE.iterdir() if not p.name.startswith((".", "__pycache__"))}
    assert top == {
        "__init__.py",
        "_version.py",
        "client",
        "core",
        "cpp",
        "discovery",
        "grpc",
        "ops",
        "protoc",
        "provider",
        "py.typed",
        "pytest_plugin.py",
        "server",
        "tap.py",
        "testing.py",
    }


def test_setup_cfg_ships_every_subpackage_py_typed_and_the_command():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    packages = set(setup["options"]["packages"].split())
    subpackages = {
        "twisted_rpc." + p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()
    }
    assert subpackages | {"twisted_rpc", "twisted.plugins"} == packages
    assert "py.typed" in setup["options.package_data"]["twisted_rpc"].split()
    scripts = {}
    for script in setup["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = (part.strip() for part in script.partition("="))
        module, _, function = target.partition(":")
        scripts[name] = getattr(importlib.import_module(module), function)
    assert set(scripts) == {"mprpc", "protoc-gen-twisted_rpc"}
    assert all(callable(function) for function in scripts.values())
    assert "grpcio-tools" in setup["options.extras_require"]["protoc"]


def _private_uses(path: Path) -> list[tuple[int, str, str]]:
    """(line, private module, name) for each name a file takes from a private
    module of twisted_rpc: ``from twisted_rpc.x._m import name`` and ``m.name``
    after ``from twisted_rpc.x import _m``."""
    tree = ast.parse(path.read_text(), str(path))
    uses, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted_rpc"):
            for alias in node.names:
                if "._" in node.module:
                    uses.append((node.lineno, node.module, alias.name))
                elif alias.name.startswith("_"):
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            uses.append((node.lineno, aliases[node.value.id], node.attr))
    return uses


def test_tests_take_public_names_from_the_facades():
    wrong = []
    for path in sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "testbed").glob("*.py")):
        for line, module, name in _private_uses(path):
            facades = (module.rsplit("._", 1)[0], "twisted_rpc")
            public = [f for f in facades if name in EXPORTS.get(f, ())]
            if public:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name} from {public[0]}")
    assert not wrong
