"""Compression on the native wire: the flag, the codec, negotiation, bombs."""

from __future__ import annotations

import time
import tracemalloc
import zlib

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import ECHO, EchoService, StreamService
from testbed.protos import echo_pb2
from tests.helpers import ServerConn, TwoProviders, frames_of, result
from twisted_rpc import Dispatcher
from twisted_rpc.client import ClientConnection, ClientOptions
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._codec import FLAG_COMPRESSED, FrameDecoder, FrameKind, ProtocolError
from twisted_rpc.core._compress import (
    CompressionError,
    available_encodings,
    check_encoding,
    compress_frame,
    inflate,
    parse_encodings,
)
from twisted_rpc.server import ServerFactory

METHOD = describe(ECHO).methods["Echo"]
GOLDEN = bytes.fromhex(
    "0000002a"
    "02"
    "04"
    "0000"
    "00000007"
    "00000000"
    "0000"  # RESPONSE, flags COMPRESSED, id 7
    "01"  # encoding 1: zlib
    "7801cb48cdc9c957c818254743603404464360d0870000557eb8b0"  # zlib("hello " * 200)
)


def _zlib_bomb(mebibytes: int) -> bytes:
    """zlib bytes inflating to ``mebibytes`` MiB of zeros, built without
    compressing them all: after a full flush each MiB's bytes are the same."""
    co = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    first = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    again = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    return first + again * (mebibytes - 1) + co.flush()


# --------------------------------------------------------------------------- codec


def test_a_compressed_frame_byte_by_byte():
    payload = b"hello " * 200
    header, packed, size = compress_frame(wire.encode_response(7, len(payload)), payload, "zlib")
    assert header + packed == GOLDEN
    assert size == len(packed) == 28
    with pytest.raises(ProtocolError, match="compressed frame of kind 2"):
        frames_of(GOLDEN)
    frames = []
    decoder = FrameDecoder(frames.append)
    decoder.inflate = lambda data, limit: inflate(data, limit, ("zlib",))
    assert decoder.feed(GOLDEN) == len(GOLDEN)
    assert frames[0].flags == FLAG_COMPRESSED and frames[0].payload == payload


def test_a_payload_compression_does_not_shrink_is_sent_as_it_is():
    payload = bytes(range(256))
    header = wire.encode_message(3, len(payload))
    assert compress_frame(header, payload, "zlib") == (header, payload, len(payload))


def test_only_request_response_and_message_may_be_compressed():
    header = bytearray(wire.encode_cancel(5))
    header[5] |= FLAG_COMPRESSED
    decoder = FrameDecoder(lambda f: None)
    decoder.inflate = lambda data, limit: b""
    with pytest.raises(ProtocolError, match="kind 3"):
        decoder.feed(bytes(header))


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "without an encoding byte"),
        (b"\x02" + zlib.compress(b"x"), "encoding 2"),
        (b"\x09abc", "encoding 9"),
        (b"\x01not zlib", "corrupt zlib"),
        (b"\x01" + zlib.compress(b"x" * 100)[:-3], "truncated"),
        (b"\x01" + zlib.compress(b"x") + b"junk", "trailing"),
    ],
)
def test_bad_compressed_payloads_are_refused(payload, why):
    with pytest.raises(CompressionError, match=why):
        inflate(payload, 1 << 20, ("zlib",))


def test_a_bomb_is_refused_once_past_the_limit_in_bounded_time_and_memory():
    bomb = b"\x01" + _zlib_bomb(10 * 1024)  # ~10 MiB inflating to 10 GiB
    limit = 4 << 20
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CompressionError, match=f"past the limit of {limit}"):
            inflate(bomb, limit, ("zlib",))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 3 * limit  # the limit's output (and its doubling buffer), not 10 GiB


def test_settings_values():
    assert available_encodings()[0] == "zlib"
    assert parse_encodings("br, zlib ,lz4") == ("zlib",)
    assert parse_encodings(None) == parse_encodings("") == ()
    assert check_encoding(None) is None and check_encoding("zlib") == "zlib"
    with pytest.raises(ValueError, match="one of zlib, zstd"):
        check_encoding("gzip")
    with pytest.raises(TypeError):
        check_encoding(1)
    if "zstd" not in available_encodings():
        with pytest.raises(ValueError, match="zstandard"):
            ClientOptions(compression="zstd")
    with pytest.raises(ValueError, match="compression_threshold"):
        ClientOptions(compression="zlib", compression_threshold=-1)


