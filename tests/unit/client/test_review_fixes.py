"""Defects an independent review found in the client (held calls, shed resends), kept fixed."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from tests.helpers import failure_of, frames_of
from twisted_rpc import ClientOptions, StatusCode
from twisted_rpc.client import ClientConnection
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._codec import FrameKind

ASYNC = describe(ECHO).methods["AsyncEcho"]


def _connection(**options: object) -> tuple[ClientConnection, StringTransport, Clock]:
    clock = Clock()
    connection = ClientConnection(clock, ClientOptions(**options))  # type: ignore[arg-type]
    transport = StringTransport()
    connection.makeConnection(transport)
    connection.settings_received({"max_calls": "1"})
    transport.clear()
    return connection, transport, clock


def _answer(connection: ClientConnection, call_id: int) -> None:
    payload = echo_pb2.EchoReply(payload=b"ok").SerializeToString()
    connection.dataReceived(wire.encode_response(call_id, len(payload)) + payload)


def test_a_held_call_whose_deadline_passed_does_not_use_up_the_room_it_frees():
    """release() counts a held call that _resume ended (deadline passed as the
    answer was read, before the held deadline timer ran) as sent: the room
    is spent on nothing, the next held call stays held with nothing in
    flight, and every later call queues behind it for ever."""
    connection, transport, clock = _connection()
    first = connection.call(ASYNC, echo_pb2.EchoRequest())  # in flight (id 1)
    # The answer to `first` is read at t=2, just before the reactor runs the
    # held calls' deadline timer due at t=2 (I/O handled past a deadline).
    clock.callLater(2, _answer, connection, 1)
    expiring = connection.call(ASYNC, echo_pb2.EchoRequest(), timeout=2)  # held
    waiting = connection.call(ASYNC, echo_pb2.EchoRequest(payload=b"w"))  # held
    clock.advance(2)
    assert first.called
    assert failure_of(expiring).code == StatusCode.DEADLINE_EXCEEDED
    # The provider has room (nothing in flight): `waiting` must have gone out.
    sent = [f for f in frames_of(transport.value()) if f.kind == FrameKind.REQUEST]
    assert len(connection.outstanding) == 1 and not connection.held, (
        f"in flight {len(connection.outstanding)}, held {len(connection.held)}, "
        f"requests written {len(sent)}"
    )
    _answer(connection, sent[-1].call_id)
    assert waiting.called and waiting.result.payload == b"ok"


def test_a_shed_call_is_not_resent_to_the_connection_that_shed_it():
    """Client._resend_shed passes tried=[channel]; with connections_per_provider
    > 1 the route lists the Pool, which the exclusion does not match, so the
    call can go straight back to the very connection that shed it (the GOAWAY
    path uses self._face_of(channel) for this)."""
    from twisted_rpc import ServerLimits
    from twisted_rpc.client._calls import ShedError, _Call, _cancel_call
    from twisted_rpc.testing import MemoryProvider

    memory = MemoryProvider(
        [__import__("testbed.echo_service", fromlist=["EchoService"]).EchoService()],
        limits=ServerLimits(),
        client_options=ClientOptions(connections_per_provider=2),
    )
    echo = memory.proxy(ECHO)
    echo.AsyncEcho(echo_pb2.EchoRequest(delay=1))
    memory.flush()
    (pool,) = memory.client._pools.values()
    shedding, other = pool.members
    assert shedding.protocol is not None and other.protocol is not None
    # a slow call on the other connection: the shedding one is the least loaded
    for _ in range(3):
        other.protocol.call(ASYNC, echo_pb2.EchoRequest(delay=5))
    d = _Call(_cancel_call)
    d.resends = 1
    payload = echo_pb2.EchoRequest(payload=b"shed").SerializeToString()
    memory.client._resend_shed(shedding, (d, ASYNC, payload, None, 0.0), ShedError(message="shed"))
    assert d not in [entry[0] for entry in shedding.protocol.outstanding.values()], (
        "the shed call went back to the connection that shed it"
    )
