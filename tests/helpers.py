"""What the unit tests share: the outcome of a fired Deferred, the frames in
some bytes, a consumer or provider connection on a StringTransport, a real
TCP transport on loopback, and two providers in memory behind one Client."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter

from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from twisted_rpc import Client, Dispatcher, FunctionInterceptor
from twisted_rpc.client import ClientConnection
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import Frame, FrameDecoder
from twisted_rpc.core._connection import RefusedConnection
from twisted_rpc.server import ServerFactory
from twisted_rpc.testing import MemoryProvider

ROUTE = b"mprpc.test.EchoService/Echo"

result = MemoryProvider.result
"""The result a Deferred already has; its failure raised (and consumed)."""


def timers(clock: Any) -> list[Any]:
    """``clock``'s delayed calls but the connections' keepalive timers
    (armed on every consumer connection by default)."""
    return [c for c in clock.getDelayedCalls() if c.func.__name__ != "_send_keepalive"]


def failure_of(d: Deferred) -> BaseException:
    """The exception ``d`` already failed with (consumed); the test fails
    if ``d`` has no result yet or succeeded."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, f"{d!r} has no result yet"
    assert isinstance(outcome[0], Failure), f"{d!r} succeeded with {outcome[0]!r}"
    return outcome[0].value


def frames_of(data: bytes, **decoder_options: int) -> list[Frame]:
    """The frames in ``data`` (options as FrameDecoder's)."""
    frames: list[Frame] = []
    FrameDecoder(frames.append, **decoder_options).feed(data)
    return frames


class ClientConn:
    """A consumer connection on a StringTransport, its clock a task.Clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.proto = ClientConnection(self.clock)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def sent(self) -> list[Frame]:
        """The frames written since the last look."""
        frames = frames_of(self.transport.value())
        self.transport.clear()
        return frames


class ServerConn:
    """A provider connection of ``factory`` on a StringTransport; ``proto`` is
    None when the factory refused it (its transport then closed at once)."""

    def __init__(self, factory: ServerFactory, host: str = "10.0.0.1", port: int = 1000):
        self.factory = factory
        self.proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.proto.makeConnection(self.transport)
        if isinstance(self.proto, RefusedConnection):
            assert self.transport.disconnecting  # closed as soon as made
            self.proto = None

    def request(self, call_id, route=ROUTE, message=None, timeout_ms=0, metadata=None) -> None:
        """A REQUEST frame received; ``message`` a protobuf message or its bytes."""
        if message is None:
            message = echo_pb2.EchoRequest()
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        self.proto.dataReceived(
            wire.encode_request(call_id, route, len(payload), timeout_ms, metadata) + payload
        )

    def frames(self) -> list[Frame]:
        """The frames written since the last look (extensions up to 1 MiB decoded)."""
        frames = frames_of(self.transport.value(), max_ext_size=1 << 20)
        self.transport.clear()
        return frames


def over_tcp(protocol, buffer_size: int = 0) -> Iterator[tuple[Any, socket.socket, Any]]:
    """Connect ``protocol`` to a peer socket through a real tcp.Server transport on
    loopback (the reactor a MemoryReactor); yield (protocol, peer socket, reactor)."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, address = listener.accept()
    listener.close()
    if buffer_size:  # small kernel buffers: the transport's own fills sooner
        for s in (accepted, peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
    reactor = MemoryReactor()
    protocol.makeConnection(tcp.Server(accepted, protocol, address, None, 1, reactor))
    try:
        yield protocol, peer, reactor
    finally:
        peer.close()
        accepted.close()


class TwoProviders:
    """Two EchoService providers listening on a MemoryReactorClock, each
    counting the calls it serves, and a Client (``client_kw``) of both."""

    ports = (1001, 1002)

    def __init__(self, **client_kw):
        self.reactor = MemoryReactorClock()
        self.served = {port: 0 for port in self.ports}
        self.factories = {}
        for port in self.ports:

            def count(request, context, proceed, port=port):
                self.served[port] += 1
                return proceed(request, context)

            dispatcher = Dispatcher([EchoService()], [FunctionInterceptor(count)])
            self.factories[port] = ServerFactory(dispatcher, self.reactor)
            self.reactor.listenTCP(port, self.factories[port], interface="127.0.0.1")
        self.client = Client(
            self.reactor,
            providers={"mprpc.test.EchoService": [f"127.0.0.1:{p}" for p in self.ports]},
            **client_kw,
        )
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps = []

    def connect_all(self):
        while (pump := self.completer.succeedOnce()) is not None:
            self.pumps.append(pump)
        self.flush()

    def flush(self):
        for pump in self.pumps:
            pump.flush()
