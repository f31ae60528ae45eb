"""gRPC's ``grpc.reflection.v1alpha`` and ``v1`` ``ServerReflection``, in
memory through our own client: the same descriptors as
``mprpc.reflection.v1.Reflection``, dependencies included."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf.message_factory import GetMessageClass

from examples.user.callee import UserService
from testbed.echo_service import EchoService
from twisted_rpc import Client, ServerLimits, Service, StatusCode
from twisted_rpc.core._codec import HEADER_SIZE
from twisted_rpc.ops._grpc_protos import REFLECTION_V1, REFLECTION_V1ALPHA
from twisted_rpc.ops._protos import REFLECTION, FileDescriptorsRequest
from twisted_rpc.ops._reflection import ECHO_LIMIT, MAX_SYMBOL_LENGTH
from twisted_rpc.testing import MemoryProvider

VERSIONS = [REFLECTION_V1ALPHA, REFLECTION_V1]
ADDRESS = f"127.0.0.1:{MemoryProvider.port}"

# A proto2 file with an extension, in a pool of its own (as a service's may be).
_EXT_POOL = descriptor_pool.DescriptorPool()
_EXT_POOL.AddSerializedFile(
    text_format.Parse(
        """
        name: "mprpc/test/ext.proto" package: "mprpc.test.ext" syntax: "proto2"
        message_type { name: "Base" extension_range { start: 100 end: 200 } }
        extension { name: "color" number: 101 label: LABEL_OPTIONAL type: TYPE_INT32
                    extendee: ".mprpc.test.ext.Base" }
        extension { name: "size" number: 150 label: LABEL_OPTIONAL type: TYPE_INT32
                    extendee: ".mprpc.test.ext.Base" }
        service { name: "Ext" method { name: "Get" input_type: ".mprpc.test.ext.Base"
                                       output_type: ".mprpc.test.ext.Base" } }
        """,
        descriptor_pb2.FileDescriptorProto(),
    ).SerializeToString()
)


class ExtService(Service, descriptor=_EXT_POOL.FindServiceByName("mprpc.test.ext.Ext")):
    pass


def provider(**kw: Any) -> MemoryProvider:
    return MemoryProvider([EchoService(), UserService(), ExtService()], builtins=True, **kw)


def request_class(version: Any) -> Any:
    return GetMessageClass(version.file.message_types_by_name["ServerReflectionRequest"])


def ask(memory: MemoryProvider, version: Any, *requests: dict[str, Any]) -> list[Any]:
    """Send ``requests`` on one stream; the responses."""
    cls = request_class(version)

    async def go() -> list[Any]:
        call = memory.proxy(version).ServerReflectionInfo([cls(**r) for r in requests])
        return [reply async for reply in call]

    return memory.run(go())  # type: ignore[no-any-return]


def file_names(reply: Any) -> list[str]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_list_services_names_every_service_served(version):
    memory = provider()
    (reply,) = ask(memory, version, {"list_services": "*", "host": "h"})
    assert [s.name for s in reply.list_services_response.service] == sorted(
        memory.dispatcher.services
    )
    assert {"grpc.health.v1.Health", version.full_name, "example.UserService"} <= {
        s.name for s in reply.list_services_response.service
    }
    assert reply.original_request.list_services == "*"
    assert reply.valid_host == "h"


@pytest.mark.parametrize("version", VERSIONS)
def test_file_containing_symbol_answers_the_file_then_its_dependencies(version):
    memory = provider()
    symbols = [
        "example.UserService",  # a service
        "example.UserService.Login",  # a method
        "example.LoginRequest",  # a message
        "example.LoginRequest.name",  # a field
    ]
    replies = ask(memory, version, *({"file_containing_symbol": s} for s in symbols))
    for reply, symbol in zip(replies, symbols, strict=True):
        assert file_names(reply) == [
            "examples/protos/user.proto",
            "examples/protos/common.proto",
        ], symbol
        assert reply.original_request.file_containing_symbol == symbol
    (enum,) = ask(
        memory,
        version,
        {"file_containing_symbol": "grpc.health.v1.HealthCheckResponse.ServingStatus"},
    )
    assert file_names(enum) == ["grpc/health/v1/health.proto"]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_files_build_a_pool_that_resolves_the_services_methods(version):
    memory = provider()
    (reply,) = ask(memory, version, {"file_containing_symbol": "example.UserService"})
    pool = descriptor_pool.DescriptorPool()
    for raw in reversed(reply.file_descriptor_response.file_descriptor_proto):  # deps first
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    service = pool.FindServiceByName("example.UserService")
    assert service.methods_by_name["Login"].input_type.full_name == "example.LoginRequest"
    assert (
        service.methods_by_name["Login"].output_type.fields_by_name["result"].message_type.full_name
        == "example.ResultCode"
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_file_by_filename_and_the_standard_services_own_files(version):
    memory = provider()
    own = version.file.name
    replies = ask(
        memory,
        version,
        {"file_by_filename": "examples/protos/user.proto"},
        {"file_by_filename": own},
        {"file_containing_symbol": version.full_name},
        {"file_containing_symbol": "grpc.health.v1.Health.Watch"},
    )
    assert [file_names(r) for r in replies] == [
        ["examples/protos/user.proto", "examples/protos/common.proto"],
        [own],
        [own],
        ["grpc/health/v1/health.proto"],
    ]
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        replies[1].file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.package == version.file.package
    method = proto.service[0].method[0]
    assert (method.name, method.client_streaming, method.server_streaming) == (
        "ServerReflectionInfo",
        True,
        True,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_the_same_descriptors_as_our_reflection(version):
    memory = provider()
    for symbol in ["example.UserService", "mprpc.test.EchoService", "grpc.health.v1.Health"]:
        d = memory.proxy(REFLECTION).FileContainingSymbol(FileDescriptorsRequest(symbol=symbol))
        memory.flush()
        ours = list(memory.result(d).file_descriptor_proto)  # dependencies first
        (reply,) = ask(memory, version, {"file_containing_symbol": symbol})
        grpcs = list(reply.file_descriptor_response.file_descriptor_proto)  # the file first
        assert sorted(grpcs) == sorted(ours) and grpcs[0] == ours[-1], symbol


@pytest.mark.parametrize("version", VERSIONS)
def test_extensions(version):
    memory = provider()
    replies = ask(
        memory,
        version,
        {
            "file_containing_extension": {
                "containing_type": "mprpc.test.ext.Base",
                "extension_number": 150,
            }
        },
        {"all_extension_numbers_of_type": "mprpc.test.ext.Base"},
        {
            "file_containing_extension": {
                "containing_type": "mprpc.test.ext.Base",
                "extension_number": 102,
            }
        },
        {"all_extension_numbers_of_type": "no.Such"},
        {"file_containing_extension": {"containing_type": "no.Such", "extension_number": 1}},
    )
    assert file_names(replies[0]) == ["mprpc/test/ext.proto"]
    numbers = replies[1].all_extension_numbers_response
    assert (numbers.base_type_name, list(numbers.extension_number)) == (
        "mprpc.test.ext.Base",
        [101, 150],
    )
    for reply in replies[2:]:
        assert reply.error_response.error_code == StatusCode.NOT_FOUND
    assert (
        replies[2].error_response.error_message == "no extension 102 of 'mprpc.test.ext.Base' here"
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_errors_are_answered_in_the_stream_and_it_goes_on(version):
    memory = provider()
    huge = "x" * 100_000
    replies = ask(
        memory,
        version,
        {"file_containing_symbol": "no.Such"},
        {"file_by_filename": "no/such.proto"},
        {},  # asks nothing
        {"file_containing_symbol": huge},
        {"host": huge, "list_services": ""},
        {"file_containing_extension": {"containing_type": huge}},
        {"file_containing_symbol": "example.UserService"},
    )
    codes = [r.error_response.error_code for r in replies]
    assert codes == [5, 5, 3, 3, 3, 3, 0]
    assert replies[0].error_response.error_message == "no symbol 'no.Such' here"
    too_long = replies[3]
    assert f"at most {MAX_SYMBOL_LENGTH}" in too_long.error_response.error_message
    assert "(100000 characters)" in too_long.error_response.error_message
    assert len(too_long.error_response.error_message) < 300
    assert too_long.original_request.file_containing_symbol == "x" * ECHO_LIMIT  # echoed cut
    assert replies[4].original_request.WhichOneof("message_request") == "list_services"
    assert len(replies[4].original_request.host) == ECHO_LIMIT
    assert len(replies[5].original_request.file_containing_extension.containing_type) == ECHO_LIMIT
    assert all(len(r.SerializeToString()) < 1000 for r in replies[:6])
    assert file_names(replies[6]) == ["examples/protos/user.proto", "examples/protos/common.proto"]


def test_a_request_flood_is_answered_as_the_window_allows():
    memory = provider()
    # A consumer granting 4 KiB a stream, not reading: the provider answers a
    # window's worth, then takes no more requests than its own window holds.
    client = Client(
        memory.reactor, providers={REFLECTION_V1.full_name: [ADDRESS]}, stream_window=4096
    )
    cls = request_class(REFLECTION_V1)
    call = client.proxy(REFLECTION_V1).ServerReflectionInfo()
    call.pauseProducing()
    sent = 20_000
    written = [call.write(cls(file_containing_symbol="no.Such")) for _ in range(sent)]
    call.done_writing()
    memory.flush()
    held = len(call.inbox.messages)
    accepted = sum(d.called for d in written)
    assert memory.factory.streams_in_flight == 1  # still answering
    assert 4096 // 60 <= held <= 4096 // 40  # each answer is ~50 bytes with its header
    cost = cls(file_containing_symbol="no.Such").ByteSize() + HEADER_SIZE
    # Requests answered, plus the provider's window of requests held (~9,700 of 20,000).
    assert accepted <= held + ServerLimits().stream_window // cost + 1
    seen: list[Any] = []
    done = call.on_message(seen.append)
    call.resumeProducing()
    memory.settle()
    assert memory.result(done) is None
    assert len(seen) == sent
    assert all(r.error_response.error_code == StatusCode.NOT_FOUND for r in seen)


def test_our_files_are_answered_even_beside_grpcios_own_health_package():
    # grpcio's package puts the same symbols in the default pool, as
    # "grpc_health/v1/health.proto": what the provider serves is its own file.
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    assert health_pb2.DESCRIPTOR.name == "grpc_health/v1/health.proto"
    memory = provider()
    (reply,) = ask(memory, REFLECTION_V1, {"file_containing_symbol": "grpc.health.v1.Health"})
    assert file_names(reply) == ["grpc/health/v1/health.proto"]
    d = memory.proxy(REFLECTION).FileContainingSymbol(
        FileDescriptorsRequest(symbol="grpc.health.v1.Health")
    )
    memory.flush()
    (raw,) = memory.result(d).file_descriptor_proto
    assert descriptor_pb2.FileDescriptorProto.FromString(raw).name == "grpc/health/v1/health.proto"


def test_our_reflection_finds_methods_too():
    memory = provider()
    d = memory.proxy(REFLECTION).FileContainingSymbol(
        FileDescriptorsRequest(symbol="example.UserService.Login")
    )
    memory.flush()
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in memory.result(d).file_descriptor_proto
    ]
    assert names == [
        "examples/protos/common.proto",
        "examples/protos/user.proto",
    ]  # dependencies first
