"""gRPC's standard reflection service, ``grpc.reflection.v1alpha`` and
``grpc.reflection.v1`` ``ServerReflection`` (the same messages in two
packages), answering from the descriptors ``mprpc.reflection.v1.Reflection``
serves (:func:`twisted_rpc.ops._reflection.served_pools`).

``ServerReflectionInfo`` is a bidi stream: one response per request, in
order. ``list_services`` names every service served; ``file_by_filename``,
``file_containing_symbol`` (a message, enum, service, method, field...) and
``file_containing_extension`` answer the file with its transitive
dependencies, the file asked for first (what gRPC's servers do, and what
``grpcurl`` expects); ``all_extension_numbers_of_type`` the extension
numbers of a message. Errors are answered in the stream as gRPC's servers
do (an ``error_response`` with a status code, the stream going on):
NOT_FOUND for what no pool knows, INVALID_ARGUMENT for a request asking
nothing or naming anything with more than
:data:`twisted_rpc.ops._reflection.MAX_SYMBOL_LENGTH` characters (echoed
cut to :data:`twisted_rpc.ops._reflection.ECHO_LIMIT`).

Bounded: the handler takes the next request only once its answer is
written, and writing waits for the consumer's credit, so a flood of
requests on one stream is answered as the consumer's window allows and
holds at most the provider's ``stream_window`` of requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor
from google.protobuf.message_factory import GetMessageClass

from twisted_rpc.core._service import Service
from twisted_rpc.core._status import StatusCode
from twisted_rpc.ops._grpc_protos import REFLECTION_V1, REFLECTION_V1ALPHA
from twisted_rpc.ops._reflection import (
    ECHO_LIMIT,
    MAX_SYMBOL_LENGTH,
    _quote,
    find_symbol_file,
    served_pools,
)
from twisted_rpc.server._context import CallContext

__all__ = ["ServerReflectionV1", "ServerReflectionV1Alpha", "with_dependencies"]

_NAMES = ("host", "file_by_filename", "file_containing_symbol", "all_extension_numbers_of_type")


def with_dependencies(file: FileDescriptor) -> list[FileDescriptor]:
    """``file`` then its transitive dependencies (each once, depth first)."""
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()
    todo = [file]
    while todo:  # (iterative: a long import chain cannot exhaust the stack)
        f = todo.pop()
        if f.name in seen:
            continue
        seen.add(f.name)
        ordered.append(f)
        todo.extend(reversed(f.dependencies))
    return ordered


def _find_file(name: str, pools: Sequence[descriptor_pool.DescriptorPool]) -> FileDescriptor | None:
    for pool in pools:
        try:
            return pool.FindFileByName(name)
        except KeyError:
            continue
    return None


def _find_message(
    name: str, pools: Sequence[descriptor_pool.DescriptorPool]
) -> list[tuple[descriptor_pool.DescriptorPool, Descriptor]]:
    """The pools knowing message ``name``, with its descriptor in each."""
    found = []
    for pool in pools:
        try:
            found.append((pool, pool.FindMessageTypeByName(name)))
        except KeyError:
            continue
    return found


class _ServerReflection(Service):
    """``ServerReflection`` over the services of a dispatcher (one class per version)."""

    builtin = True
    _classes: ClassVar[dict[str, Any]]  # (message classes: their fields are dynamic)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        assert cls.descriptor is not None
        messages = cls.descriptor.file.message_types_by_name
        cls._classes = {name: GetMessageClass(m) for name, m in messages.items()}

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Any], context: CallContext
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: Any) -> Any:
        """The response to one ``ServerReflectionRequest``."""
        c = self._classes
        too_long = self._too_long(request)
        if too_long is not None:
            return self._error(self._clipped(request), StatusCode.INVALID_ARGUMENT, too_long)
        reply = c["ServerReflectionResponse"](valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        pools = served_pools(self.dispatcher)
        if kind == "list_services":
            services = reply.list_services_response.service
            for name in sorted(self.dispatcher.services):
                services.add(name=name)
            return reply
        if kind == "file_by_filename":
            file = _find_file(request.file_by_filename, pools)
            missing = f"no file {_quote(request.file_by_filename)} here"
        elif kind == "file_containing_symbol":
            file = find_symbol_file(request.file_containing_symbol, pools)
            missing = f"no symbol {_quote(request.file_containing_symbol)} here"
        elif kind == "file_containing_extension":
            asked = request.file_containing_extension
            file = None
            for pool, message in _find_message(asked.containing_type, pools):
                try:
                    extension = pool.FindExtensionByNumber(message, asked.extension_number)
                    file = pool.FindFileContainingSymbol(extension.full_name)
                    break
                except KeyError:
                    continue
            missing = (
                f"no extension {asked.extension_number} of {_quote(asked.containing_type)} here"
            )
        elif kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            found = _find_message(name, pools)
            if not found:
                return self._error(request, StatusCode.NOT_FOUND, f"no message {_quote(name)} here")
            numbers = {e.number for pool, m in found for e in pool.FindAllExtensions(m)}
            answer = reply.all_extension_numbers_response
            answer.base_type_name = found[0][1].full_name
            answer.extension_number.extend(sorted(numbers))
            return reply
        else:
            return self._error(request, StatusCode.INVALID_ARGUMENT, "the request asks nothing")
        if file is None:
            return self._error(request, StatusCode.NOT_FOUND, missing)
        files = reply.file_descriptor_response.file_descriptor_proto
        files.extend(f.serialized_pb for f in with_dependencies(file))
        return reply

    @staticmethod
    def _too_long(request: Any) -> str | None:
        for name in _NAMES:
            value = getattr(request, name)
            if len(value) > MAX_SYMBOL_LENGTH:
                return (
                    f"{name} of {len(value)} characters: at most {MAX_SYMBOL_LENGTH}"
                    f" ({_quote(value)})"
                )
        extension = request.file_containing_extension.containing_type
        if len(extension) > MAX_SYMBOL_LENGTH:
            return (
                f"containing_type of {len(extension)} characters: at most {MAX_SYMBOL_LENGTH}"
                f" ({_quote(extension)})"
            )
        return None

    @staticmethod
    def _clipped(request: Any) -> Any:
        """A copy of ``request`` with every name cut to ECHO_LIMIT characters
        (only a field already set can be that long: the oneof stays as it was)."""
        copy = type(request)()
        copy.CopyFrom(request)
        for name in _NAMES:
            value = getattr(copy, name)
            if len(value) > ECHO_LIMIT:
                setattr(copy, name, value[:ECHO_LIMIT])
        extension = copy.file_containing_extension
        if len(extension.containing_type) > ECHO_LIMIT:
            extension.containing_type = extension.containing_type[:ECHO_LIMIT]
        return copy

    def _error(self, request: Any, code: StatusCode, message: str) -> Any:
        reply = self._classes["ServerReflectionResponse"](original_request=request)
        reply.error_response.error_code = int(code)
        reply.error_response.error_message = message
        return reply


class ServerReflectionV1Alpha(_ServerReflection, descriptor=REFLECTION_V1ALPHA):
    """``grpc.reflection.v1alpha.ServerReflection`` (what most tools still ask first)."""


class ServerReflectionV1(_ServerReflection, descriptor=REFLECTION_V1):
    """``grpc.reflection.v1.ServerReflection``."""
