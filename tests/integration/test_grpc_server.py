"""Interop: grpcio clients (sync and aio) call a real ``twistd mprpc``
provider's gRPC listener (``[grpc] listen``); bad input on its port.

grpcio is a client no one here wrote: every call kind, deadlines, errors,
metadata both ways, cancellation reaching the handler, TLS with ALPN h2;
then garbage, HTTP/1.1, an overlong frame, a HEADERS flood, a stream never
ended and a zero window on the same port, with a good client still served
and the provider's memory bounded. Each provider is stopped by PID.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from testbed.echo_service import STREAMS
from testbed.processes import Provider
from testbed.protos import echo_pb2
from twisted_rpc import Service

pytestmark = pytest.mark.integration

SERVICES = "testbed.echo_service:EchoService testbed.echo_service:StreamService"
TLS_SERVICES = "testbed.echo_service:EchoService tests.integration.test_grpc_server:MetadataService"
GRPC = "[grpc]\nlisten = tcp:0:interface=127.0.0.1\n"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class MetadataService(Service, descriptor=STREAMS):
    """StreamService's Chat, sending the request's metadata back as initial and
    trailing metadata (served by the TLS provider, without StreamService)."""

    async def Chat(self, requests, context):  # type: ignore[no-untyped-def]
        context.send_initial_metadata(context.metadata)
        context.set_trailing_metadata({f"t-{k}": v for k, v in context.metadata.items()})
        async for request in requests:
            yield echo_pb2.EchoReply(payload=request.payload)


def grpc_port(provider: Provider) -> int:
    return int(provider.wait_for_output(r"gRPC listener on 127\.0\.0\.1:(\d+)")[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    started = Provider(Path(tempfile.mkdtemp(prefix="grpc-")), GRPC, services=SERVICES)
    try:
        started.grpc_port = grpc_port(started)  # type: ignore[attr-defined]
        yield started
    finally:
        started.stop()


@pytest.fixture
def channel(provider: Provider) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{provider.grpc_port}") as ch:  # type: ignore[attr-defined]
        yield ch


def unary(channel: grpc.Channel, method: str, response=echo_pb2.EchoReply):
    return channel.unary_unary(
        f"/mprpc.test.EchoService/{method}",
        request_serializer=echo_pb2.EchoRequest.SerializeToString,
        response_deserializer=response.FromString,
    )


def streams(channel, kind: str, method: str, request=echo_pb2.EchoRequest):
    return getattr(channel, kind)(
        f"/mprpc.test.StreamService/{method}",
        request_serializer=request.SerializeToString,
        response_deserializer=echo_pb2.EchoReply.FromString,
    )


# ----------------------------------------------------------------- grpcio sync


def test_unary_with_text_and_binary_metadata(channel, provider):
    reply, call = unary(channel, "Echo").with_call(
        echo_pb2.EchoRequest(payload=b"hello"),
        metadata=[("x-trace", "abc"), ("blob-bin", b"\x00\xff\x01")],
        timeout=5,
    )
    assert (reply.payload, reply.pid) == (b"hello", provider.pid)
    assert reply.metadata["x-trace"] == "abc"
    assert reply.metadata["blob-bin"].encode("latin-1") == b"\x00\xff\x01"
    assert call.code() == grpc.StatusCode.OK


def test_not_found_keeps_its_message(channel):
    with pytest.raises(grpc.RpcError) as raised:
        unary(channel, "Echo")(
            echo_pb2.EchoRequest(fail_code=5, fail_message="no user 7"), timeout=5
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "no user 7"


def test_unknown_method_is_unimplemented(channel):
    with pytest.raises(grpc.RpcError) as raised:
        unary(channel, "NoSuchMethod")(echo_pb2.EchoRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_deadline_is_deadline_exceeded(channel):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        unary(channel, "AsyncEcho")(echo_pb2.EchoRequest(delay=3), timeout=0.3)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2


def test_server_stream(channel):
    count = streams(channel, "unary_stream", "Count", echo_pb2.CountRequest)
    got = [r.call_id for r in count(echo_pb2.CountRequest(count=2000, payload_size=64), timeout=30)]
    assert got == list(range(2000))


def test_client_stream_and_trailing_metadata(channel):
    total = streams(channel, "stream_unary", "Sum")
    requests = iter([echo_pb2.EchoRequest(payload=b"x" * 1000)] * 3000)
    reply, call = total.with_call(requests, timeout=30)
    assert reply.payload == b"3000000"
    assert dict(call.trailing_metadata()) == {"count": "3000"}


def test_bidi_initial_metadata(channel):
    chat = channel.stream_stream(
        "/mprpc.test.StreamService/Chat",
        request_serializer=echo_pb2.EchoRequest.SerializeToString,
        response_deserializer=echo_pb2.EchoReply.FromString,
    )
    requests = iter([echo_pb2.EchoRequest(payload=b"%d" % i) for i in range(50)])
    call = chat(requests, metadata=[("hello", "there")], timeout=10)
    assert [r.payload for r in call] == [b"%d" % i for i in range(50)]
    assert dict(call.initial_metadata()) == {"hello": "there"}


def test_cancellation_reaches_the_handler(channel):
    count = streams(channel, "unary_stream", "Count", echo_pb2.CountRequest)
    # (Paced: a stream of tiny messages sent as fast as the windows allow
    # fills the socket buffers, and on a loaded machine the client then takes
    # seconds to drain them before the Ends answer behind them on the same
    # connection; the cancellation is what this test is about.)
    call = count(echo_pb2.CountRequest(forever=True, tag="grpc-cancel", delay=0.001), timeout=30)
    assert next(call).call_id == 0
    call.cancel()
    ends = streams(channel, "unary_unary", "Ends", echo_pb2.CountRequest)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = ends(echo_pb2.CountRequest(), timeout=5).metadata.get("grpc-cancel")
        if seen:
            break
        time.sleep(0.05)
    assert seen == "closed"


# ----------------------------------------------------------------- grpcio aio


def test_aio_client_every_kind_and_metadata_both_ways(provider):
    async def run() -> None:
        target = f"127.0.0.1:{provider.grpc_port}"  # type: ignore[attr-defined]
        async with grpc.aio.insecure_channel(target) as ch:
            echo = unary(ch, "Echo")
            replies = await asyncio.gather(
                *[echo(echo_pb2.EchoRequest(payload=b"%d" % i), timeout=5) for i in range(200)]
            )
            assert [r.payload for r in replies] == [b"%d" % i for i in range(200)]
            count = streams(ch, "unary_stream", "Count", echo_pb2.CountRequest)
            got = [r.call_id async for r in count(echo_pb2.CountRequest(count=300), timeout=10)]
            assert got == list(range(300))
            chat = ch.stream_stream(
                "/mprpc.test.StreamService/Chat",
                request_serializer=echo_pb2.EchoRequest.SerializeToString,
                response_deserializer=echo_pb2.EchoReply.FromString,
            )

            async def requests():
                for i in range(20):
                    yield echo_pb2.EchoRequest(payload=b"%d" % i)

            call = chat(requests(), metadata=[("hello", "aio")], timeout=10)
            assert [r.payload async for r in call] == [b"%d" % i for i in range(20)]
            assert dict(await call.initial_metadata()) == {"hello": "aio"}
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await unary(ch, "AsyncEcho")(echo_pb2.EchoRequest(delay=3), timeout=0.2)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(run())


# ----------------------------------------------------------------- TLS, metadata both ways


@pytest.fixture(scope="module")
def tls() -> Iterator[tuple[Provider, bytes]]:
    from tests.integration.test_tls import issue, make_ca

    directory = Path(tempfile.mkdtemp(prefix="grpc-tls-"))
    ca = make_ca(directory, "grpc-ca")
    cert, key = issue(directory, ca, "provider", ip="127.0.0.1")
    extra = f"{GRPC}[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
    started = Provider(directory, extra, services=TLS_SERVICES)
    try:
        started.grpc_port = grpc_port(started)  # type: ignore[attr-defined]
        yield started, Path(ca[2]).read_bytes()
    finally:
        started.stop()


def test_tls_with_alpn_h2_and_metadata_both_ways(tls):
    provider, ca_pem = tls
    value = b"\x00\x01\x7f" + "\u00e9".encode()  # binary, and UTF-8 (see docs/grpc.md)

    async def run() -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        target = f"127.0.0.1:{provider.grpc_port}"  # type: ignore[attr-defined]
        async with grpc.aio.secure_channel(target, credentials) as ch:
            reply = await unary(ch, "Echo")(echo_pb2.EchoRequest(payload=b"tls"), timeout=5)
            assert reply.payload == b"tls"
            chat = ch.stream_stream(
                "/mprpc.test.StreamService/Chat",
                request_serializer=echo_pb2.EchoRequest.SerializeToString,
                response_deserializer=echo_pb2.EchoReply.FromString,
            )
            sent = [("k", "text value"), ("raw-bin", value)]
            call = chat(iter([echo_pb2.EchoRequest(payload=b"1")]), metadata=sent, timeout=10)
            assert [r.payload async for r in call] == [b"1"]
            initial = dict(await call.initial_metadata())
            trailing = dict(await call.trailing_metadata())
            assert (initial["k"], initial["raw-bin"]) == ("text value", value)
            assert (trailing["t-k"], trailing["t-raw-bin"]) == ("text value", value)

    asyncio.run(run())
    with grpc.insecure_channel(f"127.0.0.1:{provider.grpc_port}") as plain:  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as raised:
            unary(plain, "Echo")(echo_pb2.EchoRequest(), timeout=3)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


# ----------------------------------------------------------------- bad input


def exchange(port: int, data: bytes, wait: float = 2.0) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection; what came back within ``wait``
    seconds, and whether the provider closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return b"", True
        got = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return got, False
            except OSError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
        return got, False


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of the HTTP/2 frames in ``data``."""
    out = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        kind, stream_id = data[3], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        out.append((kind, stream_id, data[9 : 9 + length]))
        data = data[9 + length :]
    return out


