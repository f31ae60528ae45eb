"""``mprpc call`` on streams, in memory: stdin lines in, JSON lines out, with a
StringTransport standing in for StandardIO and a MemoryProvider for the provider."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from testbed.echo_service import STREAMS, StreamService
from testbed.protos import echo_pb2
from twisted_rpc import NotFoundError, RpcError, StatusCode
from twisted_rpc.ops._cli import build_parser, split_symbol
from twisted_rpc.ops._cli_streams import (
    StdioLines,
    UserError,
    call_stream,
    json_line,
    parse_request,
    stream_kind,
)
from twisted_rpc.testing import MemoryProvider

COUNT, SUM, CHAT = (STREAMS.methods_by_name[n] for n in ("Count", "Sum", "Chat"))


class Stdio(StringTransport):
    """StandardIO on a StringTransport: half-closing, and a write buffer of
    ``limit`` bytes that pauses its producer when full, as StandardIO's does."""

    def __init__(self, limit: int = 1 << 20) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.io.getvalue()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def loseWriteConnection(self) -> None:
        self.protocol.writeConnectionLost()


def connected(max_line: int = 1 << 20, limit: int = 1 << 20) -> tuple[StdioLines, Stdio]:
    lines = StdioLines(max_line)
    transport = Stdio(limit)
    transport.protocol = lines
    lines.makeConnection(transport)
    return lines, transport


def reply(**fields: Any) -> dict[str, Any]:
    """An EchoReply as printed: every field, those at their zero value too."""
    return {"payload": "", "metadata": {}, "call_id": 0, "pid": 0, **fields}


def printed(transport: Stdio) -> list[dict[str, Any]]:
    return [json.loads(line) for line in transport.value().splitlines()]


def running(memory: MemoryProvider, method, request_json, lines, **kw) -> Deferred[int]:
    stub = getattr(memory.proxy(STREAMS), method.name)
    d = Deferred.fromCoroutine(call_stream(stub, method, request_json, lines, **kw))
    memory.flush()
    return d


def finish(memory: MemoryProvider, d: Deferred[Any]) -> Any:
    for _ in range(50):
        memory.flush()
        if d.called:
            break
    return memory.result(d)


# ---------------------------------------------------------------- pieces


def test_stream_kinds_and_json_lines():
    assert [stream_kind(m) for m in (COUNT, SUM, CHAT)] == [
        "server stream",
        "client stream",
        "bidi",
    ]
    message = echo_pb2.EchoReply(payload=b"a\nb", call_id=3, metadata={"k": "v\n"})
    line = json_line(message)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")  # one line, whatever the content
    assert json.loads(line) == reply(payload="YQpi", call_id=3, metadata={"k": "v\n"})


def test_parse_request_errors_are_usage_errors_naming_the_line():
    request_class = type(echo_pb2.EchoRequest())
    assert parse_request(b'{"payload": "YWI="}\r', request_class).payload == b"ab"
    for bad in (b"{", b'{"nope": 1}', b"\xff{}", b"[]"):
        with pytest.raises(UserError, match="line 7 of stdin is not a mprpc.test.EchoRequest") as e:
            parse_request(bad, request_class, "line 7 of stdin")
        assert e.value.status == 2
        assert "\n" not in str(e.value)


def test_stdin_lines_split_across_reads_and_a_last_line_without_newline():
    lines, transport = connected()
    taken: list[bytes | None] = []

    def take() -> None:
        lines.next_line().addCallback(taken.append)

    take()
    lines.dataReceived(b'{"a"')
    assert taken == []
    lines.dataReceived(b": 1}\n\n{")
    assert taken == [b'{"a": 1}']
    assert transport.producerState == "paused"  # a line waits to be taken: stdin pauses
    take()
    assert transport.producerState == "producing"  # none held: read on
    lines.dataReceived(b'"b": 2}')
    lines.readConnectionLost()
    take()
    take()
    assert taken == [b'{"a": 1}', b"", b'{"b": 2}', None]


def test_stdin_holds_at_most_one_reads_worth_of_lines():
    lines, transport = connected()
    lines.dataReceived(b"{}\n" * 1000)
    assert transport.producerState == "paused"
    assert len(lines.lines) == 1000
    for _ in range(999):
        lines.next_line()
    assert transport.producerState == "paused"
    lines.next_line()
    assert transport.producerState == "producing"


def test_a_line_over_the_limit_is_a_usage_error_and_stops_reading():
    lines, transport = connected(max_line=100)
    for _ in range(5):
        lines.dataReceived(b"x" * 30)
    failed: list[Any] = []
    lines.next_line().addErrback(failed.append)
    assert isinstance(failed[0].value, UserError)
    assert "line 1 of stdin is over 100 bytes" in str(failed[0].value)
    assert transport.producerState == "paused"
    assert len(lines._buffer) == 0  # nothing more is kept


def test_call_parser_request_and_stream_timeout():
    args = build_parser().parse_args(["call", "a.B.C", "--endpoint", "h:1"])
    assert (args.request, args.stream_timeout) == (None, None)
    args = build_parser().parse_args(
        ["call", "a.B.C", "{}", "--endpoint", "h:1", "--stream-timeout", "2.5"]
    )
    assert (args.request, args.stream_timeout) == ("{}", 2.5)
    assert split_symbol("mprpc.test.StreamService.Chat") == ("mprpc.test.StreamService", "Chat")


# ---------------------------------------------------------------- calls


