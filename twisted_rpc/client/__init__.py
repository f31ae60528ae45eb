"""The consumer side: connections, per-provider channels, the client and its proxies.

:class:`ClientConnection` (``_connection``) runs calls on one connection (call
ids, the outstanding map, deadlines, cancellation). :class:`Channel`
(``_channel``) keeps one persistent connection to one provider, dialling
through the client's dial queue and redialling with backoff (``_dials``); its
states (:class:`ChannelState`) change only through the one transition table
of ``_states``, which also holds :class:`ConnectionState`. Every client
setting and its default is a field of :class:`ClientOptions` (``_options``);
a consumer ini file, read by ``_config``, builds one. A service config in
gRPC's JSON shape (``_service_config``) becomes a frozen :class:`ServiceConfig`
(per-method timeouts, retry and hedging policies, retry throttling).
:class:`Client` (``_client``) picks a channel per call with a balancer
(``_balancer``) from the provider lists its discovery gives, and builds
:class:`ServiceProxy` objects (``_proxy``) whose methods return Deferreds,
or for streaming methods a :class:`ServerStream`, :class:`ClientStream` or
:class:`BidiStream` (``_streams``; started by ``_stream_start``, carried on
the connection by ``_stream_wire``); with ``awaitables="asyncio"`` an
:class:`AsyncioServiceProxy` (``_asyncio``) whose methods return asyncio
Futures and stream adapters instead::

    client = Client(reactor, providers={"example.UserService": ["127.0.0.1:8000"]})
    users = client.proxy(user_pb2.DESCRIPTOR.services_by_name["UserService"])
    response = await users.Login(LoginRequest(name="zhang san", pwd="123456"), timeout=2)

Layering: ``client`` imports :mod:`twisted_rpc.core` and
:mod:`twisted_rpc.discovery` (provider addresses, the static registry a client
uses by default, and the ZooKeeper registry a consumer ini file may ask for).
"""

from twisted_rpc.client._asyncio import (
    AsyncioBidiStream,
    AsyncioClientStream,
    AsyncioServerStream,
    AsyncioServiceProxy,
)
from twisted_rpc.client._balancer import (
    Balancer,
    LeastOutstanding,
    RoundRobin,
    WeightedRandom,
    balancer_named,
)
from twisted_rpc.client._calls import NotSentError
from twisted_rpc.client._channel import Channel
from twisted_rpc.client._client import Client
from twisted_rpc.client._config import ConsumerConfig, load_consumer_config
from twisted_rpc.client._connection import ClientConnection
from twisted_rpc.client._dials import backoff_policy
from twisted_rpc.client._options import MAX_TIMEOUT, ClientOptions
from twisted_rpc.client._proxy import ServiceProxy
from twisted_rpc.client._routes import ClientCall
from twisted_rpc.client._service_config import (
    HedgingPolicy,
    MethodConfig,
    MethodName,
    RetryPolicy,
    RetryThrottling,
    ServiceConfig,
    ServiceConfigError,
)
from twisted_rpc.client._states import (
    ChannelEvent,
    ChannelState,
    ConnectionState,
    InvalidTransition,
)
from twisted_rpc.client._streams import BidiStream, ClientStream, ServerStream, StreamCall

__all__ = [
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
    "HedgingPolicy",
    "InvalidTransition",
    "LeastOutstanding",
    "MAX_TIMEOUT",
    "MethodConfig",
    "MethodName",
    "NotSentError",
    "RetryPolicy",
    "RetryThrottling",
    "RoundRobin",
    "ServerStream",
    "ServiceConfig",
    "ServiceConfigError",
    "ServiceProxy",
    "StreamCall",
    "WeightedRandom",
    "backoff_policy",
    "balancer_named",
    "load_consumer_config",
]
