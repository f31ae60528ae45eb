"""A gRPC client made of an ``h2`` client connection, driving a provider's
:class:`GrpcServerConnection` on a StringTransport with a task.Clock:
deterministic, byte for byte, both ends in memory."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import EchoService, StreamService
from twisted_rpc import Dispatcher, ServerLimits
from twisted_rpc.grpc import GrpcServerFactory

ECHO = "/mprpc.test.EchoService/Echo"
ASYNC_ECHO = "/mprpc.test.EchoService/AsyncEcho"
COUNT = "/mprpc.test.StreamService/Count"
SUM = "/mprpc.test.StreamService/Sum"
CHAT = "/mprpc.test.StreamService/Chat"


def frame(payload: bytes, compressed: bool = False) -> bytes:
    return struct.pack("!BI", int(compressed), len(payload)) + payload


def messages_in(data: bytes) -> list[bytes]:
    out = []
    while data:
        _, n = struct.unpack_from("!BI", data)
        out.append(data[5 : 5 + n])
        data = data[5 + n :]
    return out


@dataclass
class Answer:
    """What the client saw on one stream."""

    headers: dict[str, str] | None = None
    data: bytes = b""
    trailers: dict[str, str] | None = None
    reset: int | None = None
    ended: bool = False
    data_events: int = 0
    raw_headers: list[Any] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        """grpc-status, from the trailers (or a trailers-only answer)."""
        source = self.trailers if self.trailers is not None else self.headers
        if source is None or "grpc-status" not in source:
            return None
        return int(source["grpc-status"])

    @property
    def message(self) -> str:
        source = self.trailers if self.trailers is not None else self.headers
        return (source or {}).get("grpc-message", "")

    def messages(self) -> list[bytes]:
        return messages_in(self.data)


def _text(headers: Any) -> dict[str, str]:
    return {bytes(k).decode(): bytes(v).decode() for k, v in headers}


class GrpcPeer:
    """A provider's gRPC connection and an h2 client talking to it."""

    def __init__(
        self,
        limits: ServerLimits | None = None,
        services: Any = None,
        client_settings: dict[int, int] | None = None,
        auto_ack: bool = True,
    ) -> None:
        clock = Clock()
        self.streams = StreamService()
        dispatcher = Dispatcher(services or [EchoService(), self.streams])
        factory = GrpcServerFactory(dispatcher, clock, limits)
        factory.doStart()
        self.attach(factory, clock, client_settings, auto_ack)

    def attach(
        self,
        factory: GrpcServerFactory,
        clock: Any,
        client_settings: dict[int, int] | None = None,
        auto_ack: bool = True,
    ) -> None:
        """Connect a new h2 client to ``factory`` (whose clock is ``clock``)."""
        self.clock = clock
        self.factory = factory
        self.server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.server.makeConnection(self.transport)
        # The client sends headers as given (bad ones too): the server checks them.
        config = H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.client = H2Connection(config)
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.auto_ack = auto_ack
        self.answers: dict[int, Answer] = {}
        self.events: list[Any] = []
        self.pump()

    # ----------------------------------------------------------------- exchange

    def pump(self, rounds: int = 200) -> None:
        """Exchange bytes (and run the clock's due calls) until both are quiet."""
        for _ in range(rounds):
            out = self.client.data_to_send()
            if out:
                self.server.dataReceived(out)
            self.clock.advance(0)
            got = self.transport.value()
            self.transport.clear()
            if got:
                self.receive(got)
            if not out and not got and not self.clock.getDelayedCalls():
                return
            if (
                not out
                and not got
                and all(c.getTime() > self.clock.seconds() for c in self.clock.getDelayedCalls())
            ):
                return
        raise AssertionError("the connection never went quiet")

    def receive(self, data: bytes) -> None:
        for event in self.client.receive_data(data):
            self.events.append(event)
            stream_id = getattr(event, "stream_id", None)
            answer = self.answers.setdefault(stream_id, Answer()) if stream_id else None
            if isinstance(event, ResponseReceived):
                assert answer is not None
                answer.headers = _text(event.headers)
                answer.raw_headers = list(event.headers)
            elif isinstance(event, TrailersReceived):
                assert answer is not None
                answer.trailers = _text(event.headers)
            elif isinstance(event, DataReceived):
                assert answer is not None
                answer.data += event.data
                answer.data_events += 1
                if self.auto_ack and event.flow_controlled_length:
                    self.client.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, StreamEnded):
                assert answer is not None
                answer.ended = True
            elif isinstance(event, StreamReset):
                assert answer is not None
                answer.reset = event.error_code
            elif isinstance(event, ConnectionTerminated) and not event.error_code:
                # A graceful GOAWAY: h2 would stop reading here; a gRPC client
                # reads the answers of its calls still running.
                self.client.state_machine.state = ConnectionState.CLIENT_OPEN

    # ----------------------------------------------------------------- calls

    def open(
        self,
        path: str,
        metadata: list[tuple[str, str]] | None = None,
        content_type: str = "application/grpc",
        method: str = "POST",
        extra: list[tuple[str, str]] | None = None,
    ) -> int:
        stream_id = self.client.get_next_available_stream_id()
        headers = [
            (":method", method),
            (":scheme", "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", content_type),
            ("te", "trailers"),
            *(extra or []),
            *(metadata or []),
        ]
        self.client.send_headers(stream_id, headers)
        self.answers[stream_id] = Answer()
        return stream_id

    def send(self, stream_id: int, *payloads: bytes, end: bool = False) -> None:
        data = b"".join(frame(p) for p in payloads)
        while data:
            n = min(len(data), self.client.max_outbound_frame_size)
            self.client.send_data(stream_id, data[:n])
            data = data[n:]
        if end:
            self.client.end_stream(stream_id)

    def unary(
        self, path: str, request: Any, metadata: list[tuple[str, str]] | None = None, **kw: Any
    ) -> Answer:
        stream_id = self.open(path, metadata, **kw)
        self.send(stream_id, request.SerializeToString(), end=True)
        self.pump()
        return self.answers[stream_id]

    @property
    def closed(self) -> bool:
        """Whether the provider closed (or aborted) the connection."""
        return bool(self.transport.disconnecting or getattr(self.transport, "disconnected", False))

    @property
    def goaways(self) -> list[ConnectionTerminated]:
        return [e for e in self.events if isinstance(e, ConnectionTerminated)]
