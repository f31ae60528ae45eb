"""``mprpc call`` on streaming methods: JSON lines in and out, on the reactor.

A server-streaming call prints one JSON object a line, each written as it
arrives. A client-streaming or bidi call reads its requests from stdin, one
JSON object a line (blank lines are skipped; EOF ends the requests), and
prints the replies as JSON lines (a client stream's one response as one
line). stdin and stdout are Twisted's ``twisted.internet.stdio.StandardIO``:
reading stdin pauses while the stream's window is closed, and the stream
pauses while stdout's buffer is full, so neither a large input nor a slow
reader of the output grows the command's memory, and the reactor never
blocks on a pipe.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IPushProducer,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rpc.core._status import RpcError
from twisted_rpc.ops._reflection import message_class

__all__ = [
    "MAX_LINE",
    "StdioLines",
    "UserError",
    "call_stream",
    "json_line",
    "parse_request",
    "stream_kind",
]

MAX_LINE = 64 * 1024 * 1024
"""Longest request line read from stdin (bytes); a longer one is a usage error."""

EXIT_UNREACHABLE = 1
EXIT_USAGE = 2


class UserError(Exception):
    """A one-line message for the user, and an exit status."""

    def __init__(self, message: str, status: int = EXIT_UNREACHABLE) -> None:
        super().__init__(message)
        self.status = status


def stream_kind(method: MethodDescriptor) -> str:
    """``unary``, ``server stream``, ``client stream`` or ``bidi``."""
    if method.client_streaming and method.server_streaming:
        return "bidi"
    if method.client_streaming:
        return "client stream"
    if method.server_streaming:
        return "server stream"
    return "unary"


def to_json(message: Message, indent: int | None = None) -> str:
    """``message`` in protobuf's JSON mapping, fields by their ``.proto``
    names (snake_case), those at their zero value included."""
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        indent=indent,
        always_print_fields_with_no_presence=True,
    )


def json_line(message: Message) -> bytes:
    """``message`` in protobuf's JSON mapping on one line (newline included)."""
    return to_json(message).encode() + b"\n"


def _proto_names(text: str, message: Descriptor | Any) -> str:
    """``text`` (a parse error) with the JSON names of ``message``'s fields
    (``failCode``, and those of the messages within) as the ``.proto``
    names output uses (``fail_code``)."""
    names: dict[str, str] = {}
    seen: set[str] = set()
    todo = [message]
    while todo:
        each = todo.pop()
        if each.full_name in seen:
            continue
        seen.add(each.full_name)
        for field in each.fields:
            if field.json_name != field.name:
                names.setdefault(field.json_name, field.name)
            if field.message_type is not None:
                todo.append(field.message_type)
    if not names:
        return text
    return _QUOTED.sub(lambda m: m[1] + names.get(m[2], m[2]) + m[1], text)


_QUOTED = re.compile(r"""(['"])(\w+)\1""")


def parse_request(
    text: str | bytes, request_class: type[Message], where: str = "request"
) -> Message:
    """A ``request_class`` from JSON text; :class:`UserError` if it is not one."""
    request = request_class()
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not text.lstrip().startswith("{"):  # protobuf's parser takes [] as {}
            raise json_format.ParseError("expected a JSON object")
        json_format.Parse(text, request)
    except (json_format.ParseError, UnicodeDecodeError) as e:
        why = _proto_names(" ".join(str(e).split()), request.DESCRIPTOR)
        raise UserError(
            f"{where} is not a {request.DESCRIPTOR.full_name}: {why} "
            "(fields: as named in the .proto, or in lowerCamelCase)",
            EXIT_USAGE,
        ) from None
    return request