# --------------------------------------------------------------------------- connections


class _Pair:
    """A consumer and a provider connection on StringTransports, bytes moved
    between them by :meth:`pump`, which counts them."""

    def __init__(self, compression: str | None = "zlib", **options):
        self.clock = Clock()
        factory = ServerFactory(Dispatcher([EchoService(), StreamService()]), self.clock)
        self.factory = factory
        self.server = ServerConn(factory)
        self.client = ClientConnection(
            self.clock, ClientOptions(compression=compression, **options)
        )
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.up = self.down = 0
        self.seen_up: list[bytes] = []
        self.seen_down: list[bytes] = []
        self.client.ping()
        self.pump()

    def pump(self) -> None:
        for _ in range(50):
            up, down = self.transport.value(), self.server.transport.value()
            self.transport.clear()
            self.server.transport.clear()
            if not up and not down:
                return
            self.up += len(up)
            self.down += len(down)
            self.seen_up.append(up)
            self.seen_down.append(down)
            if up:
                self.server.proto.dataReceived(up)
            if down:
                self.client.dataReceived(down)
        raise AssertionError("still talking after 50 rounds")


def _flags(chunks: list[bytes], kind: int) -> list[int]:
    frames = frames_of_any(b"".join(chunks))
    return [f.flags for f in frames if f.kind == kind]


def frames_of_any(data: bytes):
    frames = []
    decoder = FrameDecoder(frames.append, max_ext_size=1 << 20)
    decoder.inflate = lambda payload, limit: inflate(payload, limit, ("zlib",))
    decoder.feed(data)
    return frames


def test_both_ends_tell_their_encodings_and_a_mib_crosses_in_a_fifth_of_its_bytes():
    pair = _Pair()
    assert pair.client.peer_settings["encodings"] == "zlib"
    assert pair.server.proto.peer_settings["encodings"] == "zlib"
    payload = (b"twisted_rpc compresses repetitive messages. " * 30000)[: 1 << 20]
    pair.up = pair.down = 0
    d = pair.client.call(METHOD, echo_pb2.EchoRequest(payload=payload))
    pair.pump()
    assert result(d).payload == payload
    assert pair.up <= len(payload) / 5 and pair.down <= len(payload) / 5
    assert _flags(pair.seen_up, FrameKind.REQUEST)[-1] & FLAG_COMPRESSED
    assert _flags(pair.seen_down, FrameKind.RESPONSE)[-1] & FLAG_COMPRESSED
    assert pair.client.bytes_uncompressed > 5 * pair.client.bytes_compressed > 0


def test_small_payloads_stay_uncompressed():
    pair = _Pair(compression_threshold=4096)
    d = pair.client.call(METHOD, echo_pb2.EchoRequest(payload=b"a" * 2000))
    pair.pump()
    assert result(d).payload == b"a" * 2000
    assert _flags(pair.seen_up, FrameKind.REQUEST) == [0]
    assert _flags(pair.seen_down, FrameKind.RESPONSE) == [0]


def test_a_consumer_that_does_not_ask_tells_nothing_and_gets_nothing_compressed():
    pair = _Pair(compression=None)
    assert "encodings" not in pair.client.peer_settings
    assert pair.server.proto.peer_settings is not None
    assert "encodings" not in pair.server.proto.peer_settings
    d = pair.client.call(METHOD, echo_pb2.EchoRequest(payload=b"z" * 100_000))
    pair.pump()
    assert result(d).payload == b"z" * 100_000
    assert pair.up > 100_000 and pair.down > 100_000
    assert _flags(pair.seen_down, FrameKind.RESPONSE) == [0]


def test_an_older_provider_that_tells_no_encodings_is_never_sent_compressed():
    clock = Clock()
    client = ClientConnection(clock, ClientOptions(compression="zlib"))
    transport = StringTransport()
    client.makeConnection(transport)
    client.ping()
    (ping,) = frames_of(transport.value())
    assert ping.metadata["encodings"] == "zlib"
    transport.clear()
    client.dataReceived(wire.encode_pong(ping.call_id, b"", {"streams": "1"}))
    client.call(METHOD, echo_pb2.EchoRequest(payload=b"q" * 50_000))
    (request,) = frames_of(transport.value())
    assert request.flags == 0 and len(request.payload) > 50_000


