"""Property tests of the frame codec: round trips, and arbitrary bytes never crash it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import Frame, FrameDecoder, FrameKind, ProtocolError

MAX = 1 << 16

texts = st.text(max_size=40)
metadata = st.none() | st.dictionaries(texts, texts, max_size=4)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(list(FrameKind)))
    call_id = draw(u32)
    payload = draw(st.binary(max_size=300))
    if kind == FrameKind.REQUEST:
        route = draw(st.binary(min_size=1, max_size=60))
        meta = draw(metadata)
        header = wire.encode_request(call_id, route, len(payload), draw(u32), meta)
        return header + payload, (kind, call_id, route, meta or None, "", payload)
    if kind == FrameKind.RESPONSE:
        status = draw(st.integers(0, 0xFFFF))
        if status:
            message = draw(texts)
            return wire.encode_status(call_id, status, message), (
                kind,
                call_id,
                b"",
                None,
                message,
                b"",
            )
        return wire.encode_response(call_id, len(payload)) + payload, (
            kind,
            call_id,
            b"",
            None,
            "",
            payload,
        )
    if kind == FrameKind.CANCEL:
        return wire.encode_cancel(call_id), (kind, call_id, b"", None, "", b"")
    if kind in (FrameKind.PING, FrameKind.PONG):
        encode = wire.encode_ping if kind == FrameKind.PING else wire.encode_pong
        settings = draw(metadata)
        frame = encode(call_id, payload, settings)
        return frame, (kind, call_id, b"", settings or None, "", payload)
    if kind == FrameKind.MESSAGE:
        frame = wire.encode_message(call_id, len(payload)) + payload
        return frame, (kind, call_id, b"", None, "", payload)
    if kind == FrameKind.END_STREAM:
        return wire.encode_end_stream(call_id), (kind, call_id, b"", None, "", b"")
    if kind == FrameKind.WINDOW:
        return wire.encode_window(call_id, 5), (kind, call_id, b"", None, "", b"")
    if kind == FrameKind.HEADERS:
        meta = draw(metadata)
        return wire.encode_headers(call_id, meta), (kind, call_id, b"", meta or None, "", b"")
    message = draw(texts)
    return wire.encode_goaway(call_id, message), (kind, call_id, b"", None, message, b"")


def summary(frame: Frame) -> tuple:
    return (
        frame.kind,
        frame.call_id,
        frame.route,
        frame.metadata,
        frame.message,
        bytes(frame.payload),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=8), st.lists(st.integers(1, 64), max_size=20))
def test_round_trip_through_any_split(items, cuts):
    data = b"".join(encoded for encoded, _ in items)
    got: list[Frame] = []
    decoder = FrameDecoder(got.append, MAX)
    pos = 0
    for cut in cuts:
        decoder.feed(data[pos : pos + cut])
        pos += cut
    decoder.feed(data[pos:])
    assert [summary(f) for f in got] == [expected for _, expected in items]
    assert decoder.buffered == 0


def _feed_all(data: bytes, cuts: list[int]) -> int:
    """Feed in pieces; only ProtocolError may come out. Returns frames decoded."""
    count = 0

    def sink(frame: Frame) -> None:
        nonlocal count
        count += 1

    decoder = FrameDecoder(sink, MAX)
    pos = 0
    try:
        for cut in [*cuts, len(data)]:
            decoder.feed(data[pos : pos + cut])
            pos += cut
            # Never holds more than one frame's worth, whatever the input says.
            assert decoder.buffered <= MAX + wire.HEADER_SIZE
    except ProtocolError:
        pass
    return count


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=10))
def test_arbitrary_bytes_give_frames_or_a_protocol_error(data, cuts):
    _feed_all(data, cuts)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(frames(), min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6),
    st.lists(st.integers(1, 50), max_size=10),
)
def test_mutated_frames_give_frames_or_a_protocol_error(items, flips, cuts):
    data = bytearray(b"".join(encoded for encoded, _ in items))
    for position, value in flips:
        data[position % len(data)] = value
    _feed_all(bytes(data), cuts)


@st.composite
def large_frames(draw):
    """RESPONSE and MESSAGE frames of up to 40 KiB: past the decoder's
    split size, so partial frames are held as views and joined alone."""
    call_id = draw(u32)
    payload = draw(st.integers(0, 255)).to_bytes(1, "big") * draw(st.integers(0, 40_000))
    encode = draw(st.sampled_from([wire.encode_response, wire.encode_message]))
    kind = FrameKind.RESPONSE if encode is wire.encode_response else FrameKind.MESSAGE
    return encode(call_id, len(payload)) + payload, (kind, call_id, b"", None, "", payload)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(large_frames() | frames(), min_size=1, max_size=8),
    st.lists(st.integers(1, 70_000), max_size=12),
)
def test_large_frames_round_trip_through_any_split(items, cuts):
    """Whatever the reads' sizes, every frame arrives whole and in order, and
    ``feed`` counts each frame's bytes once, in the read that completes it."""
    data = b"".join(encoded for encoded, _ in items)
    got: list[Frame] = []
    decoder = FrameDecoder(got.append, MAX)
    counted = pos = 0
    for cut in cuts:
        counted += decoder.feed(data[pos : pos + cut])
        pos += cut
    counted += decoder.feed(data[pos:])
    assert [summary(f) for f in got] == [expected for _, expected in items]
    assert counted == len(data)
    assert decoder.buffered == 0
