"""The frame codec, byte for byte."""

from __future__ import annotations

import struct

import pytest

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import Frame, FrameDecoder, FrameKind, ProtocolError


def decode_all(data: bytes, chunk: int | None = None, max_frame_size: int = 1 << 20) -> list[Frame]:
    frames: list[Frame] = []
    decoder = FrameDecoder(frames.append, max_frame_size)
    if chunk is None:
        decoder.feed(data)
    else:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
    return frames


def test_request_bytes():
    header = wire.encode_request(7, b"example.UserService/Login", 3, timeout_ms=1500)
    assert header == (
        b"\x00\x00\x00\x2a"  # length: 14 + 25 route + 3 payload = 42
        b"\x01"  # REQUEST
        b"\x00"  # flags
        b"\x00\x00"  # status
        b"\x00\x00\x00\x07"  # call id
        b"\x00\x00\x05\xdc"  # timeout 1500 ms
        b"\x00\x19"  # route length 25
        b"example.UserService/Login"
    )


def test_response_and_status_bytes():
    assert (
        wire.encode_response(258, 2)
        == b"\x00\x00\x00\x10\x02\x00\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x00\x00"
    )
    frame = wire.encode_status(3, 5, "no")
    assert frame == (
        b"\x00\x00\x00\x19"  # 14 + 4 ext length + 7 ext
        b"\x02\x01\x00\x05"  # RESPONSE, FLAG_EXT, status NOT_FOUND
        b"\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00"
        b"\x00\x00\x00\x07"  # ext length
        b"\x01\x00\x00\x00\x02no"  # tag 1 (error message), length 2
    )


def test_metadata_bytes_and_roundtrip():
    header = wire.encode_request(1, b"s/m", 0, metadata={"k": "vé"})
    ext = b"\x02\x00\x00\x00\x06" + b"\x00\x01k" + "vé".encode()
    assert header[4:6] == b"\x01\x01"
    assert header.endswith(b"s/m" + struct.pack("!I", len(ext)) + ext)
    (frame,) = decode_all(header)
    assert frame.metadata == {"k": "vé"}
    assert frame.route == b"s/m"
    assert frame.payload == b""


@pytest.mark.parametrize(
    "data, kind",
    [
        (wire.encode_cancel(9), FrameKind.CANCEL),
        (wire.encode_ping(9, b"abc"), FrameKind.PING),
        (wire.encode_pong(9, b"abc"), FrameKind.PONG),
        (wire.encode_goaway(9, "bye"), FrameKind.GOAWAY),
    ],
)
def test_control_frames_roundtrip(data, kind):
    (frame,) = decode_all(data)
    assert frame.kind == kind
    assert frame.call_id == 9
    if kind in (FrameKind.PING, FrameKind.PONG):
        assert frame.payload == b"abc"
    if kind == FrameKind.GOAWAY:
        assert frame.message == "bye"


def _stream() -> tuple[bytes, list[tuple]]:
    parts = []
    expected = []
    for i in range(1, 40):
        payload = bytes([i]) * (i * 37)
        meta = {"i": str(i)} if i % 3 == 0 else None
        parts.append(wire.encode_request(i, b"a.B/C", len(payload), i, meta) + payload)
        expected.append((i, payload, meta))
    parts.append(wire.encode_status(99, 13, "boom"))
    expected.append((99, b"", None))
    return b"".join(parts), expected


@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 17, 18, 19, 1000])
def test_partial_and_coalesced_reads(chunk):
    data, expected = _stream()
    frames = decode_all(data, chunk)
    assert [(f.call_id, f.payload, f.metadata) for f in frames] == expected
    assert frames[-1].status == 13 and frames[-1].message == "boom"


def test_large_frame_in_small_chunks():
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB
    data = wire.encode_response(1, len(payload)) + payload + wire.encode_cancel(2)
    frames = decode_all(data, 65536, max_frame_size=8 << 20)
    assert [f.kind for f in frames] == [FrameKind.RESPONSE, FrameKind.CANCEL]
    assert frames[0].payload == payload


