"""A consumer on a raw socket, for tests that send what a good consumer never
would (stream frames out of turn, credit it was not given, huge WINDOWs).

Blocking and bounded in time: run it off the reactor thread
(``deferToThread``). Frames are built with the wire module's encoders and
read back with its decoder, so the bytes are the protocol's.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping

from twisted_rpc.core import _codec as wire

COUNT_ROUTE = b"mprpc.test.StreamService/Count"
SUM_ROUTE = b"mprpc.test.StreamService/Sum"
CHAT_ROUTE = b"mprpc.test.StreamService/Chat"
ECHO_ROUTE = b"mprpc.test.EchoService/Echo"


class PeerClosed(Exception):
    """The provider closed the connection (EOF or reset)."""


class RawPeer:
    """One connection to ``127.0.0.1:port``; every frame received is kept in
    :attr:`frames`, in order."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.frames: list[wire.Frame] = []
        self.closed = False
        self.decoder = wire.FrameDecoder(self.frames.append, 1 << 31)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # ----------------------------------------------------------------- sending

    def send(self, *pieces: bytes) -> None:
        """Write ``pieces``; raise :class:`PeerClosed` if the provider closed."""
        try:
            self.sock.sendall(b"".join(pieces))
        except (BrokenPipeError, ConnectionResetError) as e:
            self.closed = True
            raise PeerClosed(str(e)) from None

    def hello(self, settings: Mapping[str, str]) -> dict[str, str]:
        """Send the first PING with ``settings``; the provider's settings from its PONG."""
        self.send(wire.encode_ping(1, b"", settings))
        pong = self.wait_for(lambda f: f.kind == wire.PONG and f.call_id == 1)
        return dict(pong.metadata or {})

    def request(
        self, call_id: int, route: bytes, payload: bytes = b"", timeout_ms: int = 0
    ) -> None:
        self.send(wire.encode_request(call_id, route, len(payload), timeout_ms), payload)

    def message(self, call_id: int, payload: bytes) -> None:
        self.send(wire.encode_message(call_id, len(payload)), payload)

    def window(self, call_id: int, increment: int) -> None:
        self.send(wire.encode_window(call_id, increment))

    def end_stream(self, call_id: int) -> None:
        self.send(wire.encode_end_stream(call_id))

    def cancel(self, call_id: int) -> None:
        self.send(wire.encode_cancel(call_id))

    # ----------------------------------------------------------------- receiving

    def receive(self, deadline: float) -> bool:
        """Read one chunk (before ``deadline``); False once the provider closed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing more by the deadline ({len(self.frames)} frames read)")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.decoder.feed(data)
        return True

    def wait_for(
        self, done: Callable[[wire.Frame], bool], timeout: float | None = None
    ) -> wire.Frame:
        """The first frame received (from now on, or already) for which
        ``done`` is true; raise PeerClosed or TimeoutError otherwise."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if done(frame):
                    return frame
            seen = len(self.frames)
            if not self.receive(deadline):
                raise PeerClosed(f"closed after {len(self.frames)} frames")

    def wait_closed(self, timeout: float | None = None) -> float:
        """Read (and keep) everything until the provider closes; the seconds it took."""
        started = time.monotonic()
        deadline = started + (self.timeout if timeout is None else timeout)
        while self.receive(deadline):
            pass
        return time.monotonic() - started

    def is_open(self, timeout: float = 5.0) -> bool:
        """Whether the provider still answers a PING on this connection."""
        ping_id = 1000 + len(self.frames)
        try:
            self.send(wire.encode_ping(ping_id))
            self.wait_for(lambda f: f.kind == wire.PONG and f.call_id == ping_id, timeout)
        except PeerClosed:
            return False
        return True
