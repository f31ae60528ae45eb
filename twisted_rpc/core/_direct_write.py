"""Writing to a TCP socket at once: the one place that reads Twisted's private
``tcp.Connection`` attributes.

``transport.write`` only buffers: the reactor then adds write interest to
epoll, sends on its next turn and removes the interest again, two system calls
and a turn on top of the ``send``, and it joins what it buffered into one
string first (a copy, and for large frames fresh pages). :class:`DirectWriter`
sends with one ``send``/``sendmsg`` instead when the transport is a plain TCP
connection whose buffer is empty, and tells how many bytes wait unsent (also
under TLS, which buffers in the TCP transport below it).

Both read private attributes of ``abstract.FileDescriptor`` and
``tcp.Connection`` (:data:`_TCP_BUFFER`). A Twisted without them (checked once
per connection) gets the plain path: every write goes to ``transport.write``
and the unsent bytes are unknown (None).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp

__all__ = ["DirectWriter"]

# What DirectWriter reads of a TCP transport's write buffer.
_TCP_BUFFER = ("_tempDataLen", "dataBuffer", "offset", "_writeDisconnecting", "TLS", "socket")


def _tcp_transport(transport: object) -> tcp.Connection | None:
    """The TCP transport under ``transport`` (itself, or below TLS), if its
    buffer can be read."""
    while not isinstance(transport, tcp.Connection):
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    if not all(hasattr(transport, name) for name in _TCP_BUFFER):
        return None
    return transport


def _unsent(pieces: list[bytes], sent: int) -> list[bytes]:
    """What is left of ``pieces`` once their first ``sent`` bytes are written."""
    for i, piece in enumerate(pieces):
        if sent < len(piece):
            return [piece[sent:], *pieces[i + 1 :]]
        sent -= len(piece)
    return []


class DirectWriter:
    """The write path of one connection's transport (the capability check
    is made here, once)."""

    __slots__ = ("transport", "_tcp", "_socket")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._tcp = _tcp_transport(transport)
        """The TCP transport, itself or below TLS (None: not readable)."""
        self._socket: socket.socket | None = (
            self._tcp.socket if self._tcp is not None and self._tcp is transport else None
        )
        """Its socket, when we write to it directly (not below TLS)."""

    def write(self, pieces: list[bytes]) -> None:
        """Write ``pieces`` in order, at once if the transport lets us.

        On a plain TCP transport whose buffer is empty the pieces go out with
        one ``send``/``sendmsg``; whatever the socket does not take, or an
        error, is left to the transport as usual.
        """
        sock = self._socket
        transport = self.transport
        if (
            sock is not None
            and not transport._tempDataLen
            and not transport.dataBuffer
            and not transport.disconnecting
            and not transport._writeDisconnecting
            and not transport.TLS  # after startTLS, bytes must go through TLS
        ):
            try:
                sent = sock.send(pieces[0]) if len(pieces) == 1 else sock.sendmsg(pieces)
            except OSError:  # full (EAGAIN) or failing: the transport finds out which
                sent = 0
            if sent:
                pieces = _unsent(pieces, sent)
                if not pieces:
                    return
        if len(pieces) == 1:
            transport.write(pieces[0])
        else:
            transport.writeSequence(pieces)

    def raw_socket(self) -> socket.socket | None:
        """The socket, if bytes read from it are the connection's (plain TCP, no TLS)."""
        sock = self._socket
        return None if sock is None or self.transport.TLS else sock

    def unsent_bytes(self) -> int | None:
        """Bytes given to the transport and not sent yet (None: it does not tell)."""
        transport = self._tcp
        if transport is None:
            return None
        return transport._tempDataLen + len(transport.dataBuffer) - transport.offset
