"""The C++ mprpc wire format (muduo + protobuf), Twisted-free.

A request is sent in one write on a connection of its own::

    uint32 header_len (little-endian) | RpcHeader (header_len bytes) | args (args_size bytes)

with ``package mprpc; message RpcHeader { bytes service_name = 1;
bytes method_name = 2; uint32 args_size = 3; }``. ``service_name`` is the
service's short name (no package). The reply is the bare serialized response
message, ended by the provider half-closing the connection; the C++ caller
reads it with one ``recv`` of 1024 bytes. ``docs/mprpc-compat.md`` has the
bytes of the original's example.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "CPP_REPLY_LIMIT",
    "CppProtocolError",
    "CppRequest",
    "RequestReader",
    "RpcHeader",
    "encode_request",
]

CPP_REPLY_LIMIT = 1024
"""The C++ caller's receive buffer: longer replies are truncated there."""

MAX_HEADER_SIZE = 64 * 1024
"""An RpcHeader holds two names and a number; anything longer is not one."""

_LENGTH = struct.Struct("<I")


def _header_class() -> type:
    # Built in a private pool, so a user's own generated mprpc.RpcHeader
    # (the C++ project's rpcheader.proto) never clashes with it.
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="twisted_rpc/mprpc_rpcheader.proto", package="mprpc", syntax="proto3"
    )
    message = proto.message_type.add(name="RpcHeader")
    for number, (name, kind) in enumerate(
        [
            ("service_name", field.TYPE_BYTES),
            ("method_name", field.TYPE_BYTES),
            ("args_size", field.TYPE_UINT32),
        ],
        start=1,
    ):
        message.field.add(name=name, number=number, type=kind, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mprpc.RpcHeader"))


RpcHeader = _header_class()


class CppProtocolError(Exception):
    """Bytes that are not an mprpc request (the connection is closed)."""


@dataclass(frozen=True, slots=True)
class CppRequest:
    """One decoded request: names as sent, args still serialized."""

    service: str
    method: str
    args: bytes


def encode_request(service: str, method: str, args: bytes) -> bytes:
    """The bytes a C++ mprpc caller sends for ``service.method(args)``."""
    header = RpcHeader(
        service_name=service.encode(), method_name=method.encode(), args_size=len(args)
    ).SerializeToString()
    return b"".join((_LENGTH.pack(len(header)), header, args))


class RequestReader:
    """Reassembles one request from reads of any size.

    ``feed(data)`` returns the :class:`CppRequest` once all of it has
    arrived (None before), and raises :class:`CppProtocolError` on bytes
    that cannot be one. Bytes after the request are counted in ``extra``.
    """

    def __init__(self, max_request_size: int) -> None:
        self.max_request_size = max_request_size
        self._buffer = bytearray()
        self._header: tuple[str, str, int, int] | None = None  # service, method, start, size
        self.request: CppRequest | None = None
        self.extra = 0

    def feed(self, data: bytes) -> CppRequest | None:
        if self.request is not None:
            self.extra += len(data)
            return None
        buffer = self._buffer
        buffer += data
        if self._header is None:
            if len(buffer) < 4:
                return None
            (header_len,) = _LENGTH.unpack_from(buffer)
            if header_len == 0 or header_len > MAX_HEADER_SIZE:
                raise CppProtocolError(f"header length {header_len} is not plausible")
            if len(buffer) < 4 + header_len:
                return None
            header = RpcHeader()
            try:
                header.ParseFromString(bytes(buffer[4 : 4 + header_len]))
                service = header.service_name.decode()
                method = header.method_name.decode()
            except Exception as e:
                raise CppProtocolError(f"bad RpcHeader: {e}") from None
            if not service or not method:
                raise CppProtocolError("RpcHeader names no service or method")
            if header.args_size > self.max_request_size:
                raise CppProtocolError(
                    f"args of {header.args_size} bytes exceed the limit of {self.max_request_size}"
                )
            self._header = (service, method, 4 + header_len, header.args_size)
        service, method, start, size = self._header
        if len(buffer) < start + size:
            return None
        self.extra = len(buffer) - start - size
        self.request = CppRequest(service, method, bytes(buffer[start : start + size]))
        self._buffer = bytearray()
        return self.request
