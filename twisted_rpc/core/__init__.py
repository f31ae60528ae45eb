"""The connection core: what both sides of a call share.

The native wire codec (``_codec``, free of Twisted), the connection that frames
bytes, owns the one write path and answers pings (``_connection``), the direct
socket write (``_direct_write``, the only module that reads Twisted's private
``tcp.Connection`` attributes), deadlines, status codes and their errors,
services and their method descriptions, the interfaces between the layers,
TLS settings and the ini reader the configuration loaders share.

Layering: ``core`` imports nothing of ``twisted_rpc`` above it. ``server``,
``client`` and ``discovery`` build on it; ``ops`` and ``cpp`` on those;
``provider`` puts everything together.
"""

from twisted_rpc.core._ini import ConfigError
from twisted_rpc.core._interfaces import (
    ICallObserver,
    IClientInterceptor,
    IClientStreamInterceptor,
    IDrainable,
    IServerInterceptor,
    IServerStreamInterceptor,
    IServiceDiscovery,
    IServiceRegistry,
)
from twisted_rpc.core._service import MethodInfo, Service, ServiceInfo, describe
from twisted_rpc.core._status import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RpcError,
    StatusCode,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    UnknownRemoteError,
    code_name,
)
from twisted_rpc.core._tls import ClientTLS, server_options, wrap_server_factory

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "ClientTLS",
    "ConfigError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "ICallObserver",
    "IClientInterceptor",
    "IClientStreamInterceptor",
    "IDrainable",
    "IServerInterceptor",
    "IServerStreamInterceptor",
    "IServiceDiscovery",
    "IServiceRegistry",
    "InternalError",
    "InvalidArgumentError",
    "MethodInfo",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RpcError",
    "Service",
    "ServiceInfo",
    "StatusCode",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "UnknownRemoteError",
    "code_name",
    "describe",
    "server_options",
    "wrap_server_factory",
]
