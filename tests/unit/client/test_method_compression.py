"""Compression chosen per method (the service config's ``compression``) and
the provider's own settings (``ServerLimits.compression_threshold`` and
``compression``): bytes counted on StringTransports."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import ECHO, STREAMS, EchoService, StreamService
from testbed.protos import echo_pb2
from tests.helpers import ServerConn, TwoProviders, result
from tests.unit.core.test_compress import _flags, frames_of_any
from twisted_rpc import ConfigError, Dispatcher
from twisted_rpc.client import ClientConnection, ClientOptions
from twisted_rpc.client._routes import MethodEncodings
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._codec import FLAG_COMPRESSED, FrameKind
from twisted_rpc.core._compress import NEVER, compress_frame
from twisted_rpc.provider import load_provider_config
from twisted_rpc.server import ServerFactory, ServerLimits

ECHO_M = describe(ECHO).methods["Echo"]
ASYNC_M = describe(ECHO).methods["AsyncEcho"]
CHAT_M = describe(STREAMS).methods["Chat"]
MIB = (b"twisted_rpc compresses repetitive messages. " * 30000)[: 1 << 20]


def _config(**by_method: str) -> dict:
    return {
        "methodConfig": [
            {"name": [{"service": "mprpc.test." + m.split(".")[0], "method": m.split(".")[1]}]}
            | {"compression": c}
            for m, c in by_method.items()
        ]
    }


class _Pair:
    """A consumer and a provider connection; :meth:`call` counts the bytes
    each way and keeps the frames' flags."""

    def __init__(self, limits: ServerLimits | None = None, **options):
        self.clock = Clock()
        factory = ServerFactory(
            Dispatcher([EchoService(), StreamService()]), self.clock, limits=limits
        )
        self.server = ServerConn(factory)
        self.client = ClientConnection(self.clock, ClientOptions(**options))
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.client.ping()
        self.pump()

    def pump(self) -> tuple[bytes, bytes]:
        ups, downs = [], []
        for _ in range(50):
            up, down = self.transport.value(), self.server.transport.value()
            self.transport.clear()
            self.server.transport.clear()
            if not up and not down:
                return b"".join(ups), b"".join(downs)
            ups.append(up)
            downs.append(down)
            if up:
                self.server.proto.dataReceived(up)
            if down:
                self.client.dataReceived(down)
        raise AssertionError("still talking after 50 rounds")

    def call(self, method, payload: bytes) -> tuple[bytes, bytes]:
        d = self.client.call(method, echo_pb2.EchoRequest(payload=payload))
        up, down = self.pump()
        assert result(d).payload == payload
        return up, down


def _compressed(data: bytes, kind: int) -> list[bool]:
    return [bool(f & FLAG_COMPRESSED) for f in _flags([data], kind)]


def test_nothing_configured_leaves_the_send_path_as_it_was():
    pair = _Pair(service_config=_config(**{"EchoService.Echo": "identity"}))
    assert pair.client.encodings is None and pair.client.compress_min == NEVER
    assert "encodings" not in pair.client.peer_settings
    up, down = pair.call(ECHO_M, b"z" * 50_000)
    assert len(up) > 50_000 and len(down) > 50_000


def test_a_method_named_compresses_without_client_wide_compression_and_others_do_not():
    pair = _Pair(service_config=_config(**{"EchoService.Echo": "zlib"}))
    assert pair.server.proto.peer_settings["encodings"] == "zlib"  # offered for Echo's sake
    up, down = pair.call(ASYNC_M, MIB)
    assert _compressed(up, FrameKind.REQUEST) == [False] and len(up) > len(MIB)
    assert _compressed(down, FrameKind.RESPONSE) == [False]  # nothing compressed yet
    up, down = pair.call(ECHO_M, MIB)
    assert _compressed(up, FrameKind.REQUEST) == [True]
    assert _compressed(down, FrameKind.RESPONSE) == [True]
    assert len(up) <= len(MIB) / 5 and len(down) <= len(MIB) / 5
    up, down = pair.call(ASYNC_M, MIB)  # its requests stay as they are
    assert _compressed(up, FrameKind.REQUEST) == [False]
    assert _compressed(down, FrameKind.RESPONSE) == [True]  # the connection's rule


def test_identity_for_a_method_turns_it_off_under_client_wide_compression():
    pair = _Pair(
        compression="zlib", service_config=_config(**{"EchoService.AsyncEcho": "identity"})
    )
    up, _ = pair.call(ASYNC_M, MIB)
    assert _compressed(up, FrameKind.REQUEST) == [False] and len(up) > len(MIB)
    up, down = pair.call(ECHO_M, MIB)
    assert _compressed(up, FrameKind.REQUEST) == [True]
    assert len(up) <= len(MIB) / 5 and len(down) <= len(MIB) / 5


def test_a_method_s_encoding_the_provider_lacks_is_not_used():
    pair = _Pair(compression="zlib")
    pair.client.peer_encodings = ()  # (a provider that listed none of ours)
    up, _ = pair.call(ECHO_M, b"x" * 20_000)
    assert _compressed(up, FrameKind.REQUEST) == [False]


