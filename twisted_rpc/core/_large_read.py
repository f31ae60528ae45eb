"""Large frames read straight from the socket into one buffer per connection.

Twisted reads a TCP socket ``bufferSize`` (64 KiB) at a time and hands each
read to ``dataReceived`` as a new bytes object; the decoder keeps the reads of
a partial frame and joins them once the frame is whole. For a 1 MiB frame
that is 16 turns of the reactor, 16 allocations and a join into fresh pages.

Once the decoder holds part of a frame of :data:`LARGE_READ` bytes or more
(its header read, and so its size checked against ``max_frame_size``), a
plain TCP connection hands the frame to a :class:`LargeFrameReader`: it copies
what came so far into one buffer sized for the frame and reads the rest into
it with ``recv_into`` for as long as the socket has bytes (the reads Twisted
still makes meanwhile are copied in too). The whole frame is decoded from a
memoryview of that buffer, so its payload reaches the handler (which parses
it at once) without another copy.

The buffer is an anonymous ``mmap``, outside malloc's heap: keeping it
leaves glibc's heap layout and its dynamic mmap and trim thresholds as they
were (a kept 1 MiB ``bytearray`` made the process fault in ~1 MiB more fresh
pages per call, docs/benchmarks.md), and nothing zero-fills it by hand. It is
kept for the connection's next large frame, unless it is over
:data:`KEEP_BYTES` or something still holds a view of it (a handler that kept
its payload): then it is let go and the next frame gets a new one. While a
frame is read, the decoder's ``buffered`` is the buffer's size (what the
provider counts against ``max_buffered_bytes``). A connection under TLS (the
socket carries ciphertext) or whose reads are paused keeps the plain path.

The send side keeps something too (:func:`keep_sent`): one large payload
sent by the process, the highest in memory of the recent ones.
"""

from __future__ import annotations

import mmap
import socket
from typing import TYPE_CHECKING

from twisted.logger import Logger

from twisted_rpc.core._codec import (
    _COMPRESSIBLE_KINDS,
    _EXT_KINDS,
    _SETTINGS_KINDS,
    FLAG_COMPRESSED,
    FLAG_EXT,
    HEADER_SIZE,
    MESSAGE,
    ExtensionLimitError,
    FrameDecoder,
    ProtocolError,
    _unpack_header,
    _unpack_u32,
)
from twisted_rpc.core._ext import EXT_SETTING, _decode_ext
from twisted_rpc.core._frame import Frame

if TYPE_CHECKING:
    from twisted_rpc.core._connection import RpcConnection

__all__ = [
    "KEEP_BYTES",
    "KEEP_REFRESH",
    "KEPT",
    "LARGE_READ",
    "LargeFrameReader",
    "decode_frame",
    "keep_sent",
    "read_large",
]

LARGE_READ = 128 * 1024 + 1
"""Frames of this size and more (length prefix included) are read here: the
ones Twisted would deliver in more than two reads. (A 64 KiB message's frame,
one read and a few bytes, cost its sides ~8 % more CPU here than joined.)"""

KEEP_BYTES = 8 * 1024 * 1024
"""Largest buffer a connection keeps between frames (and largest payload
sent the process keeps, :func:`keep_sent`)."""

KEEP_REFRESH = 64
"""Large payloads sent after which the process keeps the newest one,
wherever it lies."""

log = Logger()


def read_large(connection: RpcConnection) -> None:
    """Called while ``connection``'s decoder holds a partial frame: if the
    frame is large and the socket can be read directly, read it here."""
    sock = connection.raw_socket()
    if sock is None:
        return
    decoder = connection.decoder
    partial = decoder.take_partial(LARGE_READ)
    if partial is None:
        return
    reader = connection.large_reader
    if reader is None:
        reader = connection.large_reader = LargeFrameReader(connection, sock)
    reader.start(*partial)
    connection.dataReceived = reader.received  # type: ignore[method-assign]
    reader.pull()
    if reader.filled == reader.size:
        reader.complete(b"")


