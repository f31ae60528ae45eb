"""What a gRPC server's answer means on the consumer: its headers and
trailers read into a status, HTTP failures and stream resets mapped to
gRPC codes as PROTOCOL-HTTP2 and http-grpc-status-mapping.md say, and the
request headers a call sends. No HTTP/2 here (``_client`` has it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from twisted_rpc._version import __version__
from twisted_rpc.client._calls import NotSentError
from twisted_rpc.core._status import RpcError, StatusCode
from twisted_rpc.grpc._wire import (
    CONTENT_TYPE,
    decode_message_text,
    format_timeout,
    metadata_from_headers,
    metadata_to_headers,
)

__all__ = [
    "header_fields",
    "request_headers",
    "reset_error",
    "response_error",
    "trailers_status",
]

USER_AGENT = f"twisted-rpc/{__version__}"
_CONTENT_TYPE = CONTENT_TYPE.decode()

Headers = Iterable[tuple[bytes | str, bytes | str]]

HTTP_TO_GRPC = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}
"""An HTTP status other than 200 without a grpc-status: this code (else UNKNOWN)."""

RESET_TO_GRPC = {
    7: StatusCode.UNAVAILABLE,  # REFUSED_STREAM: never processed
    8: StatusCode.CANCELLED,  # CANCEL
    11: StatusCode.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    12: StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}
"""A RST_STREAM's error code: this gRPC code (else INTERNAL)."""

_KEY = re.compile(r"[0-9a-z_.-]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def header_fields(headers: Headers) -> dict[str, str]:
    """The first value of each header, names and values as text (latin-1:
    lossless; gRPC's own headers are ASCII)."""
    fields: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1") if isinstance(name, bytes) else name
        if key not in fields:
            fields[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    return fields


def request_headers(
    path: str,
    scheme: str,
    authority: str,
    timeout: float,
    metadata: Mapping[str, str] | None,
) -> list[tuple[str, str]]:
    """A call's HEADERS. ValueError for metadata HTTP/2 cannot carry (a key
    not lower-case letters, digits, ``-_.``; a text value not printable ASCII)."""
    headers = [
        (":method", "POST"),
        (":scheme", scheme),
        (":path", path),
        (":authority", authority),
        ("content-type", _CONTENT_TYPE),
        ("te", "trailers"),
        ("user-agent", USER_AGENT),
        ("grpc-accept-encoding", "identity,gzip"),
    ]
    if timeout:
        headers.append(("grpc-timeout", format_timeout(timeout)))
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not _KEY.fullmatch(key.lower()):
                raise ValueError(f"metadata key {key!r}: lower-case letters, digits, -_. only")
            if not key.lower().endswith("-bin") and (
                not isinstance(value, str) or not _PRINTABLE.fullmatch(value)
            ):
                raise ValueError(
                    f"metadata {key!r}: a text value must be printable ASCII "
                    f"(use a -bin key for bytes)"
                )
        headers.extend(metadata_to_headers(metadata))
    return headers


def response_error(fields: Mapping[str, str]) -> RpcError | None:
    """Why response headers (or a trailers-only response) end the call
    before any message: an HTTP status other than 200, a content-type that is
    not gRPC's, an encoding not known. None: go on."""
    status = fields.get(":status", "")
    if status != "200":
        if "grpc-status" in fields:
            return trailers_status(fields)
        try:
            code = HTTP_TO_GRPC.get(int(status), StatusCode.UNKNOWN)
        except ValueError:
            code = StatusCode.UNKNOWN
        return RpcError.from_status(code, f"the server answered HTTP status {status[:16]}")
    content_type = fields.get("content-type", "")
    if not content_type.startswith(_CONTENT_TYPE):
        if "grpc-status" in fields:
            return trailers_status(fields)
        return RpcError.from_status(
            StatusCode.UNKNOWN,
            f"the server answered content-type {content_type[:64]!r}, not application/grpc",
        )
    encoding = fields.get("grpc-encoding", "identity")
    if encoding not in ("identity", "gzip"):
        return RpcError.from_status(
            StatusCode.INTERNAL, f"the server compressed with {encoding[:32]!r} (not asked)"
        )
    return None


def trailers_status(fields: Mapping[str, str]) -> RpcError | None:
    """The call's end from its trailers: None for OK, else the typed error
    with its (percent-decoded) message. No grpc-status: UNKNOWN."""
    raw = fields.get("grpc-status")
    if raw is None:
        return RpcError.from_status(StatusCode.UNKNOWN, "the server sent no grpc-status")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 5):
        return RpcError.from_status(StatusCode.UNKNOWN, f"bad grpc-status {raw[:16]!r}")
    code = int(raw)
    if code == 0:
        return None
    if code > StatusCode.UNAUTHENTICATED:
        code = StatusCode.UNKNOWN
    message = decode_message_text(fields.get("grpc-message", ""))
    return RpcError.from_status(code, message)


def trailing_metadata(headers: Headers) -> dict[str, str]:
    return metadata_from_headers(headers)


def reset_error(error_code: int, peer: str) -> RpcError:
    """The end of a call whose stream the server reset with ``error_code``."""
    code = RESET_TO_GRPC.get(int(error_code), StatusCode.INTERNAL)
    message = f"{peer} reset the stream (HTTP/2 error {int(error_code)})"
    if code == StatusCode.UNAVAILABLE:
        return NotSentError(message=message + ": refused, never run")
    return RpcError.from_status(code, message)