class _Stream:
    def __init__(self, method):
        self.method = method


def test_stream_messages_follow_their_method():
    pair = _Pair(compression="zlib", service_config=_config(**{"StreamService.Chat": "identity"}))
    client = pair.client
    client.streams[9] = _Stream(CHAT_M)
    client.streams[11] = _Stream(ECHO_M)
    client.send_stream_message(9, b"m" * 8000)
    client.send_stream_message(11, b"m" * 8000)
    client.send_stream_message(13, b"m" * 8000)  # (gone: the client's encoding)
    frames = frames_of_any(pair.transport.value())
    assert [(f.call_id, bool(f.flags & FLAG_COMPRESSED)) for f in frames] == [
        (9, False),
        (11, True),
        (13, True),
    ]
    assert all(f.payload == b"m" * 8000 for f in frames)


def test_a_client_s_proxies_compress_the_methods_its_config_names():
    memory = TwoProviders(service_config=_config(**{"EchoService.Echo": "zlib"}))
    proxy = memory.client.proxy(ECHO)
    memory.connect_all()
    request = echo_pb2.EchoRequest(payload=b"c" * 200_000)
    for stub in (proxy.AsyncEcho, proxy.Echo, proxy.AsyncEcho):
        d = stub(request)
        memory.flush()
        assert result(d).payload == request.payload
    connections = [channel.protocol for channel in memory.client.channels.values()]
    assert sum(c.bytes_uncompressed for c in connections) == request.ByteSize()  # Echo's only
    assert 0 < sum(c.bytes_compressed for c in connections) < 1000


def test_method_encodings_are_looked_up_once_per_route():
    options = ClientOptions(service_config=_config(**{"EchoService.Echo": "zlib"}))
    encodings = MethodEncodings.of(options)
    assert encodings is not None and encodings.wanted == ("zlib",)
    assert encodings(ECHO_M) == "zlib" and encodings(ASYNC_M) is None
    encodings.config = None  # (remembered: the config is not asked again)
    assert encodings(ECHO_M) == "zlib"
    assert MethodEncodings.of(ClientOptions()) is None
    both = MethodEncodings.of(
        ClientOptions(compression="zlib", service_config=_config(**{"EchoService.Echo": "zlib"}))
    )
    assert both is not None and both.wanted == ("zlib",)


# --------------------------------------------------------------------------- provider side


def _compressed_request(pair: _Pair, call_id: int, size: int) -> None:
    big = echo_pb2.EchoRequest(payload=b"r" * size).SerializeToString()
    header, packed, _ = compress_frame(
        wire.encode_request(call_id, ECHO_M.route, len(big)), big, "zlib"
    )
    pair.server.proto.dataReceived(header + packed)


def test_the_provider_threshold_reaches_its_connections():
    pair = _Pair(limits=ServerLimits(compression_threshold=10_000), compression="zlib")
    _compressed_request(pair, 1001, 5000)
    assert pair.server.proto.compress_min == 10_000
    _compressed_request(pair, 1003, 20_000)
    answers = frames_of_any(pair.server.transport.value())
    assert [(a.call_id, bool(a.flags & FLAG_COMPRESSED)) for a in answers] == [
        (1001, False),
        (1003, True),
    ]


def test_a_provider_set_to_identity_reads_compressed_requests_and_answers_plainly():
    pair = _Pair(limits=ServerLimits(compression="identity"), compression="zlib")
    up, down = pair.call(ECHO_M, MIB)
    assert _compressed(up, FrameKind.REQUEST) == [True]
    assert _compressed(down, FrameKind.RESPONSE) == [False] and len(down) > len(MIB)


def test_server_limits_check_the_compression_settings():
    assert ServerLimits().compression_threshold == 1024 and ServerLimits().compression is None
    assert ServerLimits(compression="zlib", compression_threshold=0).compression == "zlib"
    with pytest.raises(ValueError, match="compression_threshold must be an int >= 0"):
        ServerLimits(compression_threshold=-1)
    with pytest.raises(ValueError, match="compression_threshold"):
        ServerLimits(compression_threshold=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ServerLimits.compression must be one of.*identity"):
        ServerLimits(compression="gzip")
    with pytest.raises(ValueError, match="ServerLimits.compression must be an encoding"):
        ServerLimits(compression=1)  # type: ignore[arg-type]


def test_the_provider_ini_takes_the_compression_settings(tmp_path):
    path = tmp_path / "provider.ini"
    base = "[provider]\nlisten = tcp:0:interface=127.0.0.1\nservices = a.b:C\n"
    path.write_text(base + "compression = identity\ncompression_threshold = 4096\n")
    limits = load_provider_config(str(path)).limits
    assert (limits.compression, limits.compression_threshold) == ("identity", 4096)
    path.write_text(base)
    assert load_provider_config(str(path)).limits.compression is None
    path.write_text(base + "compression = brotli\n")
    with pytest.raises(ConfigError, match=r"\[provider\] ServerLimits.compression"):
        load_provider_config(str(path))
    path.write_text(base + "compression_threshold = -5\n")
    with pytest.raises(ConfigError, match="compression_threshold must be at least 0"):
        load_provider_config(str(path))
