"""The C++ mprpc original's protocol, served and called.

Its wire format (``_wire``, free of Twisted), the listener that serves a
dispatcher's services to C++ callers (``_listener``), the client that calls
C++ providers (``_client``, which finds them in the C++ ZooKeeper layout
through :mod:`twisted_rpc.discovery`) and its ``key=value`` config file with
the provider's ``[cpp]`` section (``_conf``). See ``docs/mprpc-compat.md``.
The product's own commands keep the name mprpc (``twistd mprpc``, ``mprpc``).

Layering: ``cpp`` imports :mod:`twisted_rpc.core`, :mod:`twisted_rpc.server`
(the listener runs calls through the same dispatcher) and
:mod:`twisted_rpc.discovery`.
"""

from twisted_rpc.cpp._client import (
    CppClient,
    CppDirectory,
    CppProxy,
    StaticCppDirectory,
    ZooKeeperCppDirectory,
)
from twisted_rpc.cpp._conf import CppConf, CppListenerConfig, load_cpp_conf
from twisted_rpc.cpp._listener import CppServerFactory
from twisted_rpc.cpp._wire import CppProtocolError, CppRequest, RequestReader, encode_request

__all__ = [
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
]
