"""twisted_rpc: protobuf RPC for Twisted.

Providers serve :class:`Service` subclasses built from protobuf service
descriptors; consumers call them through Deferred-returning proxies from a
:class:`Client`. See README.md.
"""

__version__ = "0.1.0"

from twisted_rpc.client._client import Client, ClientCall
from twisted_rpc.client._proxy import ServiceProxy  # noqa: E402
from twisted_rpc.core._service import Service  # noqa: E402
from twisted_rpc.core._status import (  # noqa: E402
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    RpcError,
    StatusCode,
    UnavailableError,
    UnimplementedError,
    UnknownRemoteError,
)
from twisted_rpc.server._context import CallContext  # noqa: E402

__all__ = [
    "CallContext",
    "CancelledError",
    "Client",
    "ClientCall",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "RpcError",
    "Service",
    "ServiceProxy",
    "StatusCode",
    "UnavailableError",
    "UnimplementedError",
    "UnknownRemoteError",
    "__version__",
]
