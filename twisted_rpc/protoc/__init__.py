"""Typed stubs from ``.proto`` files: a protoc plugin and a protoc wrapper.

``python -m twisted_rpc.protoc -I. --python_out=. --pyi_out=.
--twisted_rpc_out=. myapp/protos/x.proto`` (needs ``twisted_rpc[protoc]``,
i.e. grpcio-tools) writes ``myapp/protos/x_rpc.py`` beside ``x_pb2.py``:
per service a ``<Service>Stub`` (a typed proxy), a ``<Service>AsyncioStub``
(the same for asyncio tasks, on a client with ``awaitables="asyncio"``) and
a ``<Service>Base`` (a :class:`twisted_rpc.Service` to subclass, handlers
typed). The plugin
alone is the ``protoc-gen-twisted_rpc`` script, for any protoc. See
docs/stubs.md.

This layer imports no other part of the package: it only writes text.
"""

from twisted_rpc.protoc._plugin import generate, plugin_main
from twisted_rpc.protoc._wrapper import main

__all__ = ["generate", "main", "plugin_main"]
