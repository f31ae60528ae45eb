"""Services and methods derived from protobuf ``ServiceDescriptor`` objects.

Users declare ``service`` blocks in ``.proto`` files and compile them with
``protoc --python_out``; this module turns the descriptors the generated
module carries into what the provider and the proxies need::

    from examples.protos import user_pb2
    from twisted_rpc import Service

    class UserService(Service, descriptor=user_pb2.DESCRIPTOR.services_by_name["UserService"]):
        def Login(self, request, context):
            return user_pb2.LoginResponse(success=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

__all__ = [
    "MethodInfo",
    "check_handlers",
    "Service",
    "ServiceInfo",
    "describe",
    "resolve_descriptor",
    "wrong_request_type",
]


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One RPC method: its names, wire route and message classes."""

    service: str  # "package.Service"
    name: str  # "Method"
    route: bytes  # b"package.Service/Method", the dispatch key on the wire
    request_class: type[Message]
    response_class: type[Message]
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.service}/{self.name}"


def wrong_request_type(method: MethodInfo, request: object) -> TypeError | None:
    """The error for a request that is not ``method``'s request message (None if it is)."""
    if type(request) is method.request_class:
        return None
    return TypeError(
        f"{method.full_name} takes {method.request_class.DESCRIPTOR.full_name}, "
        f"not {type(request).__name__}"
    )


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A service: its full name, descriptor and methods by name."""

    name: str
    descriptor: ServiceDescriptor
    methods: dict[str, MethodInfo]


def resolve_descriptor(service: ServiceDescriptor | str | type[Service]) -> ServiceDescriptor:
    """A ServiceDescriptor from a descriptor, a Service subclass or a full name.

    A full name (``"example.UserService"``) is looked up in the default pool,
    so the module generated from its ``.proto`` must have been imported.
    """
    if isinstance(service, ServiceDescriptor):
        return service
    if isinstance(service, type) and issubclass(service, Service):
        if service.descriptor is None:
            raise TypeError(f"{service.__qualname__} declares no descriptor")
        return service.descriptor
    if isinstance(service, str):
        try:
            return descriptor_pool.Default().FindServiceByName(service)
        except KeyError:
            raise KeyError(
                f"unknown service {service!r}: import the module generated from its .proto first"
            ) from None
    raise TypeError(f"expected a ServiceDescriptor, Service subclass or name, got {service!r}")


@cache
def describe(descriptor: ServiceDescriptor) -> ServiceInfo:
    """The :class:`ServiceInfo` of a descriptor (computed once per descriptor)."""
    methods = {}
    for m in descriptor.methods:
        methods[m.name] = MethodInfo(
            service=descriptor.full_name,
            name=m.name,
            route=f"{descriptor.full_name}/{m.name}".encode(),
            request_class=GetMessageClass(m.input_type),
            response_class=GetMessageClass(m.output_type),
            client_streaming=bool(getattr(m, "client_streaming", False)),
            server_streaming=bool(getattr(m, "server_streaming", False)),
        )
    return ServiceInfo(descriptor.full_name, descriptor, methods)


class Service:
    """Base class of service implementations.

    Subclass it with ``descriptor=`` (a ``ServiceDescriptor``) and define one
    method per RPC, named as in the ``.proto``, taking ``(request, context)``
    and returning the response message, a Deferred of it, or (``async def``)
    a coroutine. Methods left out answer UNIMPLEMENTED.
    """

    descriptor: ClassVar[ServiceDescriptor | None] = None
    builtin: ClassVar[bool] = False
    """True for the framework's own services (health, reflection): not announced."""

    def __init_subclass__(cls, descriptor: ServiceDescriptor | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if descriptor is not None:
            if not isinstance(descriptor, ServiceDescriptor):
                raise TypeError(f"descriptor must be a ServiceDescriptor, got {descriptor!r}")
            cls.descriptor = descriptor

    @classmethod
    def service_info(cls) -> ServiceInfo:
        return describe(resolve_descriptor(cls))


def check_handlers(service: Service) -> tuple[list[str], list[str]]:
    """What a provider says at start about ``service``'s handlers: the RPCs
    it has no handler for (warnings: their callers get UNIMPLEMENTED), and
    its public methods that look like a misspelt handler of one of those
    (errors, each naming the RPC): equal to its name but for case, or one
    edit (insertion, deletion, substitution) away from it, case aside."""
    cls = type(service)
    info = cls.service_info()
    where = f"{cls.__module__}.{cls.__qualname__}"
    missing = [name for name in info.methods if not callable(getattr(service, name, None))]
    if not missing or cls.builtin:
        return [], []
    base = set(dir(Service))
    public = [
        name
        for name in sorted(set(dir(service)) - base - set(info.methods))
        if not name.startswith("_") and callable(getattr(service, name, None))
    ]
    warnings, errors = [], []
    for rpc in missing:
        warnings.append(f"{where} has no handler for {info.name}/{rpc}: it answers UNIMPLEMENTED")
        for name in public:
            if _one_edit(name.lower(), rpc.lower()) or name.lower() == rpc.lower():
                errors.append(
                    f"{where}.{name} is not the handler of {info.name}/{rpc} "
                    f"(no method is named {rpc}): rename it {rpc}"
                )
    return warnings, errors


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are exactly one edit apart (Levenshtein 1)."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i:] == b[i + 1 :]