@implementer(IHalfCloseableProtocol)
class StdioLines(Protocol):
    """stdin as lines (:meth:`next_line`), stdout as a writer of lines
    (:meth:`write_line`, or :attr:`consumer` for a stream's ``consume``).

    At most one read's worth of lines is held: reading pauses while any
    wait to be taken. :meth:`finish` flushes stdout and fires once written.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.lines: deque[bytes] = deque()
        self.read_lines = 0
        self.eof = False
        self.error: UserError | None = None
        self.output_lost = False
        """stdout was closed under us (its reader went away)."""
        self.on_output_lost: Callable[[], object] | None = None
        self._buffer = bytearray()
        self._scanned = 0
        self._waiting: Deferred[bytes | None] | None = None
        self._paused = False
        self._flushed: Deferred[None] | None = None
        self._write_closed = False

    # ------------------------------------------------------------- stdin

    def dataReceived(self, data: bytes) -> None:
        if self.eof or self.error is not None:
            return
        buffer = self._buffer
        buffer += data
        start = 0
        scan = self._scanned  # what was searched already holds no newline
        while (end := buffer.find(b"\n", scan)) >= 0:
            self.lines.append(bytes(buffer[start:end]))
            start = scan = end + 1
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self.max_line:
            number = self.read_lines + len(self.lines) + 1
            self._fail(f"line {number} of stdin is over {self.max_line} bytes")
            return
        if self.lines and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._wake()

    def readConnectionLost(self) -> None:
        if self._buffer and self.error is None:
            self.lines.append(bytes(self._buffer))  # a last line without its newline
            self._buffer.clear()
        self.eof = True
        self._wake()

    def writeConnectionLost(self) -> None:
        if self._write_closed:
            return
        self._write_closed = True
        flushed, self._flushed = self._flushed, None
        if flushed is not None:
            flushed.callback(None)
            return
        self.output_lost = True
        if self.on_output_lost is not None:
            self.on_output_lost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.eof:
            self.readConnectionLost()
        self.writeConnectionLost()

    def _fail(self, message: str) -> None:
        self.error = UserError(message, EXIT_USAGE)
        self._buffer.clear()
        self.lines.clear()
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self._wake()

    def _wake(self) -> None:
        waiting = self._waiting
        if waiting is not None and (self.lines or self.eof or self.error is not None):
            self._waiting = None
            self._take(waiting)

    def _take(self, d: Deferred[bytes | None]) -> None:
        if self.error is not None:
            d.errback(self.error)
        elif self.lines:
            self.read_lines += 1
            d.callback(self.lines.popleft())
            if not self.lines and self._paused and not self.eof:
                self._paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
        else:
            d.callback(None)

    def next_line(self) -> Deferred[bytes | None]:
        """The next line of stdin (without its newline), None at EOF."""
        if self._waiting is not None:
            raise RuntimeError("next_line() while another is waiting")

        def forget(d: Deferred[bytes | None]) -> None:
            if self._waiting is d:
                self._waiting = None

        d: Deferred[bytes | None] = Deferred(forget)
        if self.lines or self.eof or self.error is not None:
            self._take(d)
        else:
            self._waiting = d
        return d

    def stop_reading(self) -> None:
        """No input is wanted (a unary request or a server stream)."""
        self._paused = True
        self.transport.pauseProducing()  # type: ignore[union-attr]

    # ------------------------------------------------------------- stdout

    def write_line(self, message: Message) -> None:
        if not self.output_lost:
            self.transport.write(json_line(message))  # type: ignore[union-attr]

    @property
    def consumer(self) -> IConsumer:
        """An ``IConsumer`` of messages writing them to stdout as JSON lines."""
        return _LineConsumer(self)

    def finish(self) -> Deferred[None]:
        """Close stdout once what was written is out; fires then."""
        if self._write_closed:
            return defer.succeed(None)
        d = self._flushed = Deferred()
        self.transport.loseWriteConnection()  # type: ignore[union-attr]
        return d


@implementer(IPushProducer)
class _OutputWatch:
    """The stream as stdout's producer: stdout stopping it (its reader went
    away) is recorded as lost output before the stream is cancelled, so the
    cancel that follows is not taken for an error of the call."""

    def __init__(self, lines: StdioLines, producer: IProducer) -> None:
        self.lines = lines
        self.producer: Any = producer  # the stream: an IPushProducer

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.lines.output_lost = True
        self.producer.stopProducing()


@implementer(IConsumer)
class _LineConsumer:
    """Messages in, JSON lines out; the producer (a stream) is paused while
    stdout's buffer is full."""

    def __init__(self, lines: StdioLines) -> None:
        self.lines = lines

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        watched = _OutputWatch(self.lines, producer)
        self.lines.transport.registerProducer(watched, streaming)  # type: ignore[union-attr]

    def unregisterProducer(self) -> None:
        self.lines.transport.unregisterProducer()  # type: ignore[union-attr]

    def write(self, message: Any) -> None:
        self.lines.write_line(message)


