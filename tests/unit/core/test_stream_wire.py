"""Stream frames (golden bytes, as docs/protocol.md shows them), settings, and
the credit arithmetic of core/_flow.py."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError

from tests.helpers import frames_of
from twisted_rpc import RpcError, StatusCode
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind, ProtocolError
from twisted_rpc.core._flow import (
    MAX_STREAM_WINDOW,
    Inbox,
    SendCredit,
    check_window,
    message_cost,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --------------------------------------------------------------------------- golden bytes


def test_stream_frames_are_as_the_protocol_document_shows():
    assert wire.encode_message(3, 4) == h("00 00 00 12 07 00 00 00 00 00 00 03 00 00 00 00 00 00")
    assert wire.encode_end_stream(5) == h("00 00 00 0e 08 00 00 00 00 00 00 05 00 00 00 00 00 00")
    assert wire.encode_window(3, 262144) == h(
        "00 00 00 0e 09 00 00 00 00 00 00 03 00 04 00 00 00 00"
    )
    assert wire.encode_headers(3, {"a": "b"}) == h(
        "00 00 00 1b 0a 01 00 00 00 00 00 03 00 00 00 00 00 00"
        "00 00 00 09 02 00 00 00 04 00 01 61 62"
    )
    route = b"mprpc.test.StreamService/Count"
    assert (
        wire.encode_request(3, route, 2)
        == h("00 00 00 2e 01 00 00 00 00 00 00 03 00 00 00 00 00 1e") + route
    )
    assert wire.encode_header(wire.RESPONSE, 3, 0) == h(
        "00 00 00 0e 02 00 00 00 00 00 00 03 00 00 00 00 00 00"
    )


def test_a_ping_carries_settings_as_tag_3_entries():
    ping = wire.encode_ping(1, b"", {"streams": "1", "stream_window": "1048576"})
    assert ping == (
        h("00 00 00 3c 04 01 00 00 00 00 00 01 00 00 00 00 00 00")
        + h("00 00 00 2a")
        + h("03 00 00 00 0a 00 07")
        + b"streams1"
        + h("03 00 00 00 16 00 0d")
        + b"stream_window1048576"
    )
    (frame,) = frames_of(ping)
    assert frame.kind == FrameKind.PING
    assert frame.metadata == {"streams": "1", "stream_window": "1048576"}


def test_a_plain_ping_is_unchanged_and_settings_in_other_kinds_are_skipped():
    assert wire.encode_ping(7, b"ab") == h(
        "00 00 00 10 04 00 00 00 00 00 00 07 00 00 00 00 00 00 61 62"
    )
    # A REQUEST with a setting entry (tag 3): skipped, as any unknown tag.
    ext = h("03 00 00 00 04 00 01") + b"kv"
    route = b"a.B/C"
    length = wire.HEADER_SIZE - 4 + len(route) + 4 + len(ext)
    frame = (
        wire._pack_header(length, wire.REQUEST, wire.FLAG_EXT, 0, 1, 0, len(route))
        + route
        + len(ext).to_bytes(4, "big")
        + ext
    )
    (decoded,) = frames_of(frame)
    assert decoded.metadata is None


def test_a_window_frame_gives_its_increment_where_a_request_has_its_timeout():
    seen = []
    decoder = wire.FrameDecoder({FrameKind.WINDOW: lambda *fields: seen.append(fields)})
    decoder.feed(wire.encode_window(9, 123456))
    assert seen == [(9, 0, 123456, b"", None, "", b"")]


# --------------------------------------------------------------------------- credit


def test_message_cost_counts_the_frame_header():
    assert message_cost(0) == wire.HEADER_SIZE
    assert message_cost(100) == 100 + wire.HEADER_SIZE


@pytest.mark.parametrize("bad", [0, 1023, 2**31, 1.5, "65536", True, None])
def test_check_window_refuses_what_is_not_a_window(bad):
    with pytest.raises(ValueError, match="stream_window"):
        check_window(bad)


def test_check_window_takes_bounds():
    assert check_window(1024) == 1024
    assert check_window(MAX_STREAM_WINDOW) == MAX_STREAM_WINDOW


def test_send_credit_waits_until_above_zero_and_may_overshoot_by_one_message():
    credit = SendCredit(100)
    credit.spend(150)  # one message larger than what is left: allowed, goes negative
    assert credit.credit == -50
    d = credit.wait()
    assert not d.called
    credit.add(40)
    assert not d.called  # still not above zero
    credit.add(20)
    assert d.called and credit.credit == 10


def test_send_credit_refuses_an_overflowing_or_empty_grant():
    credit = SendCredit(MAX_STREAM_WINDOW - 10)
    with pytest.raises(ProtocolError):
        credit.add(11)
    with pytest.raises(ProtocolError):
        credit.add(0)


def test_a_cancelled_credit_wait_is_forgotten():
    credit = SendCredit(0)
    d = credit.wait()
    d.cancel()
    assert credit.waiter is None
    with pytest.raises(CancelledError):
        d.result.raiseException()  # type: ignore[union-attr]
    credit.add(5)  # nothing fires twice


def test_inbox_grants_in_batches_of_a_quarter_window_as_messages_are_taken():
    grants: list[int] = []
    inbox = Inbox(1000, grants.append)
    for i in range(10):
        inbox.put(i, 100)
    assert inbox.available == 0
    with pytest.raises(ProtocolError, match="without credit"):
        inbox.put("over", 100)  # the sender had no credit left
    taken = [inbox.take() for _ in range(10)]
    assert taken == list(range(10))
    assert grants == [300, 300, 300]  # each time 250 or more were taken; 100 not yet granted
    assert inbox.consumed == 100
    assert inbox.available == 900


def test_inbox_grants_nothing_while_nothing_is_taken():
    grants: list[int] = []
    inbox = Inbox(1000, grants.append)
    for i in range(5):
        inbox.put(i, 200)
    assert grants == []
    assert inbox.ready() and inbox.consumed == 0


def test_inbox_hands_out_messages_then_the_end_or_the_error():
    inbox = Inbox(1000, lambda n: None)
    inbox.put("a", 10)
    inbox.finish(RpcError(StatusCode.ABORTED, "no"))
    assert inbox.take() == "a"
    with pytest.raises(RpcError) as caught:
        inbox.take()
    assert caught.value.code == StatusCode.ABORTED
    clean = Inbox(1000, lambda n: None)
    clean.finish()
    assert clean.ready() and clean.take() is None


def test_inbox_abort_drops_what_is_held():
    inbox = Inbox(1000, lambda n: None)
    inbox.put("a", 10)
    inbox.abort(RpcError(StatusCode.CANCELLED, "gone"))
    with pytest.raises(RpcError):
        inbox.take()


def test_inbox_wakes_its_reader_once_per_chunk_through_wake():
    woken: list[Inbox] = []
    inbox = Inbox(1000, lambda n: None, woken.append)
    d = inbox.wait()
    inbox.put("a", 10)
    inbox.put("b", 10)
    assert woken == [inbox]  # asked once, not per message
    assert not d.called
    inbox.fire()
    assert d.called
    assert [inbox.take(), inbox.take()] == ["a", "b"]
