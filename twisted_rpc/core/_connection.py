"""The connection layer shared by both sides: framing, the one write path, pings.

:class:`RpcConnection` turns bytes into frames with the wire codec, routes each frame to
a handler by kind, and owns the only call to ``transport.write``. Client and server
connections subclass it and fill in the handlers for the kinds they accept."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FieldHandler, FrameDecoder, FrameKind, ProtocolError
from twisted_rpc.core._compress import (
    DEFAULT_COMPRESS_THRESHOLD,
    NEVER,
    available_encodings,
    compress_frame,
    inflate,
    parse_encodings,
)
from twisted_rpc.core._direct_write import FIRST_FLUSH, DirectWriter, WriteBufferWatch
from twisted_rpc.core._flow import Inbox, fire_woken
from twisted_rpc.core._large_read import LARGE_READ, LargeFrameReader, keep_sent, read_large
from twisted_rpc.core._status import StatusCode, UnavailableError

LARGE_PAYLOAD = 64 * 1024

_NO_FLUSH = 1 << 62  # the early-write threshold outside a batch

CLOSE_TIMEOUT = 10.0
"""Seconds a connection closed for a protocol error has to take the answers
written before it; then it is aborted."""

MAX_PING_PAYLOAD = 1024
"""Largest PING payload answered; a larger one is a protocol violation (both sides)."""

DEFAULT_PONG_ABORT_BYTES = 256 * 1024 * 1024
"""Unsent bytes past which a peer that keeps sending PINGs is dropped."""


class IRpcTransport(ITCPTransport, IConsumer):
    """What a connection uses of its transport (for typing only): a TCP
    transport, plain or under TLS, that takes a producer. In tests, a
    ``StringTransport`` stands in for it."""


def _ignore(data: bytes) -> None:
    """What a connection closing after an error does with more bytes."""


class RefusedConnection(Protocol):
    """What a factory builds for a connection a limit refuses: closed as soon
    as it is made. (Returning None closes a plain TCP connection on accept,
    but a wrapping factory, such as the TLS one an ``ssl:`` endpoint puts
    around it, would wrap the None and leave the socket open.)"""

    transport: IRpcTransport

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class RpcConnection(Protocol):
    """Framing and the write path for one connection.

    A bad frame (or a bug in a handler) closes this connection with a logged
    reason, once the answers to the frames before it are written; the
    process and its other connections carry on.
    """

    log = Logger()
    transport: IRpcTransport

    def __init__(
        self,
        clock: IReactorTime,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        max_ext_size: int = wire.DEFAULT_MAX_EXT_SIZE,
        max_ext_entries: int = wire.DEFAULT_MAX_EXT_ENTRIES,
    ):
        self.clock = clock
        self.write_blocked = False
        self._watching_writes = False
        self._write_watch: WriteBufferWatch | None = None
        self.connected = False
        self.last_active = 0.0
        """When the last whole frame arrived (or the connection was made)."""
        self.received_at: float | None = None
        """When the read being handled started (reactor time; None before the
        first): the receive time of every frame in it, once per read."""
        self.partial_since: float | None = None
        """When the frame being received started to arrive (None: none is)."""
        self.peer = "?"
        self.peer_host: str | None = None
        self._handlers: dict[int, FieldHandler] = {
            FrameKind.PING: self._ping_received,
            FrameKind.PONG: self._pong_received,
        }
        self.decoder = FrameDecoder(
            self._handlers, max_frame_size, max_ext_size, max_ext_entries, self._ext_rejected
        )
        self.decoder.inflate = self._inflate
        self._batch: list[bytes] | None = None
        self._close_timer: IDelayedCall | None = None
        self._writer: DirectWriter | None = None
        self._pings: dict[int, tuple[Deferred[float], float]] = {}
        self._next_ping = 1
        self._woken: list[Inbox] = []
        self.peer_settings: dict[str, str] | None = None
        """The settings the peer sent (see :meth:`local_settings`), once it has."""

    # ----------------------------------------------------------------- Protocol

    def connectionMade(self) -> None:
        self.connected = True
        self.last_active = self.clock.seconds()
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self.peer = f"{host}:{port}" if host is not None else str(peer)
        self.peer_host = host
        if hasattr(self.transport, "registerProducer"):
            self._write_watch = WriteBufferWatch(self)
            self.transport.registerProducer(self._write_watch, True)
            self._watching_writes = True
        self._writer = DirectWriter(self.transport)
        self._write_now = self._writer.write  # type: ignore[method-assign]
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        # open_batch(), inline (once a read): the frames sent while handling
        # this chunk, answers and the calls their callbacks make, are collected.
        batch: list[bytes] = []
        self._batch = batch
        self._flush_at, self._batch_wrote = FIRST_FLUSH, False
        self.received_at = now = self.clock.seconds()  # the frames' receive time
        decoder = self.decoder
        try:
            done = decoder.feed(data)
            if self._woken:
                self._fire_woken()
        except ProtocolError as e:
            self.protocol_violation(str(e))
            self._batch = None
            return
        except Exception:
            self.log.failure(
                "closing connection from {peer}: error handling a frame", peer=self.peer
            )
            self._close_after_error()
            self._batch = None
            return
        self._batch = None  # close_batch(batch), inline
        if batch:
            self._write_now([batch[0] if len(batch) == 1 else b"".join(batch)])
        if done:  # only whole frames count as activity
            self.last_active = now
        if decoder.buffered or self.partial_since is not None:
            self.partial_frame(bool(done))

    _flush_at = _NO_FLUSH
    _batch_wrote = False
    """Whether the open batch wrote frames already: see :meth:`_close_after_error`."""

    def open_batch(self) -> list[bytes]:
        """Collect the frames sent from now on (:meth:`send`; the first ones go
        out early, see FIRST_FLUSH) until :meth:`close_batch` writes the rest."""
        batch: list[bytes] = []
        self._batch = batch
        self._flush_at, self._batch_wrote = FIRST_FLUSH, False
        return batch

    def close_batch(self, batch: list[bytes]) -> None:
        self._batch = None
        if batch:  # (one join in C beats sending the pieces apart)
            self._write_now([batch[0] if len(batch) == 1 else b"".join(batch)])

    def flush_early(self, batch: list[bytes]) -> None:
        """Write what ``batch`` holds so far (it goes on collecting), and
        double the threshold for the next such write (see FIRST_FLUSH)."""
        self._flush_at, self._batch_wrote = 2 * len(batch), True
        self._write_now([b"".join(batch)])
        batch.clear()

    def wake_later(self, inbox: Inbox) -> None:
        """Fire ``inbox``'s reader once the chunk being handled is (at once
        outside one), so it takes all the chunk's messages in one go."""
        if self._batch is None:
            inbox.fire()
        else:
            self._woken.append(inbox)

    def _fire_woken(self) -> None:
        fire_woken(self)

    def partial_frame(self, completed: bool) -> None:
        """Called after a read that leaves a frame partly received, or ends
        one that was: keeps :attr:`partial_since`. ``completed``: a whole
        frame arrived in that read (a partial one left now is a new one)."""
        if self.decoder.buffered:
            if completed or self.partial_since is None:
                self.partial_since = self.clock.seconds()
            if self.large_reads and self.decoder.needed >= LARGE_READ and not self.write_blocked:
                read_large(self)
        else:
            self.partial_since = None

    large_reads = True
    """Read large frames straight from the socket (see ``_large_read``)."""
    large_reader: LargeFrameReader | None = None

    def raw_socket(self) -> socket.socket | None:
        """The socket, when what is read from it is this connection's bytes."""
        return self._writer.raw_socket() if self._writer is not None else None

    def _ext_rejected(self, kind: int, call_id: int, status: int, route: bytes, why: str) -> None:
        """A frame whose extension is over the limits. An answer fails its
        call with RESOURCE_EXHAUSTED (an error status is kept, its text
        replaced); a GOAWAY keeps its reason and loses its text; a REQUEST is
        the provider's (:class:`twisted_rpc.server.ServerConnection`)."""
        handler = self._handlers.get(kind)
        if handler is None or kind == FrameKind.REQUEST:
            raise ProtocolError(why)
        if kind == FrameKind.RESPONSE:
            status = status or StatusCode.RESOURCE_EXHAUSTED
            handler(call_id, status, 0, b"", None, f"answer not read: {why}", b"")
        else:
            handler(call_id, status, 0, b"", None, "", b"")

    def _write_now(self, pieces: list[bytes]) -> None:
        """Write ``pieces`` in order, at once if the transport lets us: once
        connected, this is the :class:`DirectWriter`'s ``write`` (see
        :mod:`twisted_rpc.core._direct_write`)."""
        if len(pieces) == 1:
            self.transport.write(pieces[0])
        else:
            self.transport.writeSequence(pieces)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        # Let go of the partial frame now, and break the cycles through the
        # handlers (bound methods of this connection) held by the decoder and
        # the transport's producer: refcounting alone frees a dead connection.
        self.decoder.clear()  # (its inflate too)
        reader, self.large_reader = self.large_reader, None
        if reader is not None and self.__dict__.get("dataReceived") == reader.received:
            del self.dataReceived  # (a cycle through the reader)
        self._handlers.clear()
        self.partial_since = None
        if self._write_watch is not None:
            self._write_watch.connection = None
        pings, self._pings = self._pings, {}
        for d, _ in pings.values():
            d.errback(UnavailableError(message=f"connection to {self.peer} lost"))

    # ----------------------------------------------------------------- backpressure

    def write_buffer_full(self) -> None:
        """The peer is not reading: the transport's write buffer is full."""
        self.write_blocked = True

    def write_buffer_drained(self) -> None:
        self.write_blocked = False

    # ----------------------------------------------------------------- frames

    def close(self) -> None:
        """Close once written frames are flushed. The transport's producer slot
        is let go first: a TLS transport waits for that before it closes."""
        if self._watching_writes:
            self._watching_writes = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def unsent_bytes(self) -> int | None:
        """Bytes given to the transport and not sent yet, if it tells: a TCP
        transport does, also under TLS (which buffers in the TCP transport)."""
        writer = self._writer
        return writer.unsent_bytes() if writer is not None else None

    def protocol_violation(self, why: str) -> None:
        """Log why and close the connection: no more frames are read; the
        answers to frames before the bad one are still sent."""
        self.log.warn("closing connection from {peer}: {why}", peer=self.peer, why=why)
        self._close_after_error()

    def abort(self, why: str) -> None:
        """Log why and close at once, letting go of a partial frame now."""
        self.log.warn("closing connection from {peer}: {why}", peer=self.peer, why=why)
        self.dataReceived = _ignore  # type: ignore[method-assign]
        self.decoder.clear()
        self.partial_since = None
        self.transport.abortConnection()

    def _close_after_error(self) -> None:
        """Stop reading and close. What was answered before is flushed first
        (a graceful close, aborted after :data:`CLOSE_TIMEOUT` seconds if the
        peer does not read it); with nothing to flush, abort at once. Frames of
        this chunk written already (early, or a large one) count as answered:
        an abort could reset them before the peer reads them."""
        self.dataReceived = _ignore  # type: ignore[method-assign]
        batch, self._batch = self._batch, None
        if batch:
            pieces = [b"".join(batch)]
            batch.clear()  # a handler may have called this: dataReceived must not send it again
            self._write_now(pieces)
        elif not (batch is not None and self._batch_wrote) and not self.unsent_bytes():
            self.transport.abortConnection()
            return
        self.close_within(CLOSE_TIMEOUT, "answers unread after an error")

    @property
    def closing(self) -> bool:
        """Whether :meth:`close_within` was asked and the connection is not gone yet."""
        return self._close_timer is not None

    def close_within(self, seconds: float, why: str) -> None:
        """Close once written frames are flushed, and abort if that has not
        happened within ``seconds`` (a peer that reads nothing never lets a
        graceful close finish)."""
        self.close()
        if self._close_timer is None and self.connected:
            self._close_timer = self.clock.callLater(seconds, self._close_timed_out, seconds, why)

    def _close_timed_out(self, seconds: float, why: str) -> None:
        self._close_timer = None
        if self.connected:
            self.log.warn(
                "aborting connection from {peer}: {why} for {t:g}s",
                peer=self.peer,
                why=why,
                t=seconds,
            )
            self.transport.abortConnection()

    def send(self, header: bytes, payload: bytes = b"") -> None:
        """Write one frame: ``header`` from the wire module, then ``payload``.

        With :meth:`_write_now`, the only path to the transport. While a batch
        is open (a read, see :meth:`open_batch`), small frames are collected in
        it; a large one is written at once, after those collected before it
        (one system call is nothing beside its size, and no join copies it).
        Outside a batch, small frames go to the transport, which writes them
        with whatever else this turn of the reactor sends.
        """
        batch = self._batch
        if len(payload) < LARGE_PAYLOAD:
            if batch is not None:
                batch.append(header)
                if payload:
                    batch.append(payload)
                if len(batch) >= self._flush_at:
                    self.flush_early(batch)
            else:
                self.transport.write(header + payload if payload else header)
            return
        if batch is not None:
            self._batch_wrote = True
        if batch:
            pieces = [b"".join(batch), header, payload]
            batch.clear()
        else:
            pieces = [header, payload]
        self._write_now(pieces)
        keep_sent(payload)

    # ----------------------------------------------------------------- compression

    accept_encodings: tuple[str, ...] = available_encodings()
    """Encodings this side reads, told to the peer as the ``encodings`` setting."""
    want_encoding: str | None = None
    """The encoding this side compresses its frames with when the peer reads
    it (a consumer's ``compression`` option); None: a provider, which answers
    in the peer's first encoding once the peer has sent a compressed frame."""
    compress_threshold = DEFAULT_COMPRESS_THRESHOLD
    """Smallest payload compressed once compression is on."""
    compress_min = NEVER
    """Smallest payload compressed now: :data:`NEVER` until the peer's
    settings list an encoding this side means to send (one compare on the
    send paths)."""
    send_encoding: str | None = None
    peer_encodings: tuple[str, ...] = ()
    bytes_uncompressed = 0
    """Bytes of payloads sent compressed, before and after (the ratio's parts)."""
    bytes_compressed = 0

    def encodings_setting(self) -> dict[str, str]:
        """The ``encodings`` entry of this side's settings. A consumer lists
        its encodings only when it means to compress, a provider only to a
        consumer that listed some: ends that do not compress are told nothing."""
        if not self.accept_encodings:
            return {}
        if self.want_encoding is None and not self.peer_encodings:
            return {}
        return {"encodings": ",".join(self.accept_encodings)}

    def _start_compressing(self, encoding: str) -> None:
        self.send_encoding = encoding
        self.compress_min = self.compress_threshold

    def _inflate(self, payload: bytes | memoryview, limit: int) -> bytes:
        """The decoder's: a compressed payload's message, within ``limit``
        bytes. A provider starts answering compressed once it has had one."""
        out = inflate(payload, limit, self.accept_encodings)
        if self.send_encoding is None and self.peer_encodings:
            self._start_compressing(self.peer_encodings[0])
        return out

    def squeeze(
        self, header: bytes, payload: bytes, encoding: str | None = None
    ) -> tuple[bytes, bytes, int]:
        """A frame compressed with ``encoding`` (else :attr:`send_encoding`)
        if that makes it smaller (callers check ``len(payload) >=
        compress_min`` first), and its payload's size."""
        encoding = encoding or self.send_encoding
        assert encoding is not None
        size = len(payload)
        header, payload, new = compress_frame(header, payload, encoding)
        if new < size:
            self.bytes_uncompressed += size
            self.bytes_compressed += new
        return header, payload, new

    # ----------------------------------------------------------------- ping

    pongs_dropped = 0
    pong_abort_bytes = DEFAULT_PONG_ABORT_BYTES
    """PINGs left unanswered because the peer was not reading what we wrote."""

    def local_settings(self) -> dict[str, str] | None:
        """What this side tells its peer it supports, in its first PING (a
        consumer) or the PONG answering a PING with settings (a provider):
        see docs/protocol.md, "Settings". None: nothing to tell."""
        return None

    def settings_received(self, settings: dict[str, str]) -> None:
        """The peer's settings arrived (in a PING or a PONG)."""
        if self.peer_settings is None:
            self.peer_settings = settings
            self.peer_encodings = parse_encodings(settings.get("encodings"))
            want = self.want_encoding
            if want is not None and want in self.peer_encodings:
                self._start_compressing(want)

    _settings_sent = False

    def ping(self, payload: bytes = b"") -> Deferred[float]:
        """Send a PING; the Deferred fires with the round-trip time in seconds.
        The first one carries this side's settings."""
        if not self.connected:
            return fail(UnavailableError(message="not connected"))
        if len(payload) > MAX_PING_PAYLOAD:
            return fail(
                ValueError(f"ping payload: {len(payload)} bytes, at most {MAX_PING_PAYLOAD}")
            )
        ping_id = self._next_ping
        self._next_ping = (ping_id + 1) & 0xFFFFFFFF or 1
        d: Deferred[float] = Deferred(lambda _: self._forget_ping(ping_id))
        self._pings[ping_id] = (d, self.clock.seconds())
        settings = None
        if not self._settings_sent:
            self._settings_sent = True
            settings = self.local_settings()
        self.send(wire.encode_ping(ping_id, payload, settings))
        return d

    def _forget_ping(self, ping_id: int) -> None:
        self._pings.pop(ping_id, None)

    def _ping_received(self, ping_id: int, *fields: Any) -> None:
        """Answer with a PONG, unless the peer is not reading what we wrote.

        A PONG is as large as its PING, so answering every PING of a peer that
        never reads would buffer without end: the payload is capped, and
        while the transport's write buffer is full (see write_buffer_full)
        PINGs are counted and left unanswered. A peer that keeps pinging while
        more than pong_abort_bytes wait unsent is dropped.
        """
        payload = fields[-1]
        settings = fields[3]
        if len(payload) > MAX_PING_PAYLOAD:
            raise ProtocolError(
                f"PING payload of {len(payload)} bytes exceeds the limit of {MAX_PING_PAYLOAD}"
            )
        if self.write_blocked:
            self.pongs_dropped += 1
            unsent = self.unsent_bytes()
            limit = self.pong_abort_bytes
            if unsent is not None and limit and unsent > limit:
                raise ProtocolError(
                    f"peer does not read: {unsent} bytes wait unsent and it keeps sending PINGs"
                )
            return
        answer = None
        if settings is not None:
            # Answered with ours, once: a peer that sends none (an older one)
            # gets PONGs as they always were.
            self.settings_received(settings)
            if not self._settings_sent:
                self._settings_sent = True
                answer = self.local_settings()
        self.send(wire.encode_pong(ping_id, bytes(payload), answer))

    def _pong_received(self, ping_id: int, *fields: Any) -> None:
        settings = fields[3]
        if settings is not None:
            self.settings_received(settings)
        entry = self._pings.pop(ping_id, None)
        if entry is not None:
            d, sent = entry
            d.callback(self.clock.seconds() - sent)
