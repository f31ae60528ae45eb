"""The provider side of the native protocol.

The dispatcher and its interceptor chain (``_dispatcher``), the context a
handler gets (``_context``), the one call runner every listener's connection
mixes in (``_runner``: limits, parse, invoke, errors to status, observer;
its streaming half in ``_streams`` and ``_stream_state``),
what every listener's factory shares (``_listener``: :class:`ServerLimits`,
connection caps, calls in flight, the drain of :class:`IDrainable`), and the
native listener: one connection's wire (``_connection``) and its factory
(``_factory``). The C++ listener (:mod:`twisted_rpc.cpp`) runs its calls
through the same runner and dispatcher.

Layering: ``server`` imports :mod:`twisted_rpc.core` only.
"""

from twisted_rpc.server._connection import ServerConnection
from twisted_rpc.server._context import CallContext
from twisted_rpc.server._dispatcher import Dispatcher, FunctionInterceptor, ServerMethod
from twisted_rpc.server._factory import ServerFactory, ServerLimits
from twisted_rpc.server._stream_state import RequestStream

__all__ = [
    "CallContext",
    "Dispatcher",
    "FunctionInterceptor",
    "ServerConnection",
    "ServerFactory",
    "ServerLimits",
    "ServerMethod",
    "RequestStream",
]
