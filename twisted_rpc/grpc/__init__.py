"""gRPC's wire (HTTP/2) beside the native one: a listener feeding the same
call runner on the provider, a channel for the consumer's proxies.

``_wire`` has what both sides share (length-prefixed messages,
``grpc-timeout``, metadata as headers, status trailers). Layering: ``grpc``
imports :mod:`twisted_rpc.core`, :mod:`twisted_rpc.server` and
:mod:`twisted_rpc.client`.
"""

from twisted_rpc.grpc._client import GrpcClientConnection
from twisted_rpc.grpc._wire import GrpcWireError

__all__ = ["GrpcClientConnection", "GrpcWireError"]
