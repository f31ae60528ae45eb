"""gRPC's wire over HTTP/2, what both sides share (PROTOCOL-HTTP2 of the
gRPC repository): length-prefixed messages, ``grpc-timeout``, metadata as
headers, the status trailers. No HTTP/2 here (the ``h2`` library does it);
no Twisted either.

A message on an HTTP/2 stream is ``u8 compressed-flag | u32 length |
message``, big-endian; :class:`MessageReader` takes them out of DATA frames'
bytes, within a size limit, whatever the DATA frames' boundaries.
"""

from __future__ import annotations

import base64
import gzip
import math
import re
import struct
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping

__all__ = [
    "CONTENT_TYPE",
    "GrpcWireError",
    "MessageReader",
    "decode_message_text",
    "encode_message_text",
    "format_timeout",
    "frame_message",
    "gzip_payload",
    "prefix",
    "metadata_from_headers",
    "metadata_to_headers",
    "parse_timeout",
    "status_headers",
]

CONTENT_TYPE = b"application/grpc"
"""What requests and responses carry (``application/grpc+proto`` is taken too)."""

_PREFIX = struct.Struct("!BI")
PREFIX_SIZE = _PREFIX.size  # 5

RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "te",
        "user-agent",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "content-length",
        "host",
        "connection",
        "transfer-encoding",
        "accept-encoding",
    }
)
"""Headers that are gRPC's or HTTP's own, never passed as call metadata."""

_TIMEOUT_UNITS = {
    "H": 3600.0,
    "M": 60.0,
    "S": 1.0,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
}
_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")


class GrpcWireError(Exception):
    """What a peer sent is not gRPC: the stream (or connection) must end,
    with :attr:`code` (a gRPC status number) and the message."""

    def __init__(self, message: str, code: int = 13) -> None:
        super().__init__(message)
        self.code = code


