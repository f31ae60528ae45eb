"""Per-message compression on the native wire.

A REQUEST, RESPONSE or MESSAGE frame whose ``flags`` has
:data:`twisted_rpc.core._codec.FLAG_COMPRESSED` set carries, as its
payload, one byte naming the encoding (:data:`ENCODING_IDS`) and then the
compressed message. Which encodings each end accepts is told in the settings
(``encodings``, see docs/protocol.md); a sender compresses only for a peer
that listed the encoding. zlib comes with Python; zstd is offered only when
the ``zstandard`` package is importable.

A receiver inflates with a streaming decompressor bounded by its frame size
limit: a bomb (a few KiB inflating to gigabytes) is refused as soon as its
output passes the limit, never inflated whole. This module knows nothing of
Twisted.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import Any

from twisted_rpc.core._codec import FLAG_COMPRESSED, ProtocolError

__all__ = [
    "DEFAULT_COMPRESS_THRESHOLD",
    "ENCODING_IDS",
    "NEVER",
    "CompressionError",
    "available_encodings",
    "check_encoding",
    "compress_frame",
    "inflate",
    "parse_encodings",
]

try:  # optional: zstd only when the package is installed
    import zstandard as _zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - depends on the environment
    _zstd = None

ENCODING_IDS: dict[str, int] = {"zlib": 1, "zstd": 2}
"""The byte that starts a compressed payload, by encoding name."""
_NAMES = {v: k for k, v in ENCODING_IDS.items()}

DEFAULT_COMPRESS_THRESHOLD = 1024
"""Payloads smaller than this many bytes are sent as they are."""

NEVER = 1 << 62
"""A threshold no payload reaches: compression off."""

ZLIB_LEVEL = 1
"""zlib's fastest level: most of the gain on the repetitive bytes of messages."""

_U32 = struct.Struct("!I")
_INFLATE_STEP = 256 * 1024
"""zlib is fed, and zstd read, in steps of this many bytes."""


class CompressionError(ProtocolError):
    """A compressed payload that cannot be taken: an encoding not offered,
    corrupt data, or more bytes once inflated than the receiver's limit.
    The connection closes (its stream is out of step with no way back)."""


def available_encodings() -> tuple[str, ...]:
    """The encodings this process can read and write: zlib, and zstd when
    the ``zstandard`` package is importable."""
    return ("zlib", "zstd") if _zstd is not None else ("zlib",)


def check_encoding(name: object, what: str = "compression") -> str | None:
    """``name`` if it is an encoding this process has (None stays None);
    ValueError (TypeError for a non-string) otherwise."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{what} must be an encoding name or None, not {name!r}")
    if name not in ENCODING_IDS:
        raise ValueError(f"{what} must be one of {', '.join(ENCODING_IDS)} or none, not {name!r}")
    if name not in available_encodings():
        raise ValueError(f"{what} {name!r} needs the zstandard package, which is not installed")
    return name


def parse_encodings(value: str | None) -> tuple[str, ...]:
    """The encodings a peer's ``encodings`` setting lists that this process
    has too, in the peer's order (unknown names are skipped)."""
    if not value:
        return ()
    have = available_encodings()
    return tuple(n for n in (p.strip() for p in value.split(",")) if n in have)


def _compress(encoding: str, payload: bytes) -> bytes:
    if encoding == "zlib":
        return zlib.compress(payload, ZLIB_LEVEL)
    assert _zstd is not None
    return bytes(_zstd.ZstdCompressor(level=1).compress(payload))


def compress_frame(header: bytes, payload: bytes, encoding: str) -> tuple[bytes, bytes, int]:
    """``header`` and ``payload`` of a frame, compressed with ``encoding``:
    the flag set in the header, its length fixed, the payload the encoding
    byte and the compressed bytes. Returns the frame unchanged when that
    would not make it smaller; the third item is the payload's new size."""
    packed = bytes((ENCODING_IDS[encoding],)) + _compress(encoding, payload)
    if len(packed) >= len(payload):
        return header, payload, len(payload)
    out = bytearray(header)
    (length,) = _U32.unpack_from(out, 0)
    _U32.pack_into(out, 0, length - len(payload) + len(packed))
    out[5] |= FLAG_COMPRESSED
    return bytes(out), packed, len(packed)


def inflate(payload: bytes | memoryview, limit: int, accepted: Iterable[str]) -> bytes:
    """The message in a compressed ``payload``; CompressionError if its
    encoding is not in ``accepted``, it is corrupt, or it inflates past
    ``limit`` bytes (found out after at most ``limit + 1`` bytes of output)."""
    if not len(payload):
        raise CompressionError("compressed payload without an encoding byte")
    ident = payload[0]
    name = _NAMES.get(ident)
    if name is None or name not in accepted:
        raise CompressionError(f"compressed with encoding {ident}, which this end did not offer")
    data = memoryview(payload)[1:]  # (no copy)
    if name == "zlib":
        return _inflate_zlib(data, limit)
    return _inflate_zstd(bytes(data), limit)


def _inflate_zlib(data: memoryview, limit: int) -> bytes:
    """Fed in steps, so neither the input (zlib copies what it has not
    consumed) nor the output is held whole past ``limit``."""
    d = zlib.decompressobj()
    parts: list[bytes] = []
    room = limit + 1
    size = len(data)
    pos = 0
    try:
        while pos < size and not d.eof:
            out = d.decompress(data[pos : pos + _INFLATE_STEP], room)
            pos += _INFLATE_STEP
            room -= len(out)
            if room <= 0:
                raise CompressionError(
                    f"compressed payload inflates past the limit of {limit} bytes"
                )
            parts.append(out)
    except zlib.error as e:
        raise CompressionError(f"corrupt zlib payload: {e}") from None
    if not d.eof or d.unused_data or pos < size:
        raise CompressionError("truncated or trailing bytes in a zlib payload")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _inflate_zstd(data: bytes, limit: int) -> bytes:  # pragma: no cover - needs zstandard
    assert _zstd is not None
    reader: Any = _zstd.ZstdDecompressor().stream_reader(data)
    parts: list[bytes] = []
    total = 0
    try:
        while True:
            chunk = reader.read(min(_INFLATE_STEP, limit + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise CompressionError(
                    f"compressed payload inflates past the limit of {limit} bytes"
                )
    except _zstd.ZstdError as e:
        raise CompressionError(f"corrupt zstd payload: {e}") from None
    return b"".join(parts)
