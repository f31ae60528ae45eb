"""The built-in Health and Reflection services, in memory with a Clock."""

from __future__ import annotations

import time

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from twisted.internet.defer import CancelledError

from examples.user.callee import UserService
from testbed.echo_service import EchoService
from twisted_rpc import InvalidArgumentError, NotFoundError
from twisted_rpc.ops import NOT_SERVING, SERVICE_UNKNOWN, SERVING, HealthService, HealthState
from twisted_rpc.ops._health import DEFAULT_WATCH_WAIT, MAX_WATCH_WAIT
from twisted_rpc.ops._protos import (
    HEALTH,
    REFLECTION,
    FileDescriptorsRequest,
    HealthCheckRequest,
    HealthWatchRequest,
    ListServicesRequest,
)
from twisted_rpc.ops._reflection import MAX_SYMBOL_LENGTH
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
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
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
    assert [f.name for f in files] == ["examples/protos/common.proto", "examples/protos/user.proto"]
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


def test_watch_max_wait_is_capped():
    memory, _ = provider()
    health = memory.proxy(HEALTH)
    calls = [
        health.Watch(HealthWatchRequest(last_status=SERVING, max_wait=wait))
        for wait in (1e9, float("inf"))
    ]
    memory.flush()
    memory.advance(MAX_WATCH_WAIT - 0.1)
    assert not any(d.called for d in calls)
    memory.advance(0.2)
    assert [call(memory, d).status for d in calls] == [SERVING, SERVING]
    assert memory.health.watching == 0


def test_watch_with_nan_max_wait_uses_the_default():
    memory, _ = provider()
    d = memory.proxy(HEALTH).Watch(HealthWatchRequest(last_status=SERVING, max_wait=float("nan")))
    memory.flush()
    memory.advance(DEFAULT_WATCH_WAIT - 0.1)
    assert not d.called
    memory.advance(0.2)
    assert call(memory, d).status == SERVING


def test_watch_is_a_long_lived_method():
    assert HealthService.long_lived_methods == frozenset({"Watch"})


def test_forgetting_many_watchers_is_linear():
    state = HealthState()
    watchers = [state.changed("", SERVING) for _ in range(20_000)]
    for d in watchers:
        d.addErrback(lambda f: f.trap(CancelledError))
    assert state.watching == 20_000
    started = time.perf_counter()
    for d in reversed(watchers):  # newest first: the worst order for a list scan
        d.cancel()
    elapsed = time.perf_counter() - started
    assert state.watching == 0
    assert elapsed < 1.0, f"cancelling 20,000 watchers took {elapsed:.2f} s"


def test_a_watcher_cancelled_while_others_are_woken_is_skipped():
    state = HealthState()
    first, second = state.changed("", SERVING), state.changed("", SERVING)
    second.addErrback(lambda f: f.trap(CancelledError))
    first.addCallback(lambda _: second.cancel())
    state.set("", NOT_SERVING)
    assert first.called and second.called
    assert state.watching == 0


def test_huge_symbol_is_an_invalid_argument_and_not_echoed():
    memory, _ = provider()
    symbol = "x" * (10 * 1024 * 1024)
    d = memory.proxy(REFLECTION).FileContainingSymbol(FileDescriptorsRequest(symbol=symbol))
    with pytest.raises(InvalidArgumentError) as raised:
        call(memory, d)
    assert str(MAX_SYMBOL_LENGTH) in raised.value.message
    assert len(raised.value.message) < 300


def test_not_found_quotes_at_most_a_bounded_part_of_the_symbol():
    memory, _ = provider()
    symbol = "no.Such" + "x" * (MAX_SYMBOL_LENGTH - 7)
    d = memory.proxy(REFLECTION).FileContainingSymbol(FileDescriptorsRequest(symbol=symbol))
    with pytest.raises(NotFoundError, match="no.Such") as raised:
        call(memory, d)
    assert f"{MAX_SYMBOL_LENGTH} characters" in raised.value.message
    assert len(raised.value.message) < 300
