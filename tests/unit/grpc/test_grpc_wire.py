"""gRPC's wire pieces (twisted_rpc/grpc/_wire.py), against PROTOCOL-HTTP2's examples."""

from __future__ import annotations

import pytest

from twisted_rpc.grpc import GrpcWireError
from twisted_rpc.grpc import _wire as w


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1S", 1.0), ("100m", 0.1), ("5M", 300.0), ("2H", 7200.0), ("250u", 250e-6), ("7n", 7e-9)],
)
def test_timeouts_parse(text, seconds):
    assert w.parse_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "1", "S", "123456789S", "1s", "-1S", "1.5S", "1 S"])
def test_bad_timeouts_are_refused(bad):
    with pytest.raises(GrpcWireError):
        w.parse_timeout(bad)


@pytest.mark.parametrize("seconds", [0.001, 0.1, 1.0, 2.5, 59.9, 3600 * 24 * 365])
def test_timeouts_format_never_shorter_and_round_trip(seconds):
    text = w.format_timeout(seconds)
    assert len(text) <= 9
    back = w.parse_timeout(text)
    assert back >= seconds * (1 - 1e-12)
    assert back <= seconds * 1.001 + 1e-9


def test_messages_come_out_whole_across_any_split():
    data = w.frame_message(b"abc") + w.frame_message(b"") + w.frame_message(b"x" * 1000)
    for cut in range(len(data)):
        reader = w.MessageReader(4096)
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert got == [b"abc", b"", b"x" * 1000]
        assert reader.buffered == 0


def test_an_oversized_message_is_refused_by_its_prefix():
    reader = w.MessageReader(100)
    with pytest.raises(GrpcWireError) as caught:
        reader.feed(w.prefix(101))
    assert caught.value.code == 8
    assert reader.buffered == 0


def test_gzip_messages_inflate_within_the_limit():
    payload = b"hello " * 100
    reader = w.MessageReader(10_000, "gzip")
    (got,) = reader.feed(w.frame_message(w.gzip_payload(payload), compressed=True))
    assert got == payload
    bomb = w.frame_message(w.gzip_payload(b"\0" * 1_000_000), compressed=True)
    with pytest.raises(GrpcWireError, match="inflates"):
        w.MessageReader(10_000, "gzip").feed(bomb)
    with pytest.raises(GrpcWireError, match="grpc-encoding"):
        w.MessageReader(10_000).feed(w.frame_message(b"x", compressed=True))


def test_metadata_to_and_from_headers():
    headers = w.metadata_to_headers({"User": "zhang", "trace-bin": "\x00\x01é", "te": "x"})
    assert headers == [("user", "zhang"), ("trace-bin", "AAHDqQ")]
    back = w.metadata_from_headers(
        [(b":path", b"/a.B/C"), (b"content-type", b"application/grpc")]
        + [(k.encode(), v.encode()) for k, v in headers]
    )
    assert back == {"user": "zhang", "trace-bin": "\x00\x01é"}


def test_status_trailers_percent_encode_the_message():
    assert w.status_headers(5, "no user 7 / 100%", {"k": "v"}) == [
        ("grpc-status", "5"),
        ("grpc-message", "no user 7 / 100%25"),
        ("k", "v"),
    ]
    assert w.decode_message_text("caf%C3%A9 100%25") == "café 100%"


def test_timeouts_format_exactly_when_they_can():
    assert w.format_timeout(2.5) == "2500000u"
    assert w.format_timeout(0.1) == "100000u"
    assert w.format_timeout(30) == "30000000u"
    assert w.format_timeout(3600 * 24) == "86400000m"
