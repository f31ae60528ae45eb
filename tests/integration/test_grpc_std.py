"""Integration: gRPC's standard services on a ``twistd mprpc`` provider.

On the native wire through the ``mprpc`` command; on the gRPC listener
(``[grpc] listen``) through **grpcio's own clients**: grpcio-health-checking's
``HealthStub`` (a Kubernetes-style probe: Check ``""``, Watch through a
SIGTERM drain) and grpcio-reflection's ``ProtoReflectionDescriptorDatabase``
and ``ServerReflectionStub`` (what ``grpcurl list`` / ``describe`` do)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.processes import ROOT, SERVICES, Provider, environment

pytestmark = pytest.mark.integration

MPRPC = [sys.executable, "-c", "from twisted_rpc.ops._cli import main; main()"]
GRPC = "[grpc]\nlisten = tcp:0:interface=127.0.0.1\n"
_GRPC_LISTENING = r"(?i)grpc\S*\s+listen\w*\s+on\s+127\.0\.0\.1:(\d+)"


def mprpc(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MPRPC, *args],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


def has_grpc_listener() -> bool:
    """Whether this build reads ``[grpc] listen`` (the gRPC listener)."""
    from twisted_rpc.core import ConfigError
    from twisted_rpc.provider import load_provider_config

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "provider.ini"
        path.write_text(f"[provider]\nlisten = tcp:0\nservices = {SERVICES}\n{GRPC}")
        try:
            load_provider_config(str(path))
        except ConfigError as e:
            if "[grpc]" in str(e):
                return False
            raise
    return True


needs_grpc = pytest.mark.skipif(
    not has_grpc_listener(), reason="this build has no gRPC listener ([grpc] listen)"
)


def grpc_target(provider: Provider) -> str:
    return f"127.0.0.1:{provider.wait_for_output(_GRPC_LISTENING)[1]}"


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    extra = GRPC if has_grpc_listener() else ""
    provider = Provider(Path(tempfile.mkdtemp()), extra=extra)
    yield provider
    provider.stop()


# ---------------------------------------------------------------- the native wire


def test_grpc_health_on_the_native_wire(provider):
    done = mprpc("call", "grpc.health.v1.Health.Check", "{}", "--endpoint", provider.address)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": "SERVING"}
    missing = mprpc(
        "call",
        "grpc.health.v1.Health.Check",
        '{"service": "no.Such"}',
        "--endpoint",
        provider.address,
    )
    assert missing.returncode != 0
    assert "NOT_FOUND" in missing.stderr and "no.Such" in missing.stderr


def test_grpc_reflection_on_the_native_wire(provider):
    done = mprpc(
        "call",
        "grpc.reflection.v1.ServerReflection.ServerReflectionInfo",
        "--endpoint",
        provider.address,
        stdin='{"list_services": ""}\n{"file_containing_symbol": "no.Such"}\n',
    )
    assert done.returncode == 0, done.stderr
    listed, missing = (json.loads(line) for line in done.stdout.splitlines())
    names = [s["name"] for s in listed["list_services_response"]["service"]]
    assert {"example.UserService", "grpc.health.v1.Health"} <= set(names)
    assert missing["error_response"] == {
        "error_code": 5,
        "error_message": "no symbol 'no.Such' here",
    }
    described = mprpc(
        "describe", "grpc.reflection.v1alpha.ServerReflection", "--endpoint", provider.address
    )
    assert described.returncode == 0, described.stderr
    assert (
        "rpc ServerReflectionInfo(stream grpc.reflection.v1alpha.ServerReflectionRequest)"
        " returns (stream grpc.reflection.v1alpha.ServerReflectionResponse);"
    ) in described.stdout


# ---------------------------------------------------------------- grpcio's clients


@needs_grpc
def test_a_kubernetes_style_probe_checks_serving(provider):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for _ in range(3):  # a probe: a fresh connection each time
        with grpc.insecure_channel(grpc_target(provider)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(grpc_target(provider)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service="example.UserService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()


@needs_grpc
def test_reflection_lists_services_and_resolves_methods(provider):
    import grpc
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(grpc_target(provider)) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert {
            "example.UserService",
            "example.FriendService",
            "mprpc.test.EchoService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection",
        } <= set(services)
        pool = DescriptorPool(database)
        users = pool.FindServiceByName("example.UserService")
        login = users.methods_by_name["Login"]
        assert login.input_type.full_name == "example.LoginRequest"
        result = login.output_type.fields_by_name["result"].message_type
        assert (
            result.full_name == "example.ResultCode"
        )  # from examples/protos/common.proto, a dependency
        assert pool.FindMethodByName("example.FriendService.GetFriendsList").containing_service
        health = pool.FindServiceByName("grpc.health.v1.Health")
        assert health.methods_by_name["Watch"].server_streaming
        assert health.file.name == "grpc/health/v1/health.proto"


@needs_grpc
def test_reflection_stubs_of_both_versions(provider):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="examples/protos/user.proto"),
    ]
    with grpc.insecure_channel(grpc_target(provider)) as channel:
        v1alpha = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        # grpc.reflection.v1 has the same messages in another package: the same bytes.
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        for call in (v1alpha, v1):
            listed, missing, user = list(call(iter(requests), timeout=10))
            assert "example.UserService" in {s.name for s in listed.list_services_response.service}
            assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
            assert len(user.file_descriptor_response.file_descriptor_proto) == 2  # with common


@needs_grpc
def test_health_during_a_sigterm_drain(tmp_path):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    provider = Provider(tmp_path, extra=f"grace_period = 10\n{GRPC}")
    try:
        target = grpc_target(provider)
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            provider.signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # A probe now is told NOT_SERVING, or finds the listener gone: never SERVING.
            with grpc.insecure_channel(target) as probe:
                try:
                    status = (
                        health_pb2_grpc.HealthStub(probe)
                        .Check(health_pb2.HealthCheckRequest(), timeout=5)
                        .status
                    )
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                else:
                    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # the drain waits for no one now
        assert provider.wait(15) is not None, provider.output  # (twistd dies by SIGTERM: -15)
        assert "Server Shut Down" in provider.output
        assert "grace period over" not in provider.output  # the cancelled Watch held nothing
    finally:
        provider.stop()
