"""Calling a service without its ``.proto``: descriptors fetched by reflection.

::

    descriptor = await remote_service(client, "example.UserService")
    users = client.proxy(descriptor)       # message classes built from the provider's files
    request = users_request_class(...)     # see message_class()
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from twisted.internet.defer import Deferred

from twisted_rpc.builtin_protos import REFLECTION, FileDescriptorsRequest, ListServicesRequest
from twisted_rpc.client._client import Client
from twisted_rpc.core._status import NotFoundError

__all__ = ["RemoteDescriptors", "message_class", "remote_service"]


class RemoteDescriptors:
    """A private descriptor pool filled from a provider's Reflection service."""

    def __init__(self, client: Client, timeout: float | None = None) -> None:
        self.client = client
        self.timeout = timeout
        self.pool = descriptor_pool.DescriptorPool()
        self._files: set[str] = set()
        self._reflection = client.proxy(REFLECTION, timeout=timeout)

    def list_services(self) -> Deferred:
        """Fires with the names of the services the provider serves."""
        d = self._reflection.ListServices(ListServicesRequest())
        return d.addCallback(lambda reply: list(reply.services))

    async def load(self, symbol: str) -> None:
        """Add the file defining ``symbol`` and its dependencies to the pool."""
        reply = await self._reflection.FileContainingSymbol(FileDescriptorsRequest(symbol=symbol))
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