def test_server_stream_prints_one_line_per_message():
    memory = MemoryProvider([StreamService()])
    lines, transport = connected()
    d = running(memory, COUNT, '{"count": 3, "payload_size": 1}', lines)
    assert finish(memory, d) == 0
    assert printed(transport) == [
        reply(payload="eA=="),
        reply(payload="eA==", call_id=1),
        reply(payload="eA==", call_id=2),
    ]
    assert transport.producerState == "paused"  # stdin is not read for a server stream
    assert transport.producer is None  # the stream was unregistered at its end


def test_server_stream_error_comes_after_the_messages_sent_before_it():
    memory = MemoryProvider([StreamService()])
    lines, transport = connected()
    d = running(memory, COUNT, '{"count": 2, "fail_code": 5, "fail_message": "gone"}', lines)
    with pytest.raises(NotFoundError, match="gone"):
        finish(memory, d)
    assert len(printed(transport)) == 2


def test_client_stream_reads_json_lines_and_prints_its_response_as_one_line():
    memory = MemoryProvider([StreamService()])
    lines, transport = connected()
    d = running(memory, SUM, None, lines)
    lines.dataReceived(b'{"payload": "YWI="}\n\n   \n{"payload": "YWJj"}')
    lines.readConnectionLost()
    assert finish(memory, d) == 0
    assert transport.value().count(b"\n") == 1
    assert printed(transport) == [reply(payload="NQ==", call_id=2)]  # "5": 2 + 3 bytes


def test_bidi_replies_are_printed_as_they_come():
    memory = MemoryProvider([StreamService()])
    lines, transport = connected()
    d = running(memory, CHAT, None, lines)
    lines.dataReceived(b'{"payload": "MQ=="}\n')
    memory.flush()
    assert printed(transport) == [reply(payload="MQ==")]  # before stdin ends
    lines.dataReceived(b'{"payload": "Mg=="}\n')
    lines.readConnectionLost()
    assert finish(memory, d) == 0
    assert printed(transport) == [reply(payload="MQ=="), reply(payload="Mg==")]


def test_a_bad_line_cancels_the_stream_with_a_usage_error():
    service = StreamService()
    memory = MemoryProvider([service])
    lines, transport = connected()
    d = running(memory, CHAT, None, lines)
    lines.dataReceived(b'{"payload": "MQ=="}\n{"nope": true}\n')
    with pytest.raises(UserError, match="line 2 of stdin is not a mprpc.test.EchoRequest"):
        finish(memory, d)
    memory.flush()
    assert memory.factory.streams_in_flight == 0


def test_a_request_argument_for_a_client_stream_is_a_usage_error():
    memory = MemoryProvider([StreamService()])
    lines, _ = connected()
    d = running(memory, SUM, "{}", lines)
    with pytest.raises(UserError, match="client stream: its requests are read from stdin") as e:
        finish(memory, d)
    assert e.value.status == 2


def test_a_stream_that_ends_first_stops_reading_stdin():
    memory = MemoryProvider([StreamService()])
    lines, transport = connected()
    d = running(memory, CHAT, None, lines)
    lines.dataReceived(b'{"fail_code": 9, "fail_message": "stop"}\n')  # stdin stays open
    with pytest.raises(RpcError) as e:
        finish(memory, d)
    assert (e.value.code, e.value.message) == (StatusCode.FAILED_PRECONDITION, "stop")
    assert lines._waiting is None  # the read of stdin was given up


def test_stdout_closed_while_paused_cancels_the_stream_and_exits_quietly():
    service = StreamService()
    memory = MemoryProvider([service])
    lines, transport = connected(limit=1000)
    d = running(memory, COUNT, '{"forever": true, "tag": "piped"}', lines)
    stream = transport.producer.producer  # (registered behind a watch of stdout)
    for _ in range(3):
        memory.flush()
    before = len(transport.value())
    assert 1000 < before < 1100  # paused once stdout's buffer was full
    assert memory.factory.streams_in_flight == 1
    lines.writeConnectionLost()  # whoever read stdout went away
    assert finish(memory, d) == 0
    assert stream.code == StatusCode.CANCELLED
    assert service.ends == {"piped": "closed"}  # the handler's generator was closed
    assert memory.factory.streams_in_flight == 0


def test_stream_timeout_is_the_streams_deadline():
    memory = MemoryProvider([StreamService()])
    lines, transport = connected()
    d = running(memory, COUNT, '{"forever": true, "delay": 1}', lines, timeout=2.5)
    for _ in range(4):
        memory.advance(1)
    with pytest.raises(RpcError) as e:
        finish(memory, d)
    assert e.value.code == StatusCode.DEADLINE_EXCEEDED
    assert len(printed(transport)) == 2


def test_core_on_message_deferred_fires_when_a_paused_stream_is_cancelled():
    memory = MemoryProvider([StreamService()])
    stream = memory.proxy(STREAMS).Count(echo_pb2.CountRequest(forever=True))
    done = stream.on_message(lambda reply: None)
    done.addErrback(lambda f: f.trap(RpcError))
    stream.pauseProducing()
    memory.flush()  # replies arrive, up to the window, and wait
    assert stream.inbox.messages
    stream.stopProducing()  # what a consumer that goes away calls
    memory.flush()
    assert done.called


def test_finish_fires_once_stdout_is_closed_and_a_later_close_is_not_a_lost_reader():
    lines, transport = connected()
    lines.on_output_lost = lambda: pytest.fail("the reader did not go away")
    lines.write_line(echo_pb2.EchoReply(call_id=1))
    done = lines.finish()
    assert done.called
    lines.connectionLost()  # StandardIO's, once both halves are closed
    assert not lines.output_lost
    assert lines.finish().called
    assert printed(transport) == [reply(call_id=1)]