class _Kept:
    """The large payload sent that the process keeps (see :func:`keep_sent`)."""

    __slots__ = ("payload", "sends")

    def __init__(self) -> None:
        self.payload = b""
        self.sends = 0


KEPT = _Kept()
"""The process's one kept payload: malloc's heap is the process's, and one
live block above a call's buffers is enough whatever connection sent it."""


def keep_sent(payload: bytes) -> None:
    """Keep ``payload``, a large payload just sent, in place of the one kept
    if it lies higher in memory, or if that one was kept :data:`KEEP_REFRESH`
    large sends ago.

    A large call's buffers (the parsed request, the handler's ``str``, the
    answer's message and its serialization) are malloc'd at the heap's top
    and all freed when the call ends: with nothing live above them glibc
    trims the top (``brk``) and the next call faults every page in afresh,
    ~1,000 faults per 1 MiB call. A payload kept above them leaves them a
    hole the next call reuses instead; keeping the last one sent does that
    only every other call (the next answer often lands in the hole, below
    it), so the highest one is kept (``id`` is the address in CPython), and
    the newest every :data:`KEEP_REFRESH` sends, lest one outside the heap
    (an mmap'd block) be kept for good. One per process, not per connection:
    what it costs is at most :data:`KEEP_BYTES` held, however many
    connections there are; elsewhere than glibc it only holds that.
    (docs/benchmarks.md, "1 MiB: where the server's CPU goes".)
    """
    if type(payload) is not bytes or len(payload) > KEEP_BYTES:
        return  # (a view could hold a reader's buffer)
    kept = KEPT
    sends = kept.sends + 1
    if sends > KEEP_REFRESH or not kept.payload or id(payload) > id(kept.payload):
        kept.payload, sends = payload, 0
    kept.sends = sends


class LargeFrameReader:
    """The buffer of one connection's large frames and their reading."""

    __slots__ = ("connection", "sock", "buffer", "view", "size", "filled")

    def __init__(self, connection: RpcConnection, sock: socket.socket) -> None:
        self.connection = connection
        self.sock = sock
        self.buffer: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.size = 0
        self.filled = 0

    def start(self, chunks: list[bytes | memoryview], size: int) -> None:
        """Take the partial frame's ``chunks``; the frame is ``size`` bytes."""
        buffer = self.buffer
        if buffer is None or len(buffer) < size:
            self.buffer = None  # (let an old one go before the new one is made)
            buffer = self.buffer = mmap.mmap(-1, size)
        self.view = view = memoryview(buffer)[:size]
        filled = 0
        for chunk in chunks:
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        self.size, self.filled = size, filled
        self.connection.decoder.buffered = len(buffer)

    def received(self, data: bytes) -> None:
        """The connection's ``dataReceived`` while a frame is read here."""
        view = self.view
        assert view is not None
        filled = self.filled
        n = min(len(data), self.size - filled)
        view[filled : filled + n] = data if n == len(data) else memoryview(data)[:n]
        self.filled = filled = filled + n
        if filled < self.size and not self.connection.write_blocked:
            self.pull()
        if self.filled == self.size:
            self.complete(data[n:])

    def pull(self) -> None:
        """Read into the buffer what the socket has, up to the frame's end.
        The end of the stream or an error is left to the transport, which
        finds it on its next read."""
        view = self.view
        assert view is not None
        sock, size, filled = self.sock, self.size, self.filled
        while filled < size:
            try:
                got = sock.recv_into(view[filled:])
            except OSError:  # EAGAIN: nothing more for now
                break
            if not got:
                break
            filled += got
        self.filled = filled

    def complete(self, rest: bytes) -> None:
        """The frame is whole: decode it as the connection's ``dataReceived``
        would, then go back to the plain path with the bytes after it."""
        connection = self.connection
        if connection.__dict__.get("dataReceived") == self.received:
            del connection.dataReceived
        view = self.view
        assert view is not None
        decoder = connection.decoder
        decoder.buffered = 0
        connection.received_at = now = connection.clock.seconds()
        batch = connection.open_batch()
        try:
            decode_frame(decoder, view)
            if connection._woken:
                connection._fire_woken()
        except ProtocolError as e:
            self.release()
            connection.protocol_violation(str(e))
            connection._batch = None
            return
        except Exception:
            self.release()
            log.failure(
                "closing connection from {peer}: error handling a frame", peer=connection.peer
            )
            connection._close_after_error()
            connection._batch = None
            return
        self.release()
        connection.close_batch(batch)
        connection.last_active = now
        connection.partial_frame(True)
        if rest:
            connection.dataReceived(rest)

    def release(self) -> None:
        """Let go of the frame; keep the buffer if nothing else holds it and
        it is not too large."""
        view, self.view = self.view, None
        if view is not None:
            view.release()
        buffer = self.buffer
        if buffer is None:
            return
        if len(buffer) > KEEP_BYTES:
            self.buffer = None
            return
        try:  # a view of it still held (a kept payload) makes it fixed-size
            buffer.resize(len(buffer))
        except BufferError:
            self.buffer = None