def test_a_provider_answers_compressed_only_after_a_compressed_request():
    pair = _Pair()
    proto = pair.server.proto
    big = echo_pb2.EchoRequest(payload=b"r" * 5000).SerializeToString()
    proto.dataReceived(wire.encode_request(1001, METHOD.route, len(big)) + big)
    (answer,) = pair.server.frames()
    assert answer.flags == 0  # the consumer has not compressed yet
    header, packed, _ = compress_frame(
        wire.encode_request(1003, METHOD.route, len(big)), big, "zlib"
    )
    proto.dataReceived(header + packed)
    (answer,) = frames_of_any(pair.server.transport.value())
    assert answer.flags & FLAG_COMPRESSED
    assert echo_pb2.EchoReply.FromString(answer.payload).payload == b"r" * 5000


def test_stream_messages_are_compressed_both_ways():
    pair = _Pair()
    client, proto = pair.client, pair.server.proto
    client.send_stream_message(9, b"m" * 8000)
    (message,) = frames_of_any(pair.transport.value())
    pair.transport.clear()
    assert message.kind == FrameKind.MESSAGE and message.flags & FLAG_COMPRESSED
    assert message.payload == b"m" * 8000
    assert len(pair.seen_up[-1]) < 8000  # (the settings round: nothing compressed yet)
    # The provider's replies, once this consumer has sent it a compressed frame:
    big = echo_pb2.EchoRequest(payload=b"s" * 3000).SerializeToString()
    header, packed, _ = compress_frame(wire.encode_request(11, METHOD.route, len(big)), big, "zlib")
    proto.dataReceived(header + packed)
    pair.server.transport.clear()
    proto._write_message(13, b"n" * 8000)
    (reply,) = frames_of_any(pair.server.transport.value())
    assert reply.kind == FrameKind.MESSAGE and reply.flags & FLAG_COMPRESSED
    assert reply.payload == b"n" * 8000


def test_a_bomb_closes_its_connection_with_a_reason_and_the_provider_serves_others(logged):
    clock = Clock()
    factory = ServerFactory(Dispatcher([EchoService()]), clock, max_frame_size=16 << 20)
    bad, good = ServerConn(factory, port=1), ServerConn(factory, port=2)
    settings = {"streams": "1", "encodings": "zlib"}
    for conn in (bad, good):
        conn.proto.dataReceived(wire.encode_ping(1, b"", settings))
        conn.frames()
    bomb = b"\x01" + _zlib_bomb(10 * 1024)
    header = bytearray(wire.encode_request(1, METHOD.route, len(bomb)))
    header[5] |= FLAG_COMPRESSED
    started = time.perf_counter()
    bad.proto.dataReceived(bytes(header) + bomb)
    assert time.perf_counter() - started < 2.0
    assert bad.transport.disconnecting or bad.proto.closing or not bad.proto.connected
    assert any("inflates past the limit of 16777216" in str(e.get("why", "")) for e in logged)
    good.request(1, message=echo_pb2.EchoRequest(payload=b"ok"))
    (answer,) = good.frames()
    assert answer.status == 0
    assert echo_pb2.EchoReply.FromString(answer.payload).payload == b"ok"


def test_a_client_built_with_compression_compresses_through_its_channels():
    memory = TwoProviders(compression="zlib")
    proxy = memory.client.proxy(ECHO)
    memory.connect_all()
    payload = b"c" * 200_000
    d = proxy.Echo(echo_pb2.EchoRequest(payload=payload))
    memory.flush()
    assert result(d).payload == payload
    connections = [channel.protocol for channel in memory.client.channels.values()]
    assert sum(c.bytes_uncompressed for c in connections) == len(
        echo_pb2.EchoRequest(payload=payload).SerializeToString()
    )
    assert 0 < sum(c.bytes_compressed for c in connections) < 1000


def test_the_consumer_ini_takes_compression(tmp_path):
    import pytest

    from twisted_rpc import ConfigError, load_consumer_config

    path = tmp_path / "consumer.ini"
    path.write_text("[consumer]\ncompression = zlib\ncompression_threshold = 64\n")
    options = load_consumer_config(str(path)).options
    assert (options.compression, options.compression_threshold) == ("zlib", 64)
    (tmp_path / "plain.ini").write_text("[consumer]\n")
    assert load_consumer_config(str(tmp_path / "plain.ini")).options.compression is None
    path.write_text("[consumer]\ncompression = brotli\n")
    with pytest.raises(ConfigError, match="compression"):
        load_consumer_config(str(path))
