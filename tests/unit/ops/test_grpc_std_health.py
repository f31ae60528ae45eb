"""gRPC's ``grpc.health.v1.Health``, in memory with a Clock, through our own
client: the same health state as ``mprpc.health.v1.Health``."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message_factory import GetMessageClass
from twisted.internet.task import Clock

from examples.user.callee import UserService
from testbed.echo_service import EchoService
from twisted_rpc import (
    Client,
    Dispatcher,
    NotFoundError,
    ResourceExhaustedError,
    ServerLimits,
    StatusCode,
)
from twisted_rpc.ops import NOT_SERVING, SERVICE_UNKNOWN, SERVING, add_builtins
from twisted_rpc.ops._grpc_health import MAX_LISTED
from twisted_rpc.ops._grpc_protos import GRPC_HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA
from twisted_rpc.ops._protos import HEALTH, HealthCheckRequest
from twisted_rpc.testing import MemoryProvider

_messages = GRPC_HEALTH.file.message_types_by_name
CheckRequest = GetMessageClass(_messages["HealthCheckRequest"])
ListRequest = GetMessageClass(_messages["HealthListRequest"])
ADDRESS = f"127.0.0.1:{MemoryProvider.port}"


def provider(limits: ServerLimits | None = None) -> MemoryProvider:
    return MemoryProvider([EchoService(), UserService()], builtins=True, limits=limits)


def check(memory: MemoryProvider, service: str, descriptor: Any = GRPC_HEALTH) -> int:
    d = memory.proxy(descriptor).Check(
        (CheckRequest if descriptor is GRPC_HEALTH else HealthCheckRequest)(service=service)
    )
    memory.flush()
    return memory.result(d).status  # type: ignore[no-any-return]


def watch(memory: MemoryProvider, service: str = "") -> tuple[Any, list[int]]:
    stream = memory.proxy(GRPC_HEALTH).Watch(CheckRequest(service=service))
    seen: list[int] = []
    stream.on_message(lambda reply: seen.append(reply.status)).addErrback(lambda f: None)
    memory.flush()
    return stream, seen


def grpc_health(memory: MemoryProvider) -> Any:
    return memory.dispatcher.services[GRPC_HEALTH.full_name]


# ---------------------------------------------------------------- Check


def test_check_answers_from_the_same_state_as_our_health():
    memory = provider()
    for service in ["", "example.UserService", "grpc.health.v1.Health", "mprpc.health.v1.Health"]:
        assert check(memory, service) == SERVING
    memory.health.set("example.UserService", NOT_SERVING)
    assert check(memory, "example.UserService") == NOT_SERVING
    assert check(memory, "example.UserService", HEALTH) == NOT_SERVING  # ours agrees
    assert check(memory, "") == SERVING  # the provider as a whole is another entry


def test_check_of_an_unknown_service_is_not_found():
    memory = provider()
    with pytest.raises(NotFoundError, match="unknown service 'no.Such'"):
        check(memory, "no.Such")
    assert check(memory, "no.Such", HEALTH) == SERVICE_UNKNOWN  # ours answers in the message
    with pytest.raises(NotFoundError) as caught:  # a huge name is quoted cut
        check(memory, "x" * 100_000)
    assert "(100000 characters)" in caught.value.message
    assert len(caught.value.message) < 200


def test_check_during_a_drain_is_not_serving():
    memory = provider()
    memory.health.set_all(NOT_SERVING)  # what SIGTERM does first
    assert check(memory, "") == NOT_SERVING
    assert check(memory, "example.UserService") == NOT_SERVING


def test_the_official_generated_messages_call_it_unchanged():
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    memory = provider()
    official = health_pb2.DESCRIPTOR.services_by_name["Health"]
    d = memory.client.proxy(official).Check(health_pb2.HealthCheckRequest(service=""))
    memory.flush()
    reply = memory.result(d)
    assert type(reply) is health_pb2.HealthCheckResponse
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------- List


def test_list_answers_every_status():
    memory = provider()
    memory.health.set("example.UserService", NOT_SERVING)
    d = memory.proxy(GRPC_HEALTH).List(ListRequest())
    memory.flush()
    statuses = {name: r.status for name, r in memory.result(d).statuses.items()}
    assert statuses[""] == SERVING
    assert statuses["example.UserService"] == NOT_SERVING
    assert statuses["mprpc.test.EchoService"] == SERVING
    assert set(statuses) == {"", *memory.dispatcher.services}


def test_list_past_its_limit_is_resource_exhausted():
    memory = provider()
    for i in range(MAX_LISTED):
        memory.health.set(f"app.S{i}", SERVING)
    d = memory.proxy(GRPC_HEALTH).List(ListRequest())
    memory.flush()
    with pytest.raises(ResourceExhaustedError, match=f"at most {MAX_LISTED}"):
        memory.result(d)


# ---------------------------------------------------------------- Watch


def test_watch_sends_the_status_at_once_then_each_change():
    memory = provider()
    stream, seen = watch(memory, "example.UserService")
    assert seen == [SERVING]
    memory.advance(100)  # no change, no message
    memory.health.set("mprpc.test.EchoService", NOT_SERVING)  # another service
    memory.flush()
    assert seen == [SERVING]
    memory.health.set_all(NOT_SERVING)  # a drain
    memory.flush()
    memory.health.set("example.UserService", SERVING)
    memory.flush()
    assert seen == [SERVING, NOT_SERVING, SERVING]
    assert stream.code is None  # still open
    stream.cancel()
    memory.flush()
    assert (grpc_health(memory).watch_streams, memory.health.watching) == (0, 0)
    assert stream.code == StatusCode.CANCELLED


def test_watch_of_an_unknown_service_says_so_and_stays_open():
    memory = provider()
    stream, seen = watch(memory, "app.Later")
    assert seen == [SERVICE_UNKNOWN]
    assert stream.code is None
    memory.health.set("app.Later", SERVING)  # the service becomes known
    memory.flush()
    assert seen == [SERVICE_UNKNOWN, SERVING]
    stream.cancel()
    memory.flush()


def test_watch_handler_ends_when_the_connection_is_lost():
    memory = provider()
    streams = [watch(memory)[0] for _ in range(3)]
    assert (grpc_health(memory).watch_streams, memory.health.watching) == (3, 3)
    memory.break_connections()
    assert (grpc_health(memory).watch_streams, memory.health.watching) == (0, 0)
    assert memory.factory.streams_in_flight == 0
    assert all(s.code == StatusCode.UNAVAILABLE for s in streams)


def test_a_slow_watch_reader_holds_its_window_then_gets_the_latest_status():
    memory = provider()
    # A consumer granting 1 KiB a stream: a window of some 50 to 100 small messages.
    client = Client(
        memory.reactor, providers={GRPC_HEALTH.full_name: [ADDRESS]}, stream_window=1024
    )
    stream = client.proxy(GRPC_HEALTH).Watch(CheckRequest())
    stream.pauseProducing()
    memory.flush()
    for _ in range(1000):  # flapping while the reader is paused
        memory.health.set_all(NOT_SERVING)
        memory.health.set_all(SERVING)
        memory.flush()
    memory.health.set_all(NOT_SERVING)
    memory.flush()
    held = len(stream.inbox.messages)
    assert 1024 // 20 <= held <= 1024 // 10  # a window's worth, not one per change (2,001)
    seen: list[int] = []
    stream.on_message(lambda reply: seen.append(reply.status)).addErrback(lambda f: None)
    stream.resumeProducing()
    memory.flush()
    assert seen[0] == SERVING and seen[-1] == NOT_SERVING
    assert len(seen) <= held + 1  # the changes past the window came as the latest status
    stream.cancel()
    memory.flush()
    assert memory.health.watching == 0


def test_watch_streams_are_bounded_by_the_stream_limits():
    memory = provider(ServerLimits(max_streams_per_connection=2))
    held = [watch(memory)[0] for _ in range(2)]
    third, seen = watch(memory)
    assert seen == [] and third.code == StatusCode.RESOURCE_EXHAUSTED
    for stream in held:
        stream.cancel()
    memory.flush()
    assert grpc_health(memory).watch_streams == 0


# ---------------------------------------------------------------- served with our built-ins


def test_served_and_turned_off_with_our_builtins():
    names = {GRPC_HEALTH.full_name, REFLECTION_V1ALPHA.full_name, REFLECTION_V1.full_name}
    on = Dispatcher([EchoService()])
    state = add_builtins(on, Clock())
    assert names <= set(on.services)
    assert all(on.services[n].builtin for n in names)  # not announced in the registry
    assert state.check(GRPC_HEALTH.full_name) == SERVING
    off = Dispatcher([EchoService()])
    add_builtins(off, Clock(), health=False, reflection=False)
    assert not names & set(off.services)
    health_only = Dispatcher([EchoService()])
    add_builtins(health_only, Clock(), reflection=False)
    assert GRPC_HEALTH.full_name in health_only.services
    assert REFLECTION_V1.full_name not in health_only.services
