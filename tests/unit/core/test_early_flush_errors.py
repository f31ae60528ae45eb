"""Answers written early in a chunk (FIRST_FLUSH) must not
change what happens when that chunk then ends in an error."""

from __future__ import annotations

from twisted.internet.task import Clock

from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from tests.helpers import ROUTE, ServerConn, frames_of
from twisted_rpc import Dispatcher
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind
from twisted_rpc.core._connection import CLOSE_TIMEOUT
from twisted_rpc.server import ServerFactory


def _good(call_id: int) -> bytes:
    payload = echo_pb2.EchoRequest(payload=b"%d" % call_id).SerializeToString()
    return wire.encode_request(call_id, ROUTE, len(payload)) + payload


def _conn() -> tuple[ServerConn, Clock]:
    clock = Clock()
    factory = ServerFactory(Dispatcher([EchoService()]), clock)
    return ServerConn(factory), clock


def test_answers_flushed_early_then_a_malformed_frame_still_close_gracefully():
    """4 answers reach FIRST_FLUSH (8 pieces) and go out early; the unknown
    frame after them must still get the graceful close that
    test_answers_before_a_malformed_frame_are_flushed_before_closing gives
    one answer, not an abort (on TCP: SO_LINGER 0, an RST that discards the
    answers still in the kernel's send buffer)."""
    conn, clock = _conn()
    chunk = b"".join(_good(i) for i in range(1, 5)) + wire.encode_header(99, 2, 0)
    conn.proto.dataReceived(chunk)
    assert [f.call_id for f in frames_of(conn.transport.value())] == [1, 2, 3, 4]
    assert conn.transport.disconnecting
    assert not conn.transport.disconnected  # aborted: the 4 answers may never arrive
    clock.advance(CLOSE_TIMEOUT)
    assert conn.transport.disconnected


def test_answers_flushed_early_then_a_handler_violation_close_gracefully():
    conn, _ = _conn()
    proto = conn.proto
    proto._handlers[FrameKind.PING] = lambda *fields: proto.protocol_violation("bad ping")
    proto.dataReceived(b"".join(_good(i) for i in range(1, 5)) + wire.encode_ping(1))
    assert [f.call_id for f in frames_of(conn.transport.value())] == [1, 2, 3, 4]
    assert conn.transport.disconnecting and not conn.transport.disconnected


def test_answers_flushed_early_then_a_handler_error_close_gracefully():
    conn, _ = _conn()
    proto = conn.proto

    def broken(*fields):
        raise RuntimeError("handler bug")

    proto._handlers[FrameKind.PING] = broken
    proto.dataReceived(b"".join(_good(i) for i in range(1, 5)) + wire.encode_ping(1))
    assert [f.call_id for f in frames_of(conn.transport.value())] == [1, 2, 3, 4]
    assert conn.transport.disconnecting and not conn.transport.disconnected


def test_on_tcp_answers_sent_early_are_not_reset_by_an_abort():
    """On a real TCP transport the 4 answers go straight to the socket (nothing
    left unsent), so _close_after_error aborts: Twisted then closes with
    SO_LINGER (1, 0), an RST, and answers not yet acknowledged are lost."""
    from tests.helpers import over_tcp

    proto = ServerFactory(Dispatcher([EchoService()]), Clock()).buildProtocol(None)
    for conn, _peer, _ in over_tcp(proto):
        chunk = b"".join(_good(i) for i in range(1, 5)) + wire.encode_header(99, 2, 0)
        conn.dataReceived(chunk)
        assert not conn.transport._aborting  # a graceful close (FIN after the answers)
        assert conn.transport.disconnecting


def test_over_tls_answers_flushed_early_reach_the_peer_before_the_close():
    """Under TLS (Twisted's BufferingTLSTransport) an early write waits in
    the TLS layer until the reactor's next turn, and unsent_bytes (the TCP
    buffer) does not see it: the abort then drops those answers outright."""
    import twisted.test
    from twisted.internet import ssl
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.python.filepath import FilePath
    from twisted.test import iosim

    pem = FilePath(twisted.test.__file__).sibling("server.pem").getContent()
    cert = ssl.PrivateCertificate.loadPEM(pem)
    clock = Clock()
    rpc_factory = ServerFactory(Dispatcher([EchoService()]), clock)
    server_tls = TLSMemoryBIOFactory(cert.options(), False, rpc_factory, clock)

    class Peer(Protocol):
        def __init__(self):
            self.received = b""

        def dataReceived(self, data):
            self.received += data

    client_tls = TLSMemoryBIOFactory(
        ssl.CertificateOptions(verify=False), True, Factory.forProtocol(Peer), clock
    )
    client, server, pump = iosim.connectedServerAndClient(
        lambda: server_tls.buildProtocol(None),
        lambda: client_tls.buildProtocol(None),
        clock=clock,
    )
    for _ in range(5):
        pump.flush()
        clock.advance(0)
    peer = client.wrappedProtocol
    client.write(b"".join(_good(i) for i in range(1, 5)) + wire.encode_header(99, 2, 0))
    for _ in range(5):
        pump.flush()
        clock.advance(0)
    assert [f.call_id for f in frames_of(peer.received)] == [1, 2, 3, 4]
