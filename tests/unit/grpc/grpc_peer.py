"""A consumer's gRPC connection on a StringTransport with an h2 server
connection on the other end, moved by hand (deterministic), for the
tests of twisted_rpc/grpc/_client*.py."""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import Event
from h2.settings import SettingCodes
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.protos import echo_pb2
from twisted_rpc.client import ClientOptions
from twisted_rpc.core import describe
from twisted_rpc.grpc import GrpcClientConnection
from twisted_rpc.grpc._wire import frame_message

ECHO = describe(echo_pb2.DESCRIPTOR.services_by_name["EchoService"]).methods
STREAMS = describe(echo_pb2.DESCRIPTOR.services_by_name["StreamService"]).methods

OK_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


class GrpcPair:
    """``client``: a GrpcClientConnection; ``server``: h2's server side.
    :meth:`pump` moves bytes both ways until both are quiet and returns the
    server's events."""

    def __init__(self, server_settings: dict[int, int] | None = None, **options: Any) -> None:
        self.clock = Clock()
        self.client = GrpcClientConnection(
            self.clock, ClientOptions(**options), authority="example:50051"
        )
        self.transport = StringTransport()
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        if server_settings:
            self.server.update_settings(server_settings)
        self.client.makeConnection(self.transport)
        self.events: list[Event] = []
        self.pump()

    def pump(self) -> list[Event]:
        events: list[Event] = []
        for _ in range(100):
            out = self.transport.value()
            self.transport.clear()
            if out:
                events.extend(self.server.receive_data(out))
            back = self.server.data_to_send()
            if back and self.client.connected:
                self.client.dataReceived(back)
            if not out and not back:
                break
        self.events.extend(events)
        return events

    def reply(
        self,
        sid: int,
        *messages: bytes,
        status: int = 0,
        message: str = "",
        headers: list[tuple[str, str]] | None = None,
        trailers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Answer stream ``sid``: headers, ``messages``, trailers."""
        self.server.send_headers(sid, OK_HEADERS + (headers or []))
        for m in messages:
            self.server.send_data(sid, frame_message(m))
        end = [("grpc-status", str(status))]
        if message:
            end.append(("grpc-message", message))
        self.server.send_headers(sid, end + (trailers or []), end_stream=True)
        self.pump()

    def window(self, sid: int) -> int:
        """What the server may still send on ``sid``."""
        return self.server.local_flow_control_window(sid)


def of(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def small_window(size: int) -> dict[int, int]:
    return {SettingCodes.INITIAL_WINDOW_SIZE: size}
