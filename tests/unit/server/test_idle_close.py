"""Idle closes: a partial frame without a frame timeout, and a peer that reads nothing."""

from __future__ import annotations

from tests.helpers import ROUTE, ServerConn
from tests.unit.server.test_provider_hardening import _factory
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind, GoawayReason
from twisted_rpc.core._connection import CLOSE_TIMEOUT


def test_a_partial_frame_does_not_keep_a_connection_open_without_a_frame_timeout():
    clock, factory = _factory(idle_timeout=0.5, frame_timeout=0)
    factory.doStart()
    partial, silent = ServerConn(factory, port=1), ServerConn(factory, port=2)
    partial.proto.dataReceived(wire.encode_request(1, ROUTE, 10)[:1])
    clock.advance(3)
    factory.doStop()
    assert silent.transport.disconnecting
    assert partial.transport.disconnecting  # a byte of a frame is no activity


def test_an_idle_close_is_aborted_when_the_peer_reads_nothing(logged):
    clock, factory = _factory(idle_timeout=1)
    factory.doStart()
    conn = ServerConn(factory)
    clock.advance(1.5)
    (goaway,) = conn.frames()
    assert (goaway.kind, goaway.status) == (FrameKind.GOAWAY, GoawayReason.IDLE)
    assert conn.transport.disconnecting and not conn.transport.disconnected
    clock.advance(CLOSE_TIMEOUT)  # the GOAWAY is never read, so the close never ends
    factory.doStop()
    assert conn.transport.disconnected  # aborted
    assert conn.frames() == []  # one GOAWAY, not one per sweep
    closes = [e for e in logged if "closing idle connection" in e.get("log_format", "")]
    assert len(closes) == 1