def test_oversized_length_rejected_before_the_body_arrives():
    decoder = FrameDecoder(lambda f: None, max_frame_size=1000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(struct.pack("!I", 1001) + b"\x01")
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    "data, why",
    [
        (struct.pack("!IBBHIIH", 5, 1, 0, 0, 1, 0, 0), "too short"),
        (struct.pack("!IBBHIIH", 14 + 2, 1, 0, 0, 1, 0, 3) + b"ab", "too short"),
        (struct.pack("!IBBHIIH", 14 + 2, 2, 1, 0, 1, 0, 0) + b"ab", "extension length"),
        (
            struct.pack("!IBBHIIH", 14 + 4, 2, 1, 0, 1, 0, 0) + b"\x00\x00\x00\x09",
            "extension overruns",
        ),
        (
            struct.pack("!IBBHIIH", 14 + 4 + 3, 2, 1, 0, 1, 0, 0) + b"\x00\x00\x00\x03\x01\x00\x00",
            "truncated",
        ),
        (
            struct.pack("!IBBHIIH", 14 + 4 + 7, 2, 1, 0, 1, 0, 0)
            + b"\x00\x00\x00\x07\x01\x00\x00\x00\x02\xff\xfe",
            "UTF-8",
        ),
    ],
)
def test_malformed_frames(data, why):
    with pytest.raises(ProtocolError, match=why):
        decode_all(data)


def test_unknown_extension_tags_are_skipped():
    ext = b"\x07\x00\x00\x00\x01z" + b"\x01\x00\x00\x00\x02ok"
    data = (
        struct.pack("!IBBHIIH", 14 + 4 + len(ext), 2, 1, 3, 1, 0, 0)
        + struct.pack("!I", len(ext))
        + ext
    )
    (frame,) = decode_all(data)
    assert frame.message == "ok" and frame.status == 3


def test_examples_in_docs_protocol_md():
    from examples.protos import common_pb2, user_pb2

    p = user_pb2.LoginRequest(name="zhang san", pwd="123456").SerializeToString()
    frame = wire.encode_request(1, b"example.UserService/Login", len(p), 5000) + p
    assert frame[:18].hex(" ") == "00 00 00 3a 01 00 00 00 00 00 00 01 00 00 13 88 00 19"
    r = user_pb2.LoginResponse(result=common_pb2.ResultCode(), success=True).SerializeToString()
    assert (wire.encode_response(1, len(r)) + r).hex(" ") == (
        "00 00 00 12 02 00 00 00 00 00 00 01 00 00 00 00 00 00 0a 00 10 01"
    )
    assert (
        wire.encode_status(3, 5, "no user 7")
        == bytes.fromhex("00000020 02010005 00000003 00000000 0000 0000000e 0100000009")
        + b"no user 7"
    )


def test_a_large_partial_frame_is_held_as_a_view_and_joined_alone():
    """A read that ends inside a frame keeps its rest as a view of the read
    (no copy); the read that completes the frame has only the frame joined,
    and what follows the frame in it is decoded where it lies."""
    payload = b"p" * 30_000
    frame = wire.encode_response(1, len(payload)) + payload
    got: list = []
    decoder = FrameDecoder(got.append)
    first = frame + frame[:20_000]
    assert decoder.feed(first) == len(frame)
    [held] = decoder._chunks
    assert isinstance(held, memoryview) and held.obj is first
    assert decoder.buffered == 20_000
    second = frame[20_000:] + frame + frame[:9_000]
    assert decoder.feed(second) == 2 * len(frame)
    assert [bytes(f.payload) for f in got] == [payload] * 3
    [held] = decoder._chunks
    assert held.obj is second and bytes(held) == frame[:9_000]
    assert decoder.feed(frame[9_000:]) == len(frame)
    assert len(got) == 4 and decoder.buffered == 0 and not decoder._chunks


def _response(size: int, call_id: int) -> bytes:
    return wire.encode_response(call_id, size) + bytes([call_id]) * size


def test_a_read_that_ends_a_header_and_goes_on_past_the_split_size():
    """Only part of a header held: the read completing it is joined whole."""
    a, b = _response(30_000, 1), _response(20_000, 2)
    got: list = []
    decoder = FrameDecoder(got.append)
    assert decoder.feed(a[:10]) == 0 and decoder.needed == wire.HEADER_SIZE
    assert decoder.feed(a[10:] + b) == len(a) + len(b)
    assert [(f.call_id, bytes(f.payload)) for f in got] == [(1, a[-30_000:]), (2, b[-20_000:])]
    assert decoder.buffered == 0 and decoder.held == 0 and not decoder._chunks


def test_a_split_read_that_ends_on_a_frame_boundary_leaves_nothing_held():
    a, b = _response(30_000, 1), _response(20_000, 2)
    got: list = []
    decoder = FrameDecoder(got.append)
    assert decoder.feed(a[:20_000]) == 0
    assert decoder.held == 20_000  # (the whole read: kept as it came)
    assert decoder.feed(a[20_000:] + b) == len(a) + len(b)
    assert len(got) == 2 and decoder.buffered == 0 and decoder.held == 0
    assert not decoder._chunks
