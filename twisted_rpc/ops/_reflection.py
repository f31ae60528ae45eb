"""Reflection: the service every provider serves unless told not to, and the
client helpers that call it.

``mprpc.reflection.v1.Reflection`` answers the names of the services served,
and the serialized ``FileDescriptorProto`` of the file defining a symbol with
all its dependencies (dependencies first), so a client needs no ``.proto``. A
symbol longer than :data:`MAX_SYMBOL_LENGTH` is INVALID_ARGUMENT; error
messages quote at most :data:`ECHO_LIMIT` characters of what was asked.

Calling a service without its ``.proto``::

    descriptor = await remote_service(client, "example.UserService")
    users = client.proxy(descriptor)       # message classes built from the provider's files
    request = users_request_class(...)     # see message_class()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from twisted.internet.defer import Deferred

from twisted_rpc.client._client import Client
from twisted_rpc.core._service import Service
from twisted_rpc.core._status import InvalidArgumentError, NotFoundError
from twisted_rpc.ops._protos import (
    REFLECTION,
    FileDescriptorsRequest,
    FileDescriptorsResponse,
    ListServicesRequest,
    ListServicesResponse,
)
from twisted_rpc.server._context import CallContext

__all__ = [
    "MAX_SYMBOL_LENGTH",
    "ReflectionService",
    "RemoteDescriptors",
    "files_for_symbol",
    "find_symbol_file",
    "message_class",
    "remote_service",
    "served_pools",
]

MAX_SYMBOL_LENGTH = 1024
"""Longer reflection symbols are refused (protobuf full names are far shorter)."""


ECHO_LIMIT = 100
"""At most this many characters of a caller's input are quoted back in an error."""


def _quote(text: str, limit: int = ECHO_LIMIT) -> str:
    """``repr(text)``, cut to ``limit`` characters with the full length noted."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def served_pools(dispatcher: Any) -> list[descriptor_pool.DescriptorPool]:
    """The descriptor pools reflection answers from, each once: the private
    pools of the built-in services first (what they serve is theirs: gRPC's
    own ``grpc_health`` package, if imported, defines the same symbols in the
    default pool under another file name), the default pool, then the pools
    of the other services."""
    default = descriptor_pool.Default()
    services = sorted(dispatcher.services.values(), key=lambda s: not s.builtin)
    builtins = [type(s).descriptor.file.pool for s in services if s.builtin]
    others = [type(s).descriptor.file.pool for s in services if not s.builtin]
    pools: list[descriptor_pool.DescriptorPool] = []
    for pool in [*(p for p in builtins if p is not default), default, *others]:
        if all(pool is not p for p in pools):
            pools.append(pool)
    return pools


def find_symbol_file(
    symbol: str, pools: Sequence[descriptor_pool.DescriptorPool]
) -> FileDescriptor | None:
    """The file defining ``symbol`` (a message, enum, service, method,
    field, enum value or extension), from the first pool that has it."""
    for pool in pools:
        try:
            return pool.FindFileContainingSymbol(symbol)
        except KeyError:
            pass
        # A method ("package.Service.Method"): the pools find services only.
        service, _, method = symbol.rpartition(".")
        try:
            found = pool.FindServiceByName(service)
        except KeyError:
            continue
        if method in found.methods_by_name:
            return found.file
    return None


def files_for_symbol(
    symbol: str, pools: Sequence[descriptor_pool.DescriptorPool] = ()
) -> list[FileDescriptor]:
    """The file defining ``symbol`` and its dependencies, dependencies first.

    Raises InvalidArgumentError for a symbol over :data:`MAX_SYMBOL_LENGTH`
    characters and NotFoundError for one no pool knows.
    """
    if len(symbol) > MAX_SYMBOL_LENGTH:
        raise InvalidArgumentError(
            message=f"symbol of {len(symbol)} characters: at most {MAX_SYMBOL_LENGTH}"
            f" ({_quote(symbol)})"
        )
    if all(pool is not descriptor_pool.Default() for pool in pools):
        pools = [descriptor_pool.Default(), *pools]
    file = find_symbol_file(symbol, pools)
    if file is None:
        raise NotFoundError(message=f"no symbol {_quote(symbol)} here")
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(f: FileDescriptor) -> None:
        if f.name in seen:
            return
        seen.add(f.name)
        for dependency in f.dependencies:
            visit(dependency)
        ordered.append(f)

    visit(file)
    return ordered


class ReflectionService(Service, descriptor=REFLECTION):
    """``mprpc.reflection.v1.Reflection`` for the services of a dispatcher."""

    builtin = True

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    def ListServices(self, request: Any, context: CallContext) -> Any:
        return ListServicesResponse(services=sorted(self.dispatcher.services))

    def FileContainingSymbol(self, request: Any, context: CallContext) -> Any:
        files = files_for_symbol(request.symbol, served_pools(self.dispatcher))
        return FileDescriptorsResponse(file_descriptor_proto=[f.serialized_pb for f in files])


class RemoteDescriptors:
    """A private descriptor pool filled from a provider's Reflection service."""

    def __init__(self, client: Client, timeout: float | None = None) -> None:
        self.client = client
        self.timeout = timeout
        self.pool = descriptor_pool.DescriptorPool()
        self._files: set[str] = set()
        self._reflection = client.proxy(REFLECTION, timeout=timeout)

    def list_services(self) -> Deferred[list[str]]:
        """Fires with the names of the services the provider serves."""
        # (A proxy's methods are made from the service descriptor at run time.)
        d: Deferred[Any] = self._reflection.ListServices(ListServicesRequest())
        return d.addCallback(lambda reply: list(reply.services))

    async def load(self, symbol: str) -> None:
        """Add the file defining ``symbol`` and its dependencies to the pool."""
        request = FileDescriptorsRequest(symbol=symbol)
        reply = await self._reflection.FileContainingSymbol(request)
        for raw in reply.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            if proto.name not in self._files:
                self.pool.Add(proto)
                self._files.add(proto.name)

    async def service(self, name: str) -> ServiceDescriptor:
        await self.load(name)
        try:
            return self.pool.FindServiceByName(name)
        except KeyError:
            raise NotFoundError(message=f"{name} is not a service") from None


async def remote_service(
    client: Client, name: str, timeout: float | None = None
) -> ServiceDescriptor:
    """The descriptor of service ``name``, from its provider's Reflection service."""
    return await RemoteDescriptors(client, timeout).service(name)


def message_class(descriptor: Descriptor) -> type[Message]:
    """The message class of a (reflected) message descriptor."""
    return GetMessageClass(descriptor)