def parse_timeout(value: str) -> float:
    """Seconds from a ``grpc-timeout`` header value (``"100m"``: 0.1).
    GrpcWireError for anything else (at most 8 digits and a unit)."""
    match = _TIMEOUT.match(value)
    if match is None:
        raise GrpcWireError(f"bad grpc-timeout {value[:32]!r}", code=13)
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def format_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` value for ``seconds`` (> 0): at most 8 digits in the
    finest unit that fits, rounded up to a whole unit (never shorter than asked)."""
    for unit, scale in (("n", 1e-9), ("u", 1e-6), ("m", 1e-3), ("S", 1.0), ("M", 60.0)):
        count = math.ceil(round(seconds / scale, 6))  # (rounded first: 2.5 s is 2500000u)
        if count < 100_000_000:
            return f"{max(count, 1)}{unit}"
    return f"{min(math.ceil(seconds / 3600.0), 99_999_999)}H"


def frame_message(payload: bytes, compressed: bool = False) -> bytes:
    """The 5-byte prefix and ``payload``, as one DATA frame's bytes carry it."""
    return _PREFIX.pack(1 if compressed else 0, len(payload)) + payload


def prefix(size: int, compressed: bool = False) -> bytes:
    """Only the 5-byte prefix (the payload is written after it, uncopied)."""
    return _PREFIX.pack(1 if compressed else 0, size)


class MessageReader:
    """Whole messages out of a stream's DATA bytes, in order.

    ``feed(data)`` returns the messages ``data`` completed (their payloads,
    decompressed if flagged and ``encoding`` is ``gzip``). A message longer
    than ``max_size`` is a GrpcWireError (RESOURCE_EXHAUSTED) as soon as its
    prefix is in: nothing of it is buffered. What is buffered is at most one
    partial message, kept as chunks joined once.
    """

    __slots__ = ("max_size", "encoding", "_chunks", "_buffered", "_needed")

    def __init__(self, max_size: int, encoding: str = "identity") -> None:
        self.max_size = max_size
        self.encoding = encoding
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._needed = PREFIX_SIZE

    @property
    def buffered(self) -> int:
        """Bytes of a partial message held."""
        return self._buffered

    def feed(self, data: bytes) -> list[bytes]:
        if self._chunks:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered < self._needed:
                return []
            data = b"".join(self._chunks)
            self._chunks = []
            self._buffered = 0
        messages = []
        pos = 0
        size = len(data)
        while size - pos >= PREFIX_SIZE:
            flag, length = _PREFIX.unpack_from(data, pos)
            if flag > 1:
                raise GrpcWireError(f"bad compressed flag {flag} in a message prefix")
            if length > self.max_size:
                raise GrpcWireError(
                    f"message of {length} bytes exceeds the limit of {self.max_size}", code=8
                )
            end = pos + PREFIX_SIZE + length
            if end > size:
                self._needed = PREFIX_SIZE + length
                break
            payload = data[pos + PREFIX_SIZE : end]
            if flag:
                payload = self._decompress(payload)
            messages.append(payload)
            pos = end
        else:
            self._needed = PREFIX_SIZE
        if pos < size:
            self._chunks.append(data[pos:])
            self._buffered = size - pos
        return messages

    def _decompress(self, payload: bytes) -> bytes:
        if self.encoding != "gzip":
            raise GrpcWireError(
                f"a compressed message with grpc-encoding {self.encoding!r}", code=13
            )
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(payload, self.max_size + 1)
        except zlib.error as e:
            raise GrpcWireError(f"cannot gunzip a message: {e}", code=13) from None
        if len(out) > self.max_size or inflater.unconsumed_tail:
            raise GrpcWireError(
                f"a compressed message inflates past the limit of {self.max_size}", code=8
            )
        return out


def gzip_payload(payload: bytes) -> bytes:
    """``payload`` gzipped, as a message flagged compressed carries it."""
    return gzip.compress(payload, compresslevel=6, mtime=0)


def metadata_from_headers(
    headers: Iterable[tuple[bytes | str, bytes | str]],
) -> dict[str, str]:
    """Call metadata from request headers (or trailers): every header but
    pseudo-headers and gRPC's/HTTP's own; ``-bin`` values are decoded from
    base64 and kept as text only if they are UTF-8 (else latin-1, lossless)."""
    metadata: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("ascii", "replace") if isinstance(raw_name, bytes) else raw_name
        value = raw_value if isinstance(raw_value, bytes) else raw_value.encode("utf-8")
        if name.startswith(":") or name in RESERVED_HEADERS:
            continue
        if name.endswith("-bin"):
            try:
                decoded = base64.b64decode(value + b"=" * (-len(value) % 4))
            except ValueError:
                continue
            try:
                metadata[name] = decoded.decode("utf-8")
            except UnicodeDecodeError:
                metadata[name] = decoded.decode("latin-1")
        else:
            metadata[name] = value.decode("utf-8", "replace")
    return metadata


def metadata_to_headers(metadata: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """Headers for call metadata: keys lower-cased, ``-bin`` values base64
    (unpadded, as gRPC sends them), others as text; reserved names dropped."""
    headers = []
    for key, value in (metadata or {}).items():
        name = key.lower()
        if name.startswith(":") or name in RESERVED_HEADERS:
            continue
        if name.endswith("-bin"):
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            headers.append((name, base64.b64encode(raw).decode("ascii").rstrip("=")))
        else:
            headers.append((name, value))
    return headers


def encode_message_text(message: str) -> str:
    """``grpc-message``: percent-encoded as PROTOCOL-HTTP2 asks."""
    return urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def decode_message_text(value: str) -> str:
    return urllib.parse.unquote(value, errors="replace")


def status_headers(
    code: int, message: str = "", trailers: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """The trailers that end a call: ``grpc-status``, ``grpc-message`` (if
    any) and trailing metadata."""
    headers = [("grpc-status", str(int(code)))]
    if message:
        headers.append(("grpc-message", encode_message_text(message)))
    headers.extend(metadata_to_headers(trailers))
    return headers
