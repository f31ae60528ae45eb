"""A chunk of many calls is answered in a few writes, the first ones early
(FIRST_FLUSH): 4 frames, then 8, 16, ..., the rest when the chunk ends; so the
peer starts on the first answers (or calls) while this side handles the rest."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from testbed.echo_service import ECHO as ECHO_SERVICE
from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from tests.helpers import frames_of
from twisted_rpc import Dispatcher
from twisted_rpc.client import ClientConnection
from twisted_rpc.core import _codec as wire
from twisted_rpc.core import describe
from twisted_rpc.core._direct_write import FIRST_FLUSH
from twisted_rpc.server import ServerFactory

ECHO = b"mprpc.test.EchoService/Echo"
ECHO_METHOD = describe(ECHO_SERVICE).methods["Echo"]


class _Writes(StringTransport):
    """A transport that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))


def request(call_id: int) -> bytes:
    body = echo_pb2.EchoRequest(payload=b"%d" % call_id).SerializeToString()
    return wire.encode_request(call_id, ECHO, len(body), 30_000) + body


def frames_per_write(transport: _Writes) -> list[int]:
    return [len(frames_of(w)) for w in transport.writes]


@pytest.mark.parametrize(
    ("calls", "writes"),
    [
        (1, [1]),
        (3, [3]),
        (4, [4]),  # the threshold reached with the last frame: written then, nothing after
        (5, [4, 1]),
        (16, [4, 8, 4]),
        (128, [4, 8, 16, 32, 64, 4]),
    ],
)
def test_a_providers_answers_to_one_chunk(calls, writes):
    assert FIRST_FLUSH == 8  # pieces: a header and a payload per answer
    proto = ServerFactory(Dispatcher([EchoService()]), Clock()).buildProtocol(None)
    transport = _Writes()
    proto.makeConnection(transport)
    proto.dataReceived(b"".join(request(i) for i in range(1, calls + 1)))
    assert frames_per_write(transport) == writes
    frames = frames_of(transport.value())
    assert [f.call_id for f in frames] == list(range(1, calls + 1))  # in order
    replies = [echo_pb2.EchoReply.FromString(bytes(f.payload)).payload for f in frames]
    assert replies == [b"%d" % i for i in range(1, calls + 1)]


def test_each_chunk_starts_again_from_the_first_threshold():
    proto = ServerFactory(Dispatcher([EchoService()]), Clock()).buildProtocol(None)
    transport = _Writes()
    proto.makeConnection(transport)
    proto.dataReceived(b"".join(request(i) for i in range(1, 17)))
    proto.dataReceived(b"".join(request(i) for i in range(17, 33)))
    assert frames_per_write(transport) == [4, 8, 4, 4, 8, 4]


def test_a_consumers_calls_made_by_the_callbacks_of_one_chunk_of_answers():
    proto = ClientConnection(Clock())
    transport = _Writes()
    proto.makeConnection(transport)
    request = echo_pb2.EchoRequest(payload=b"x")
    answered: list[int] = []

    def again(reply: object, n: int) -> None:
        answered.append(n)
        proto.call(ECHO_METHOD, request, timeout=30)

    for n in range(16):
        proto.call(ECHO_METHOD, request, timeout=30).addCallback(again, n)
    assert len(transport.writes) == 16  # outside a chunk: each call to the transport
    transport.writes.clear()
    body = echo_pb2.EchoReply(payload=b"x").SerializeToString()
    answers = b"".join(wire.encode_response(i, len(body)) + body for i in range(1, 17))
    proto.dataReceived(answers)
    assert answered == list(range(16))
    assert frames_per_write(transport) == [4, 8, 4]
    calls = [f.call_id for w in transport.writes for f in frames_of(w)]
    assert calls == list(range(17, 33))
