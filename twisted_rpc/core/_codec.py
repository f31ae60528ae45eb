"""The native wire codec: frame layout, encoders and an incremental decoder.

Byte-by-byte description in ``docs/protocol.md``. In short, every frame is::

    u32 length | u8 kind | u8 flags | u16 status | u32 call id | u32 timeout ms
    | u16 route length | route | [u32 ext length | ext] | payload

all big-endian. ``length`` counts the bytes after itself. The extension holds
the rare fields (metadata, error text) as tagged entries and is present only
when ``flags & FLAG_EXT``. This module knows nothing of Twisted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from enum import IntEnum

from twisted_rpc.core._ext import (
    EXT_SETTING,
    ExtensionLimitError,
    ProtocolError,
    _decode_ext,
    _encode_ext,
)
from twisted_rpc.core._frame import Frame

__all__ = [
    "DEFAULT_MAX_EXT_ENTRIES",
    "DEFAULT_MAX_EXT_SIZE",
    "DEFAULT_MAX_FRAME_SIZE",
    "ExtensionLimitError",
    "FLAG_COMPRESSED",
    "FLAG_EXT",
    "FieldHandler",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "GoawayReason",
    "HEADER_SIZE",
    "ProtocolError",
    "RejectHandler",
    "encode_cancel",
    "encode_end_stream",
    "encode_headers",
    "encode_message",
    "encode_window",
    "encode_goaway",
    "encode_ping",
    "encode_pong",
    "encode_request",
    "encode_response",
    "encode_status",
]

DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_EXT_SIZE = 8 * 1024
"""Largest extension block (metadata and error text) a receiver decodes."""
DEFAULT_MAX_EXT_ENTRIES = 64
"""Most extension entries a receiver walks in one frame."""

_HEADER = struct.Struct("!IBBHIIH")
HEADER_SIZE = _HEADER.size  # 18, the length prefix included
_FIXED_AFTER_LENGTH = HEADER_SIZE - 4
_U32 = struct.Struct("!I")

FLAG_EXT = 0x01
"""An extension block follows the route."""
FLAG_END_STREAM = 0x02
"""Unused: END_STREAM is a frame kind, so frame handlers need no flags."""
FLAG_COMPRESSED = 0x04
"""The payload (of a REQUEST, RESPONSE or MESSAGE) is compressed: an
encoding byte, then the compressed bytes (see ``_compress``)."""

NOT_RUN_KEY = "rpc-not-run"
"""A trailer (metadata pair) of a failed unary RESPONSE: the provider answered
without running the call (shed), so it may be sent elsewhere."""

_pack_header = _HEADER.pack
pack_header = _pack_header
"""The fixed header's packer: (length after the prefix, kind, flags, status,
call id, timeout ms, route length). For a hot path that inlines
:func:`encode_request` (the consumer's ``ClientConnection.call``); any other
caller uses the encode functions."""
FIXED_AFTER_LENGTH = _FIXED_AFTER_LENGTH
_unpack_header = _HEADER.unpack_from
_unpack_u32 = _U32.unpack_from
_LARGE = 64 * 1024  # payloads from this size on are passed as memoryviews, not copied
_SPLIT = 8 * 1024
"""A partial frame's bytes from this many on are kept as a view of the read
they came in, not copied; and when a read completes a frame and goes on this
far past its end, only the frame is joined (not the whole read)."""


class FrameKind(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    CANCEL = 3
    PING = 4
    PONG = 5
    GOAWAY = 6
    MESSAGE = 7
    END_STREAM = 8
    WINDOW = 9
    HEADERS = 10


class GoawayReason(IntEnum):
    """Why a provider sent GOAWAY, carried in the frame's ``status`` field.

    The consumer acts on it: after ``IDLE`` it redials on the next call as if
    nothing happened; after ``SHUTDOWN`` (and ``UNSPECIFIED``, what a peer
    that does not say sends) it takes the provider out of rotation; after
    ``OVERLOAD`` it sends elsewhere while it can. In every case the calls
    above the frame's ``last_call_id`` were never run and are sent again.
    """

    UNSPECIFIED = 0
    SHUTDOWN = 1
    IDLE = 2
    OVERLOAD = 3


REQUEST = FrameKind.REQUEST.value
RESPONSE = FrameKind.RESPONSE.value
GOAWAY, PING, PONG = FrameKind.GOAWAY.value, FrameKind.PING.value, FrameKind.PONG.value
MESSAGE, WINDOW, HEADERS = FrameKind.MESSAGE.value, FrameKind.WINDOW.value, FrameKind.HEADERS.value

_EXT_KINDS = frozenset({REQUEST, RESPONSE, GOAWAY, HEADERS})
"""Kinds whose extension is read for metadata and error text (PING and PONG:
for settings); in the others it means nothing and is skipped unread."""

_SETTINGS_KINDS = frozenset({PING, PONG})
_COMPRESSIBLE_KINDS = frozenset({REQUEST, RESPONSE, MESSAGE})


# --------------------------------------------------------------------------- encoding


def encode_header(
    kind: int,
    call_id: int,
    payload_size: int,
    *,
    status: int = 0,
    timeout_ms: int = 0,
    route: bytes = b"",
    metadata: Mapping[str, str] | None = None,
    message: str = "",
    flags: int = 0,
) -> bytes:
    """Everything of a frame but its payload (which the caller writes after it)."""
    if metadata or message:
        ext = _encode_ext(metadata, message)
        flags |= FLAG_EXT
    else:
        ext = b""
    length = _FIXED_AFTER_LENGTH + len(route) + len(ext) + payload_size
    return _pack_header(length, kind, flags, status, call_id, timeout_ms, len(route)) + route + ext


def encode_request(
    call_id: int,
    route: bytes,
    payload_size: int,
    timeout_ms: int = 0,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Header of a REQUEST frame; ``route`` is ``b"package.Service/Method"``."""
    if metadata:
        return encode_header(
            REQUEST, call_id, payload_size, timeout_ms=timeout_ms, route=route, metadata=metadata
        )
    return (
        _pack_header(
            _FIXED_AFTER_LENGTH + len(route) + payload_size,
            REQUEST,
            0,
            0,
            call_id,
            timeout_ms,
            len(route),
        )
        + route
    )


def encode_response(call_id: int, payload_size: int) -> bytes:
    """Header of a successful RESPONSE frame."""
    return _pack_header(_FIXED_AFTER_LENGTH + payload_size, RESPONSE, 0, 0, call_id, 0, 0)


def encode_status(call_id: int, status: int, message: str = "") -> bytes:
    """A whole RESPONSE frame carrying a failure status and its message."""
    return encode_header(RESPONSE, call_id, 0, status=status, message=message)


def encode_cancel(call_id: int) -> bytes:
    """CANCEL: the consumer gave up on ``call_id`` (a call or a stream)."""
    return _pack_header(_FIXED_AFTER_LENGTH, FrameKind.CANCEL, 0, 0, call_id, 0, 0)


def encode_ping(
    ping_id: int, payload: bytes = b"", settings: Mapping[str, str] | None = None
) -> bytes:
    """A PING; ``settings`` (the sender's) ride in its extension."""
    return _control(PING, ping_id, payload, settings)


def encode_pong(
    ping_id: int, payload: bytes = b"", settings: Mapping[str, str] | None = None
) -> bytes:
    return _control(PONG, ping_id, payload, settings)


def _control(kind: int, ping_id: int, payload: bytes, settings: Mapping[str, str] | None) -> bytes:
    """A PING or PONG with ``settings`` as EXT_SETTING entries: what its
    sender supports and its limits (``{"streams": "1", ...}``). A receiver
    that knows no settings skips them (unknown extension tags are skipped,
    and older receivers skip a PING's extension unread)."""
    flags = 0
    ext = b""
    if settings:
        ext = _encode_ext(settings, "", EXT_SETTING)
        flags = FLAG_EXT
    length = _FIXED_AFTER_LENGTH + len(ext) + len(payload)
    return _pack_header(length, kind, flags, 0, ping_id, 0, 0) + ext + payload


def encode_message(call_id: int, payload_size: int) -> bytes:
    """Header of a MESSAGE frame: one message of stream ``call_id``."""
    return _pack_header(_FIXED_AFTER_LENGTH + payload_size, MESSAGE, 0, 0, call_id, 0, 0)


def encode_end_stream(call_id: int) -> bytes:
    """END_STREAM: the consumer sends no more messages on stream ``call_id``."""
    return _pack_header(_FIXED_AFTER_LENGTH, FrameKind.END_STREAM, 0, 0, call_id, 0, 0)


def encode_window(call_id: int, increment: int) -> bytes:
    """WINDOW: the receiver of stream ``call_id`` grants ``increment`` more
    bytes of credit (carried where a REQUEST has its timeout)."""
    return _pack_header(_FIXED_AFTER_LENGTH, WINDOW, 0, 0, call_id, increment, 0)


def encode_headers(call_id: int, metadata: Mapping[str, str]) -> bytes:
    """HEADERS: the provider's initial metadata for stream ``call_id``."""
    return encode_header(HEADERS, call_id, 0, metadata=metadata)


def encode_goaway(
    last_call_id: int, message: str = "", reason: int = GoawayReason.SHUTDOWN
) -> bytes:
    """GOAWAY: the sender takes no new calls; ``last_call_id`` is the last it
    accepted; ``reason`` (a :class:`GoawayReason`) goes in the status field."""
    return encode_header(FrameKind.GOAWAY, last_call_id, 0, status=int(reason), message=message)


# --------------------------------------------------------------------------- decoding


FieldHandler = Callable[
    [int, int, int, bytes, "dict[str, str] | None", str, "bytes | memoryview"], object
]
"""A handler of one frame kind, given the frame's fields:
``(call_id, status, timeout_ms, route, metadata, message, payload)``. For a
PING or PONG, ``metadata`` holds the settings; for a WINDOW, ``timeout_ms``
the credit increment."""

RejectHandler = Callable[[int, int, int, bytes, str], object]
"""Given ``(kind, call_id, status, route, why)`` for a whole frame whose
extension is over the limits (:class:`ExtensionLimitError`); its payload and
extension are skipped unread. It may answer the frame (a REQUEST) or raise
to close the connection. Without one, such a frame is a protocol error."""


class FrameDecoder:
    """Turns a byte stream into frames.

    ``sink`` is a callable taking every frame as a :class:`Frame`, or a
    mapping from frame kind to a :data:`FieldHandler`, which is given the
    frame's fields without a ``Frame`` built for them (the connections' hot
    path); a frame of a kind not in the mapping is a protocol error.

    Complete frames are sliced straight out of the received chunk; only a
    partial frame is kept, as a list of chunks joined once when its last byte
    arrives, so the cost stays linear in the frame size. Payloads of 64 KiB
    and more are memoryviews into that buffer rather than copies.

    The extension of a REQUEST, RESPONSE or GOAWAY is decoded only when it is
    at most ``max_ext_size`` bytes of at most ``max_ext_entries`` entries
    (so the work per frame is bounded whatever its size); past either, the
    frame goes to ``reject`` (see :data:`RejectHandler`) unread. Other kinds
    carry no meaningful extension: theirs is skipped unread.
    """

    __slots__ = (
        "on_frame",
        "handlers",
        "reject",
        "max_frame_size",
        "max_ext_size",
        "max_ext_entries",
        "max_message_frame",
        "inflate",
        "buffered",
        "_chunks",
        "needed",
        "_pinned",
    )

    def __init__(
        self,
        sink: Callable[[Frame], object] | Mapping[int, FieldHandler],
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_ext_size: int = DEFAULT_MAX_EXT_SIZE,
        max_ext_entries: int = DEFAULT_MAX_EXT_ENTRIES,
        reject: RejectHandler | None = None,
    ) -> None:
        if isinstance(sink, Mapping):
            self.handlers: Mapping[int, FieldHandler] | None = sink
            self.on_frame: Callable[[Frame], object] | None = None
        else:
            self.handlers = None
            self.on_frame = sink
        self.reject = reject
        self.max_frame_size = max_frame_size
        self.max_ext_size = max_ext_size
        self.max_ext_entries = max_ext_entries
        self.max_message_frame = max_frame_size
        """Largest MESSAGE frame (``length``) taken: a larger one is refused
        as soon as its header is in, before its body is buffered."""
        self.inflate: Callable[[bytes | memoryview, int], bytes] | None = None
        """Given a compressed payload and the most bytes it may inflate to,
        returns the message or raises ProtocolError (None: a compressed
        frame is a protocol error)."""
        self.buffered = 0
        """Bytes held for a frame not complete yet (0: none started)."""
        self._chunks: list[bytes | memoryview] = []
        self.needed = 0
        """While a frame is partly in: its size (length prefix included), or
        a header's while fewer bytes than that are in."""
        self._pinned = 0
        """Bytes of the read a held view pins beside those it shows."""

    def clear(self) -> None:
        """Drop a partial frame and every reference to the handlers (the
        connection is gone: nothing holds it alive through its decoder)."""
        self._chunks = []
        self.buffered = 0
        self.needed = 0
        self._pinned = 0
        self.handlers = {}
        self.on_frame = None
        self.reject = None
        self.inflate = None

    def take_partial(self, at_least: int) -> tuple[list[bytes | memoryview], int] | None:
        """Hand over the partial frame (its chunks and its size) to a reader
        that completes it, if its header is in and it is ``at_least`` bytes."""
        if not self._chunks or self.needed < at_least:
            return None
        chunks, self._chunks = self._chunks, []
        self._pinned = 0
        return chunks, self.needed

    @property
    def held(self) -> int:
        """Bytes the partial frame keeps in memory: :attr:`buffered`, and the
        rest of the read a held view of it pins (at most one read more)."""
        return self.buffered + self._pinned

    def feed(self, data: bytes) -> int:
        """Decode what ``data`` completes; raise ProtocolError on a bad frame.

        Returns the number of bytes of whole frames decoded (those buffered
        from earlier calls included): 0 when no frame was completed.

        A handler may raise too; the exception propagates and the rest of
        ``data`` is dropped, as the connection is closing anyway.
        """
        chunks = self._chunks
        handlers = self.handlers
        pos = done = 0
        if chunks:
            buffered = self.buffered + len(data)
            needed = self.needed
            if buffered < needed:
                chunks.append(data)
                self.buffered = buffered
                return 0
            pos = needed - self.buffered  # what of data completes the frame
            if needed > HEADER_SIZE and len(data) - pos >= _SPLIT:
                # The frame's size is known and data goes on well past its
                # end: join the frame alone (not all of data, only to slice
                # its rest off again) and decode the rest where it lies.
                chunks.append(memoryview(data)[:pos])
                whole = b"".join(chunks)
                chunks.clear()
                self.buffered = self._pinned = 0
                done = self.feed(whole) - pos  # (one whole frame)
            else:
                chunks.append(data)
                data = b"".join(chunks)
                chunks.clear()
                self.buffered = self._pinned = pos = 0
        size = len(data)
        max_frame = self.max_frame_size
        max_message = self.max_message_frame
        while size - pos >= HEADER_SIZE:
            length, kind, flags, status, call_id, timeout_ms, route_len = _unpack_header(data, pos)
            if length > max_message:  # (max_message <= max_frame: one test for most frames)
                if length > max_frame:
                    raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_frame}")
                if kind == MESSAGE:
                    raise ProtocolError(
                        f"stream message frame of {length} bytes exceeds the limit of "
                        f"{max_message} (the receiver's max_message_size)"
                    )
            if length < _FIXED_AFTER_LENGTH + route_len:
                raise ProtocolError(f"frame length {length} too short for its header")
            end = pos + 4 + length
            if end > size:
                self.needed = 4 + length
                break
            body = pos + HEADER_SIZE + route_len
            route = data[pos + HEADER_SIZE : body] if route_len else b""
            metadata = None
            message = ""
            if flags & FLAG_EXT:
                if end - body < 4:
                    raise ProtocolError("extension length overruns the frame")
                (ext_len,) = _unpack_u32(data, body)
                body += 4
                if ext_len > end - body:
                    raise ProtocolError("extension overruns the frame")
                if kind in _EXT_KINDS:
                    try:
                        if ext_len > self.max_ext_size:
                            raise ExtensionLimitError(
                                f"extension (metadata) of {ext_len} bytes exceeds the "
                                f"limit of {self.max_ext_size}"
                            )
                        metadata, message = _decode_ext(
                            data[body : body + ext_len], self.max_ext_entries
                        )
                    except ExtensionLimitError as e:
                        if self.reject is None:
                            raise
                        pos = end
                        self.reject(kind, call_id, status, route, str(e))
                        continue
                elif kind in _SETTINGS_KINDS and ext_len <= self.max_ext_size:
                    # Settings arrive as the ``metadata`` argument of a PING
                    # or PONG handler; past the limits they are ignored.
                    try:
                        metadata, _ = _decode_ext(
                            data[body : body + ext_len], self.max_ext_entries, EXT_SETTING
                        )
                    except ExtensionLimitError:
                        metadata = None
                body += ext_len
            pos = end
            payload = data[body:end] if end - body < _LARGE else memoryview(data)[body:end]
            if flags & FLAG_COMPRESSED:
                if self.inflate is None or kind not in _COMPRESSIBLE_KINDS:
                    raise ProtocolError(f"compressed frame of kind {kind} not expected here")
                payload = self.inflate(payload, max_message if kind == MESSAGE else max_frame)
            if handlers is None:
                frame = Frame(
                    kind, flags, status, call_id, timeout_ms, route, metadata, message, payload
                )
                self.on_frame(frame)  # type: ignore[misc]
                continue
            handler = handlers.get(kind)
            if handler is None:
                raise ProtocolError(f"unexpected frame kind {kind}")
            handler(call_id, status, timeout_ms, route, metadata, message, payload)
        else:
            self.needed = HEADER_SIZE
            if pos < size and size - pos >= 4:
                # Reject an oversized length as soon as its four bytes are in.
                (length,) = _unpack_u32(data, pos)
                if length > max_frame:
                    raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_frame}")
        if pos < size:
            left = size - pos
            if left < _SPLIT:
                chunks.append(data[pos:])
            else:  # a view, not a copy: it pins all of data (see held)
                chunks.append(memoryview(data)[pos:])
                self._pinned = pos
            self.buffered = left
        return pos + done
