"""The native wire's extension block: the tagged entries (metadata pairs,
error text, settings) a frame carries when ``flags & FLAG_EXT``, and the
decode errors (``docs/protocol.md``). Re-exported by ``_codec``."""

from __future__ import annotations

import struct
from collections.abc import Mapping

__all__ = [
    "EXT_ERROR_MESSAGE",
    "EXT_METADATA",
    "EXT_SETTING",
    "ExtensionLimitError",
    "ProtocolError",
]

_U32 = struct.Struct("!I")
_EXT_ENTRY = struct.Struct("!BI")
_U16 = struct.Struct("!H")
_unpack_entry = _EXT_ENTRY.unpack_from

EXT_ERROR_MESSAGE = 1
EXT_METADATA = 2
EXT_SETTING = 3
"""A setting, in a PING or PONG only: laid out as a metadata pair."""


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame; the connection must close."""


class ExtensionLimitError(ProtocolError):
    """A frame's extension is over the receiver's limits. The frame is whole
    and well delimited, so the connection can live on: see
    :data:`RejectHandler`."""


def _encode_ext(
    metadata: Mapping[str, str] | None, message: str, pair_tag: int = EXT_METADATA
) -> bytes:
    parts = []
    if message:
        raw = message.encode("utf-8")
        parts.append(_EXT_ENTRY.pack(EXT_ERROR_MESSAGE, len(raw)))
        parts.append(raw)
    if metadata:
        for key, value in metadata.items():
            k = key.encode("utf-8")
            v = value.encode("utf-8")
            parts.append(_EXT_ENTRY.pack(pair_tag, 2 + len(k) + len(v)))
            parts.append(_U16.pack(len(k)))
            parts.append(k)
            parts.append(v)
    ext = b"".join(parts)
    return _U32.pack(len(ext)) + ext


def _decode_ext(
    ext: bytes, max_entries: int, pair_tag: int = EXT_METADATA
) -> tuple[dict[str, str] | None, str]:
    metadata: dict[str, str] | None = None
    message = ""
    pos = 0
    end = len(ext)
    entries = 0
    try:
        while pos < end:
            entries += 1
            if entries > max_entries:
                raise ExtensionLimitError(
                    f"more than {max_entries} extension entries (metadata pairs) in one frame"
                )
            if end - pos < _EXT_ENTRY.size:
                raise ProtocolError("truncated extension entry")
            tag, size = _unpack_entry(ext, pos)
            pos += _EXT_ENTRY.size
            if size > end - pos:
                raise ProtocolError("extension entry overruns the extension block")
            value = ext[pos : pos + size]
            pos += size
            if tag == EXT_ERROR_MESSAGE:
                message = value.decode("utf-8")
            elif tag == pair_tag:
                if size < 2:
                    raise ProtocolError("metadata entry without a key length")
                (klen,) = _U16.unpack_from(value, 0)
                if klen > size - 2:
                    raise ProtocolError("metadata key overruns its entry")
                if metadata is None:
                    metadata = {}
                metadata[value[2 : 2 + klen].decode("utf-8")] = value[2 + klen :].decode("utf-8")
            # other tags (settings outside a PING or PONG, metadata inside
            # one): reserved for later versions, skipped
    except UnicodeDecodeError as e:
        raise ProtocolError(f"extension text is not UTF-8: {e}") from None
    return metadata, message