def goaway_code(data: bytes) -> int | None:
    for kind, _, payload in frames(data):
        if kind == 7:
            return struct.unpack("!II", payload[:8])[1]
    return None


def headers_frame(stream_id: int, block: bytes, end_stream: bool) -> bytes:
    flags = 0x4 | (0x1 if end_stream else 0)
    return (
        struct.pack("!I", len(block))[1:] + bytes([1, flags]) + struct.pack("!I", stream_id) + block
    )


def request_block() -> bytes:
    from hpack import Encoder

    return Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/mprpc.test.EchoService/Echo"),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
        ]
    )


def test_bad_input_gets_an_http2_error_and_others_are_served(provider, channel):
    port = provider.grpc_port  # type: ignore[attr-defined]
    before = rss_kib(provider.pid)
    got, closed = exchange(port, b"\x16\x03\x01garbage" * 10)
    assert goaway_code(got) == 1 and closed  # PROTOCOL_ERROR
    got, closed = exchange(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert goaway_code(got) == 1 and closed
    huge = struct.pack("!I", 16 * 1024 * 1024 - 1)[1:] + b"\x00\x00\x00\x00\x00\x01"
    got, closed = exchange(port, PREFACE + EMPTY_SETTINGS + huge + b"x" * 100_000)
    assert goaway_code(got) == 6 and closed  # FRAME_SIZE_ERROR, before 16 MiB are held
    block = request_block()
    flood = b"".join(headers_frame(2 * n + 1, block, False) for n in range(2000))
    got, closed = exchange(port, PREFACE + EMPTY_SETTINGS + flood)
    assert goaway_code(got) == 1 and closed  # past MAX_CONCURRENT_STREAMS
    # A stream opened and never ended: it waits (frame_timeout), the connection lives.
    got, closed = exchange(port, PREFACE + EMPTY_SETTINGS + headers_frame(1, block, False), 1.0)
    assert not closed and goaway_code(got) is None
    # SETTINGS with a zero window: the answer's HEADERS come, its DATA waits.
    zero = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + struct.pack("!HI", 4, 0)
    request = headers_frame(1, block, False)
    message = b"\x00\x00\x00\x00\x02\x0a\x00"  # an EchoRequest, framed
    data_frame = struct.pack("!I", len(message))[1:] + b"\x00\x01" + struct.pack("!I", 1) + message
    got, closed = exchange(port, PREFACE + zero + request + data_frame, 1.0)
    kinds = [kind for kind, stream_id, _ in frames(got) if stream_id == 1]
    assert kinds == [1] and not closed  # HEADERS only: no DATA past a zero window
    reply = unary(channel, "Echo")(echo_pb2.EchoRequest(payload=b"still here"), timeout=5)
    assert reply.payload == b"still here"
    grown = rss_kib(provider.pid) - before
    print(f"\n[grpc-bad-input] provider RSS grew {grown} KiB")
    assert grown < 64 * 1024
