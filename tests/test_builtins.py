"""The built-in Health and Reflection services, in memory with a Clock."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass

from examples.user.callee import UserService
from tests.echo_service import EchoService
from twisted_rpc import NotFoundError
from twisted_rpc.builtin_protos import (
    HEALTH,
    REFLECTION,
    FileDescriptorsRequest,
    HealthCheckRequest,
    HealthWatchRequest,
    ListServicesRequest,
)
from twisted_rpc.builtins import (
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    HealthState,
)
from twisted_rpc.testing import MemoryProvider


def provider() -> tuple[MemoryProvider, HealthState]:
    memory = MemoryProvider([EchoService(), UserService()], builtins=True)
    return memory, memory.health


def call(memory: MemoryProvider, d):
    memory.flush()
    return memory.result(d)


def test_check_answers_per_service_and_overall():
    memory, state = provider()
    health = memory.proxy(HEALTH)
    for service, expected in [
        ("", SERVING),
        ("example.UserService", SERVING),
        ("mprpc.health.v1.Health", SERVING),  # built-ins too, as in a real provider
        ("no.Such", SERVICE_UNKNOWN),
    ]:
        assert call(memory, health.Check(HealthCheckRequest(service=service))).status == expected
    state.set("example.UserService", NOT_SERVING)
    reply = call(memory, health.Check(HealthCheckRequest(service="example.UserService")))
    assert reply.status == NOT_SERVING


def test_watch_answers_at_once_when_the_status_differs():
    memory, _ = provider()
    d = memory.proxy(HEALTH).Watch(HealthWatchRequest(service="", last_status=NOT_SERVING))
    assert call(memory, d).status == SERVING


def test_watch_waits_for_a_change():
    memory, state = provider()
    d = memory.proxy(HEALTH).Watch(HealthWatchRequest(last_status=SERVING, max_wait=10))
    memory.advance(3)
    assert not d.called
    state.set_all(NOT_SERVING)
    assert call(memory, d).status == NOT_SERVING


def test_watch_answers_the_unchanged_status_when_its_wait_is_over():
    memory, _ = provider()
    d = memory.proxy(HEALTH).Watch(HealthWatchRequest(last_status=SERVING, max_wait=5))
    memory.flush()
    memory.advance(4.9)
    assert not d.called
    memory.advance(0.2)
    assert call(memory, d).status == SERVING


def test_watch_answers_before_the_callers_deadline():
    memory, _ = provider()
    health = memory.proxy(HEALTH)
    d = health.Watch(HealthWatchRequest(last_status=SERVING), timeout=2)
    memory.flush()
    memory.advance(1.8)
    assert not d.called
    memory.advance(0.15)
    assert call(memory, d).status == SERVING  # not DEADLINE_EXCEEDED


def test_list_services():
    memory, _ = provider()
    reply = call(memory, memory.proxy(REFLECTION).ListServices(ListServicesRequest()))
    assert list(reply.services) == [
        "example.UserService",
        "mprpc.health.v1.Health",
        "mprpc.reflection.v1.Reflection",
        "mprpc.test.EchoService",
    ]


def test_descriptors_with_dependencies_build_a_working_client_side_pool():
    memory, _ = provider()
    reflection = memory.proxy(REFLECTION)
    reply = call(
        memory,
        reflection.FileContainingSymbol(FileDescriptorsRequest(symbol="example.UserService")),
    )
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in reply.file_descriptor_proto]
    assert [f.name for f in files] == ["protos/common.proto", "protos/user.proto"]
    pool = descriptor_pool.DescriptorPool()  # a client that never imported user_pb2
    for f in files:
        pool.Add(f)
    login = pool.FindServiceByName("example.UserService").methods_by_name["Login"]
    request = json_format.Parse(
        '{"name": "zhang san", "pwd": "123456"}', GetMessageClass(login.input_type)()
    )
    assert request.SerializeToString() == b"\n\tzhang san\x12\x06123456"


def test_unknown_symbol_is_not_found():
    memory, _ = provider()
    d = memory.proxy(REFLECTION).FileContainingSymbol(FileDescriptorsRequest(symbol="no.Such"))
    with pytest.raises(NotFoundError, match="no.Such"):
        call(memory, d)
