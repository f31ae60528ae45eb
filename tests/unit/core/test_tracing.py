"""OpenTelemetry tracing (core/_tracing.py): one trace across consumer ->
provider -> a downstream call, streams, errors, the switches, in memory
with the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace import StatusCode as SpanStatus

from examples.protos import user_pb2
from testbed.echo_service import ECHO, STREAMS, EchoService, StreamService
from testbed.protos import echo_pb2
from twisted_rpc import ClientOptions, ConfigError, ProviderOptions, RpcError, Service
from twisted_rpc.client import load_consumer_config
from twisted_rpc.core import MethodInfo
from twisted_rpc.core._tracing import ServerTracing
from twisted_rpc.provider import load_provider_config
from twisted_rpc.testing import MemoryProvider

USERS = user_pb2.DESCRIPTOR.services_by_name["UserService"]
EXPORTER = InMemorySpanExporter()


def _install_exporter() -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))


_install_exporter()


@pytest.fixture
def spans():
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


class Front(Service, descriptor=USERS):
    """Login calls EchoService.AsyncEcho downstream, through the same client."""

    client: Any = None

    async def Login(self, request, context):
        await self.client.proxy(ECHO).AsyncEcho(echo_pb2.EchoRequest(payload=b"down"))
        return user_pb2.LoginResponse(success=True)


class Streams(StreamService):
    """Count makes a downstream call from inside the streaming handler first."""

    client: Any = None

    async def Count(self, request, context):  # type: ignore[no-untyped-def]
        await self.client.proxy(ECHO).Echo(echo_pb2.EchoRequest(payload=b"down"))
        async for reply in super().Count(request, context):
            yield reply


def _served(tracing: bool = True) -> MemoryProvider:
    front, streams = Front(), Streams()
    memory = MemoryProvider([front, EchoService(), streams], tracing=tracing)
    front.client = streams.client = memory.client
    return memory


def _by_name(finished: tuple[ReadableSpan, ...]) -> dict[tuple[str, SpanKind], ReadableSpan]:
    named = {(s.name, s.kind): s for s in finished}
    assert len(named) == len(finished), [s.name for s in finished]
    return named


def _parent_of(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.context is not None and parent.context is not None
    assert child.context.trace_id == parent.context.trace_id
    assert child.parent is not None
    assert child.parent.span_id == parent.context.span_id


def test_one_trace_from_the_consumer_through_the_provider_to_a_downstream_call(spans):
    memory = _served()
    d = memory.proxy(USERS).Login(user_pb2.LoginRequest(name="a"))
    memory.flush()
    assert memory.result(d).success
    named = _by_name(spans.get_finished_spans())
    login, echo = "example.UserService/Login", "mprpc.test.EchoService/AsyncEcho"
    assert set(named) == {
        (login, SpanKind.CLIENT),
        (login, SpanKind.SERVER),
        (echo, SpanKind.CLIENT),
        (echo, SpanKind.SERVER),
    }
    root = named[login, SpanKind.CLIENT]
    assert root.parent is None
    _parent_of(named[login, SpanKind.SERVER], root)
    _parent_of(named[echo, SpanKind.CLIENT], named[login, SpanKind.SERVER])
    _parent_of(named[echo, SpanKind.SERVER], named[echo, SpanKind.CLIENT])
    server = named[echo, SpanKind.SERVER]
    assert server.attributes is not None
    assert dict(server.attributes) == {
        "rpc.system": "twisted_rpc",
        "rpc.service": "mprpc.test.EchoService",
        "rpc.method": "AsyncEcho",
        "rpc.twisted_rpc.status_code": 0,
    }  # (in memory the transports have no IP addresses: see the next test)
    assert dict(root.attributes or {}) == {
        "rpc.system": "twisted_rpc",
        "rpc.service": "example.UserService",
        "rpc.method": "Login",
        "rpc.twisted_rpc.status_code": 0,
    }
    assert all(s.status.status_code == SpanStatus.UNSET for s in named.values())


def test_a_server_span_names_both_ends_of_a_tcp_connection(spans):
    from twisted.internet.address import IPv4Address, IPv6Address
    from twisted.internet.testing import StringTransport

    class Context:
        method = MethodInfo("a.B", "C", b"a.B/C", echo_pb2.EchoRequest, echo_pb2.EchoReply)
        metadata: dict[str, str] = {}
        connection = SimpleNamespace(
            transport=StringTransport(
                IPv6Address("TCP", "::1", 7000), IPv4Address("TCP", "10.0.0.9", 51000)
            )
        )

    tracer = ServerTracing()
    answer = echo_pb2.EchoReply(payload=b"a")
    assert tracer.intercept(echo_pb2.EchoRequest(), Context(), lambda r, c: answer) is answer
    (span,) = spans.get_finished_spans()
    assert span.kind == SpanKind.SERVER and span.name == "a.B/C"
    assert dict(span.attributes or {}) == {
        "rpc.system": "twisted_rpc",
        "rpc.service": "a.B",
        "rpc.method": "C",
        "rpc.twisted_rpc.status_code": 0,
        "server.address": "::1",
        "server.port": 7000,
        "network.peer.address": "10.0.0.9",
        "network.peer.port": 51000,
        "network.transport": "tcp",
        "network.type": "ipv6",
    }


@pytest.mark.parametrize(
    ("module", "system"),
    [
        ("twisted_rpc.grpc._server", "grpc"),
        ("twisted_rpc.cpp._listener", "mprpc"),
        ("twisted_rpc.server._connection", "twisted_rpc"),
    ],
)
def test_the_listener_s_wire_names_the_rpc_system(spans, module, system):
    connection = type("Connection", (), {"__module__": module})()

    class Context:
        method = MethodInfo("a.B", "C", b"a.B/C", echo_pb2.EchoRequest, echo_pb2.EchoReply)
        metadata: dict[str, str] = {}

    context = Context()
    context.connection = connection  # type: ignore[attr-defined]
    ServerTracing().intercept(echo_pb2.EchoRequest(), context, lambda r, c: None)
    (span,) = spans.get_finished_spans()
    assert (span.attributes or {})["rpc.system"] == system
    assert f"rpc.{system}.status_code" in (span.attributes or {})


def test_the_traceparent_travels_in_the_metadata_only_when_tracing_is_on(spans):
    for tracing in (True, False):
        memory = _served(tracing)
        d = memory.proxy(ECHO).Echo(echo_pb2.EchoRequest(), metadata={"own": "1"})
        memory.flush()
        metadata = dict(memory.result(d).metadata)
        assert ("traceparent" in metadata) is tracing
        assert metadata["own"] == "1"
    assert len(spans.get_finished_spans()) == 2  # the traced call's client and server spans
    assert _served(False).client.interceptors == []  # the hot path stays flat


def test_a_failed_call_has_an_error_status_and_its_code_on_both_sides(spans):
    memory = _served()
    d = memory.proxy(ECHO).Echo(echo_pb2.EchoRequest(fail_code=5, fail_message="gone"))
    memory.flush()
    with pytest.raises(RpcError):
        memory.result(d)
    finished = spans.get_finished_spans()
    assert {s.kind for s in finished} == {SpanKind.CLIENT, SpanKind.SERVER}
    for span in finished:
        assert span.status.status_code == SpanStatus.ERROR
        assert span.status.description == "NOT_FOUND: gone"
        assert (span.attributes or {})["rpc.twisted_rpc.status_code"] == 5


def test_a_crash_is_internal_on_the_provider_s_span(spans):
    memory = _served()
    d = memory.proxy(ECHO).Echo(echo_pb2.EchoRequest(crash=True))
    memory.flush()
    with pytest.raises(RpcError):
        memory.result(d)
    for span in spans.get_finished_spans():
        assert (span.attributes or {})["rpc.twisted_rpc.status_code"] == 13


def test_a_server_stream_has_a_span_from_start_to_end_and_its_handler_s_calls_join(spans):
    memory = _served()
    stream = memory.proxy(STREAMS).Count(echo_pb2.CountRequest(count=3))

    async def read_all() -> list[Any]:
        return [reply async for reply in stream]

    assert len(memory.run(read_all())) == 3
    memory.settle()
    named = _by_name(spans.get_finished_spans())
    count, echo = "mprpc.test.StreamService/Count", "mprpc.test.EchoService/Echo"
    _parent_of(named[count, SpanKind.SERVER], named[count, SpanKind.CLIENT])
    _parent_of(named[echo, SpanKind.CLIENT], named[count, SpanKind.SERVER])
    _parent_of(named[echo, SpanKind.SERVER], named[echo, SpanKind.CLIENT])
    server = named[count, SpanKind.SERVER]
    assert server.end_time is not None and server.start_time is not None
    assert named[echo, SpanKind.SERVER].end_time <= server.end_time  # type: ignore[operator]


def test_a_stream_open_has_no_ended_span_and_a_failed_one_an_error(spans):
    memory = _served()
    stream = memory.proxy(STREAMS).Count(echo_pb2.CountRequest(forever=True))
    memory.run(stream.read())
    count = "mprpc.test.StreamService/Count"
    assert (count, SpanKind.CLIENT) not in _by_name(spans.get_finished_spans())
    stream.cancel()
    memory.settle()
    named = _by_name(spans.get_finished_spans())
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        span = named[count, kind]
        assert span.status.status_code == SpanStatus.ERROR
        assert (span.attributes or {})["rpc.twisted_rpc.status_code"] == 1  # CANCELLED


def test_client_and_bidi_streams_are_traced(spans):
    memory = _served()
    proxy = memory.proxy(STREAMS)
    upload = proxy.Sum([echo_pb2.EchoRequest(payload=b"ab"), echo_pb2.EchoRequest(payload=b"c")])
    assert memory.run(upload.response()).payload == b"3"
    chat = proxy.Chat([echo_pb2.EchoRequest(payload=b"hi")])

    async def read_all() -> list[Any]:
        return [reply async for reply in chat]

    (reply,) = memory.run(read_all())
    assert "traceparent" in reply.metadata
    memory.settle()
    named = _by_name(spans.get_finished_spans())
    for method in ("Sum", "Chat"):
        name = f"mprpc.test.StreamService/{method}"
        _parent_of(named[name, SpanKind.SERVER], named[name, SpanKind.CLIENT])
        assert named[name, SpanKind.SERVER].status.status_code == SpanStatus.UNSET


def test_the_switches(tmp_path):
    assert ClientOptions(tracing=True).tracing
    with pytest.raises(TypeError, match="tracing must be True or False"):
        ClientOptions(tracing="yes")  # type: ignore[arg-type]
    options = ProviderOptions(listen="tcp:0", tracing=True)
    (tracer,) = options.dispatcher_interceptors([])
    assert type(tracer).__name__ == "ServerTracing"
    assert ProviderOptions(listen="tcp:0").dispatcher_interceptors([]) == []
    consumer = tmp_path / "consumer.ini"
    consumer.write_text("[consumer]\ntracing = opentelemetry\n")
    assert load_consumer_config(str(consumer)).options.tracing
    consumer.write_text("[consumer]\ntracing = zipkin\n")
    with pytest.raises(ConfigError, match=r"\[consumer\] tracing = 'zipkin' \(expected"):
        load_consumer_config(str(consumer))
    provider = tmp_path / "provider.ini"
    provider.write_text("[provider]\nlisten = tcp:0\nservices = a:B\ntracing = opentelemetry\n")
    assert load_provider_config(str(provider)).options().tracing
    provider.write_text("[provider]\nlisten = tcp:0\nservices = a:B\ntracing = none\n")
    assert not load_provider_config(str(provider)).options().tracing


def test_without_opentelemetry_the_package_imports_and_asking_for_tracing_says_what_to_install(
    tmp_path,
):
    ini = tmp_path / "consumer.ini"
    ini.write_text("[consumer]\ntracing = opentelemetry\n")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["opentelemetry"] = None  # as if not installed
        import twisted_rpc, twisted_rpc.testing, twisted_rpc.provider
        from twisted_rpc import Client, ConfigError
        from twisted_rpc.client import load_consumer_config
        try:
            load_consumer_config({str(ini)!r})
        except ConfigError as e:
            print("config:", e)
        try:
            Client(tracing=True)
        except ImportError as e:
            print("client:", e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "config: " in out and "client: " in out
    assert out.count("pip install 'twisted_rpc[otel]'") == 2, out
