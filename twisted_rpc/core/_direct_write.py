"""The write path: writing to a TCP socket at once (the one place that reads
Twisted's private ``tcp.Connection`` attributes), when to write a batch of
frames early (:data:`FIRST_FLUSH`), and the watch on the write buffer.

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
from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["DirectWriter", "FIRST_FLUSH", "WriteBufferWatch"]

FIRST_FLUSH = 8
"""Pieces (a frame is one or two: its header, its payload) a batch collects
before they are written ahead of its end; each such write doubles the next
threshold (8, 16, 32, ... pieces). Written only at the end, a chunk of many
calls makes the peer wait for all of them, then this side wait for all the
answers: the two processes take turns, each on one core half the time. Sent
early, the peer starts on the first calls while this side handles the rest,
and the doubling keeps the writes per chunk few (six for 128 calls)."""

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
                if len(pieces) == 1:
                    sent = sock.send(pieces[0])
                    if sent == len(pieces[0]):
                        return  # (sent whole, the common case: no _unsent)
                else:
                    sent = sock.sendmsg(pieces)
                    if sent == sum(map(len, pieces)):
                        return
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


class _Watcher(Protocol):
    """What :class:`WriteBufferWatch` tells (an ``RpcConnection``)."""

    transport: Any

    def write_buffer_full(self) -> None: ...
    def write_buffer_drained(self) -> None: ...


@implementer(IPushProducer)
class WriteBufferWatch:
    """Registered on a connection's own transport, which pauses it when its
    write buffer passes the transport's ``bufferSize`` (64 KiB for TCP) and
    resumes it once the buffer has drained. (Raising ``bufferSize`` would also
    raise the size of every ``recv``, which costs small messages dearly.)"""

    def __init__(self, connection: _Watcher) -> None:
        self.connection: _Watcher | None = connection

    def pauseProducing(self) -> None:
        if self.connection is not None:
            self.connection.write_buffer_full()

    def resumeProducing(self) -> None:
        if self.connection is None:
            return
        transport = self.connection.transport
        if getattr(transport, "disconnecting", False):
            transport.unregisterProducer()  # let a pending close complete
            return
        self.connection.write_buffer_drained()

    def stopProducing(self) -> None:
        pass