def decode_frame(decoder: FrameDecoder, frame: memoryview) -> None:
    """Decode one whole frame, ``frame``, for ``decoder``'s handlers: the
    decoder's loop for a single frame (its size limits were checked when its
    header arrived), with the payload a memoryview into ``frame``."""
    length, kind, flags, status, call_id, timeout_ms, route_len = _unpack_header(frame)
    end = 4 + length
    body = HEADER_SIZE + route_len
    if end != len(frame) or body > end:
        raise ProtocolError(f"frame length {length} too short for its header")
    route = bytes(frame[HEADER_SIZE:body])
    metadata = None
    message = ""
    if flags & FLAG_EXT:
        if end - body < 4:
            raise ProtocolError("extension length overruns the frame")
        (ext_len,) = _unpack_u32(frame, body)
        body += 4
        if ext_len > end - body:
            raise ProtocolError("extension overruns the frame")
        ext = bytes(frame[body : body + ext_len]) if ext_len <= decoder.max_ext_size else b""
        if kind in _EXT_KINDS:
            try:
                if ext_len > decoder.max_ext_size:
                    raise ExtensionLimitError(
                        f"extension (metadata) of {ext_len} bytes exceeds the "
                        f"limit of {decoder.max_ext_size}"
                    )
                metadata, message = _decode_ext(ext, decoder.max_ext_entries)
            except ExtensionLimitError as e:
                if decoder.reject is None:
                    raise
                decoder.reject(kind, call_id, status, route, str(e))
                return
        elif kind in _SETTINGS_KINDS and ext:
            try:
                metadata, _ = _decode_ext(ext, decoder.max_ext_entries, EXT_SETTING)
            except ExtensionLimitError:
                metadata = None
        body += ext_len
    payload: bytes | memoryview = frame[body:end]
    if flags & FLAG_COMPRESSED:
        if decoder.inflate is None or kind not in _COMPRESSIBLE_KINDS:
            raise ProtocolError(f"compressed frame of kind {kind} not expected here")
        limit = decoder.max_message_frame if kind == MESSAGE else decoder.max_frame_size
        payload = decoder.inflate(payload, limit)
    handlers = decoder.handlers
    if handlers is None:
        assert decoder.on_frame is not None
        decoder.on_frame(
            Frame(kind, flags, status, call_id, timeout_ms, route, metadata, message, payload)
        )
        return
    handler = handlers.get(kind)
    if handler is None:
        raise ProtocolError(f"unexpected frame kind {kind}")
    handler(call_id, status, timeout_ms, route, metadata, message, payload)
