"""gRPC's wire (HTTP/2) beside the native one: a listener feeding the same
call runner on the provider, a channel for the consumer's proxies.

``_wire`` has what both sides share (length-prefixed messages,
``grpc-timeout``, metadata as headers, status trailers); ``_listener`` and
``_server`` are the provider's listener (:class:`GrpcServerFactory`) and its
connections (:class:`GrpcServerConnection`). Layering: ``grpc`` imports
:mod:`twisted_rpc.core`, :mod:`twisted_rpc.server` and
:mod:`twisted_rpc.client`.
"""

from twisted_rpc.grpc._client import GrpcClientConnection
from twisted_rpc.grpc._listener import GrpcServerFactory
from twisted_rpc.grpc._server import GrpcServerConnection
from twisted_rpc.grpc._wire import GrpcWireError

__all__ = ["GrpcClientConnection", "GrpcServerConnection", "GrpcServerFactory", "GrpcWireError"]