async def _send_requests(lines: StdioLines, stream: Any, request_class: type[Message]) -> None:
    """Each JSON line of stdin as a request (written as the window allows), then
    ``done_writing``; a bad line is a :class:`UserError`."""
    number = 0
    while True:
        line = await lines.next_line()
        if line is None:
            break
        number += 1
        if not line.strip():
            continue
        await stream.write(parse_request(line, request_class, f"line {number} of stdin"))
    await stream.done_writing()


def _quiet(failure: Failure) -> None:
    """An outcome that another Deferred reports."""


def _stopper(stream: Any) -> Callable[[], None]:
    """What to do when stdout goes away: cancel ``stream`` (paused or not,
    its ``consume`` Deferred then fails CANCELLED at once)."""

    def stop() -> None:
        stream.cancel()

    return stop


async def call_stream(
    stub: Callable[..., Any],
    method: MethodDescriptor,
    request_json: str | None,
    lines: StdioLines,
    timeout: float | None = None,
) -> int:
    """Run a streaming call of ``method`` through ``stub`` (a proxy's method)
    with ``lines`` (connected to stdin and stdout); returns the exit status,
    raises the stream's ``RpcError`` or a :class:`UserError`. The caller
    then waits for ``lines.finish()``: what was printed is out."""
    request_class = message_class(method.input_type)
    if not method.client_streaming:
        lines.stop_reading()
        request = parse_request(request_json or "{}", request_class)
        stream = stub(request, timeout=timeout)
        lines.on_output_lost = _stopper(stream)
        try:
            await stream.consume(lines.consumer)
        except RpcError:
            if lines.output_lost:
                return 0  # whoever read the output has gone: not an error of the call
            raise
        return 0
    if request_json is not None:
        raise UserError(
            f"{method.full_name} is a {stream_kind(method)}: its requests are read from "
            "stdin, one JSON object a line, not given as an argument",
            EXIT_USAGE,
        )
    stream = stub(timeout=timeout)
    lines.on_output_lost = _stopper(stream)
    outcome: Deferred[Any] = (
        stream.consume(lines.consumer) if method.server_streaming else stream.response()
    )
    sending = Deferred.fromCoroutine(_send_requests(lines, stream, request_class))
    # The outcome is passed on to ``result`` before stdin's reading is given
    # up (it may never end): cancelling ``sending`` resumes this coroutine,
    # which must find ``result`` fired, not in the middle of its callbacks.
    result: Deferred[Any] = Deferred()

    def ended(value: object) -> None:
        if isinstance(value, Failure):
            result.errback(value)
        else:
            result.callback(value)
        sending.cancel()

    outcome.addBoth(ended)
    try:
        await sending
    except UserError:
        stream.cancel()
        result.addErrback(_quiet)
        raise
    except (RpcError, defer.CancelledError):
        pass  # the stream ended first: ``result`` says how
    try:
        response = await result
    except RpcError:
        if lines.output_lost:
            return 0
        raise
    if not method.server_streaming:
        lines.write_line(response)
    return 0
