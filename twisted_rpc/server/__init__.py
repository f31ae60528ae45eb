"""The provider side of the native protocol.

The dispatcher and its interceptor chain (``_dispatcher``), the context a
handler gets (``_context``), one connection's calls (``_connection``) and the
factory that holds a listener's connections, its limits and its drain
(``_factory``). The C++ listener (:mod:`twisted_rpc.cpp`) runs its calls
through the same dispatcher.

Layering: ``server`` imports :mod:`twisted_rpc.core` only.
"""

from twisted_rpc.server._connection import ServerConnection
from twisted_rpc.server._context import CallContext
from twisted_rpc.server._dispatcher import Dispatcher, FunctionInterceptor, ServerMethod
from twisted_rpc.server._factory import ServerFactory, ServerLimits

__all__ = [
    "CallContext",
    "Dispatcher",
    "FunctionInterceptor",
    "ServerConnection",
    "ServerFactory",
    "ServerLimits",
    "ServerMethod",
]
