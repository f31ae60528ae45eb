"""A gRPC request's HTTP/2 header list, read and checked in one pass:
:func:`read_request_headers`.

h2 is told not to check received headers itself (its generic checks cost
more than the rest of a call); this pass checks what RFC 9113 asks of a
request (8.2, 8.3) and takes out what gRPC needs (PROTOCOL-HTTP2's
``Request-Headers``): the path, method, content type, ``grpc-timeout``,
``grpc-encoding`` and the call's metadata (``-bin`` values base64-decoded,
as :func:`twisted_rpc.grpc._wire.metadata_from_headers` does).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping

from twisted.logger import Logger

from twisted_rpc.grpc._wire import RESERVED_HEADERS, metadata_to_headers

log = Logger(namespace="twisted_rpc.grpc")

__all__ = ["RequestHead", "read_request_headers", "response_metadata"]

_NAME = re.compile(rb"[a-z0-9!#$%&'*+\-.^_`|~]+\Z")
_METADATA_NAME = re.compile(r"[a-z0-9_.\-]+\Z")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_NOT_METADATA = frozenset(name.encode() for name in RESERVED_HEADERS) | _CONNECTION_SPECIFIC


class RequestHead:
    """What a request's headers say; ``malformed`` is why they are not a
    request (None: they are)."""

    __slots__ = (
        "path",
        "method",
        "content_type",
        "timeout",
        "encoding",
        "metadata",
        "metadata_size",
        "malformed",
    )

    def __init__(self) -> None:
        self.path: bytes | None = None
        self.method: bytes | None = None
        self.content_type: bytes | None = None
        self.timeout: bytes | None = None
        self.encoding: bytes | None = None
        self.metadata: dict[str, str] = {}
        self.metadata_size = 0
        """Characters of the metadata's names and values."""
        self.malformed: str | None = None


def read_request_headers(headers: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """Read a request's header list (names and values as bytes, as h2 gives
    them with ``header_encoding=None``)."""
    head = RequestHead()
    metadata = head.metadata
    size = 0
    regular = False
    scheme = False
    for key, value in headers:
        if key[:1] == b":":
            if regular:
                head.malformed = f"pseudo-header {_show(key)} after a header"
            elif key == b":path" and head.path is None:
                head.path = value
            elif key == b":method" and head.method is None:
                head.method = value
            elif key == b":scheme" and not scheme:
                scheme = True
            elif key != b":authority":
                head.malformed = f"pseudo-header {_show(key)} unknown or repeated"
            continue
        regular = True
        if _NAME.match(key) is None:
            head.malformed = f"header name {_show(key)}"
        elif value and _BAD_VALUE.search(value) is not None:
            head.malformed = f"a bad character in the value of {_show(key)}"
        elif key in _NOT_METADATA:
            if key == b"content-type":
                head.content_type = value
            elif key == b"grpc-timeout":
                head.timeout = value
            elif key == b"grpc-encoding":
                head.encoding = value
            elif key in _CONNECTION_SPECIFIC or (key == b"te" and value != b"trailers"):
                head.malformed = f"header {_show(key)} (connection-specific)"
        else:
            name = key.decode("ascii")
            if name.endswith("-bin"):
                try:
                    raw = base64.b64decode(value + b"=" * (-len(value) % 4))
                except (binascii.Error, ValueError):
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
            else:
                text = value.decode("utf-8", "replace")
            metadata[name] = text
            size += len(name) + len(text)
    if head.malformed is None and (head.path is None or head.method is None or not scheme):
        head.malformed = "a pseudo-header (:method, :scheme, :path) is missing"
    head.metadata_size = size
    return head


def _show(key: bytes) -> str:
    return repr(bytes(key[:32]))


def response_metadata(metadata: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """Headers for a handler's initial or trailing metadata; a pair gRPC
    cannot carry (a name not of ``[a-z0-9_.-]``, a text value not printable
    ASCII: use a ``-bin`` key for other bytes) is left out, logged."""
    headers = []
    for name, value in metadata_to_headers(metadata):
        if _METADATA_NAME.match(name) is None or (
            not name.endswith("-bin") and _METADATA_VALUE.match(value) is None
        ):
            log.warn(
                "gRPC listener: metadata {name!r} not sent (a name of [a-z0-9_.-], a "
                "printable ASCII value; binary values under a -bin key)",
                name=name[:64],
            )
            continue
        headers.append((name, value))
    return headers
