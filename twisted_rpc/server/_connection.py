"""One native provider-side connection: :class:`ServerConnection` reads
requests and cancels, and writes answers and GOAWAY; its calls run in the
:class:`CallRunner` it mixes in (limits, parse, invoke, deadlines, errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind, GoawayReason, ProtocolError
from twisted_rpc.core._connection import LARGE_PAYLOAD, IRpcTransport, RpcConnection
from twisted_rpc.core._status import ResourceExhaustedError
from twisted_rpc.server._dispatcher import clip
from twisted_rpc.server._runner import CallRunner

if TYPE_CHECKING:
    from twisted_rpc.server._factory import ServerFactory

log = Logger(namespace="twisted_rpc.server")


class IServerTransport(IRpcTransport, IPushProducer):
    """What a provider connection uses of its transport (for typing only):
    also what it reads can be paused and resumed, as a TCP transport's
    (plain or under TLS) can."""


class ServerConnection(CallRunner, RpcConnection):
    """One provider-side connection: many calls in flight, answered in any order."""

    factory: ServerFactory
    transport: IServerTransport

    def __init__(self, factory: ServerFactory) -> None:
        limits = factory.limits
        super().__init__(
            factory.clock,
            factory.max_frame_size,
            limits.max_metadata_size,
            limits.max_metadata_entries,
        )
        self.factory = factory
        self.routes = factory.dispatcher.routes
        self.init_calls(factory.clock)
        self.held = 0
        """Bytes of a partial frame counted in the factory's ``partial_bytes``."""
        self._handlers[FrameKind.REQUEST] = (
            self.request_received if factory.limiter is None else self.limited_request_received
        )
        self._handlers[FrameKind.CANCEL] = self._cancel_received
        self._handlers[FrameKind.MESSAGE] = self.stream_message_received
        self._handlers[FrameKind.END_STREAM] = self.end_stream_received
        self._handlers[FrameKind.WINDOW] = self.window_received
        self.decoder.max_message_frame = min(
            self.decoder.max_frame_size,
            limits.max_message_size + wire.HEADER_SIZE - 4 + limits.max_metadata_size + 4,
        )

    supports_streams = True
    _told_not_reading = False

    def limited_request_received(
        self,
        call_id: int,
        status: int,
        timeout_ms: int,
        route: bytes,
        metadata: dict[str, str] | None,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        """:meth:`CallRunner.request_received` under the adaptive limit: calls answered
        inline count as in flight until the read that brought them ends (their
        answers leave with its batch), and are sampled as they end."""
        factory = self.factory
        started = self.received_at
        method = self.routes.get(route)
        if started is None or method is None or method.long_lived:
            self.request_received(call_id, status, timeout_ms, route, metadata, message, payload)
            return
        ran = factory.inline_ran if factory.inline_of is self else 0
        flight = factory.in_flight + ran
        name = method.info.full_name
        if ran and flight >= factory.admit_limit and not self.draining:
            self.refuse_over_limit(call_id, name, started, flight)
            return
        self.failed = self.sampled = False
        self.request_received(call_id, status, timeout_ms, route, metadata, message, payload)
        if self.failed or self.sampled or call_id in self.pending:
            return  # refused, shed, dropped or failed; answered later; or sampled already
        if not ran:
            factory.inline_of = self
            self.wake_later(_EndOfRead(factory))  # type: ignore[arg-type]
        factory.inline_ran = ran + 1
        limiter = factory.limiter
        assert limiter is not None
        if limiter.sample(self.clock.seconds() - started, flight + 1, name):
            factory.limit_changed()

    def local_settings(self) -> dict[str, str]:
        limits = self.factory.limits
        return {
            "streams": "1",
            "stream_window": str(limits.stream_window),
            "max_streams": str(limits.max_streams_per_connection),
            "max_calls": str(limits.max_calls_per_connection),
            "max_frame_size": str(self.factory.max_frame_size),
            "max_message_size": str(limits.max_message_size),
            **self.encodings_setting(),
            **self.factory.extra_settings,
        }

    def _start_compressing(self, encoding: str) -> None:
        """Called on the first compressed frame from the consumer: from then
        on answers of ``compression_threshold`` bytes or more are compressed,
        in ``ServerLimits.compression`` if the consumer lists it, else in the
        consumer's first encoding; never under ``"identity"``."""
        limits = self.factory.limits  # (read here, not kept: nothing added per connection)
        choice = limits.compression
        if choice == "identity":
            return
        if choice is not None and choice in self.peer_encodings:
            encoding = choice
        super()._start_compressing(encoding)
        self.compress_min = limits.compression_threshold

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._release_partial()
        super().connectionLost(reason)
        self.factory.connection_lost(self)
        self.cancel_calls()
        if self.factory.inline_of is self:  # a read that ended in an error
            _EndOfRead(self.factory).fire()

    # ----------------------------------------------------------------- partial frames

    def partial_frame(self, completed: bool) -> None:
        super().partial_frame(completed)
        held = self.decoder.held
        factory = self.factory
        factory.partial_bytes += held - self.held
        self.held = held
        if held and factory.partial_bytes > factory.limits.max_buffered_bytes:
            factory.shed_partial_frames()

    def _release_partial(self) -> None:
        """Stop counting this connection's partial frame and the request
        messages its streams hold (they are dropped)."""
        self.factory.partial_bytes -= self.held + self.stream_held
        self.held = 0
        self.stream_held = 0

    def drop(self, why: str) -> None:
        """Close at once for ``why`` (logged), letting go of a partial frame now."""
        self._release_partial()
        self.abort(why)

    def write_buffer_full(self) -> None:
        # Answers are not being read: stop reading requests until they are.
        super().write_buffer_full()
        if not self._told_not_reading and not self.streams:
            self._told_not_reading = True  # once per connection: streams fill it routinely
            log.info("{peer} is not reading its answers: pausing its requests", peer=self.peer)
        self.transport.pauseProducing()

    def write_buffer_drained(self) -> None:
        super().write_buffer_drained()
        self.transport.resumeProducing()
        if self._turn_waiters:
            self.turn_over()

    def goaway(self, message: str = "", reason: GoawayReason = GoawayReason.SHUTDOWN) -> None:
        """Tell the peer to send no new calls here; calls in flight still finish.

        The frame carries ``reason`` and the highest call id accepted here:
        the calls above it were not run, and requests that still arrive are
        answered UNAVAILABLE with ``message``.
        """
        if not self.draining:
            self.draining = True
            self.goaway_message = message or "provider is shutting down"
            if self.connected:
                self.send(wire.encode_goaway(self.last_call_id, message, reason))

    # ----------------------------------------------------------------- calls

    def _unknown_route(self, call_id: int, route: bytes, started: float) -> None:
        not_found = self.factory.dispatcher.not_found(route)
        text = clip(route.decode("utf-8", "replace"))
        self.fail_call(call_id, not_found, text, started, unknown=True)

    def _ext_rejected(self, kind: int, call_id: int, status: int, route: bytes, why: str) -> None:
        """A REQUEST whose metadata is over the limits is answered
        RESOURCE_EXHAUSTED without being run; the connection lives on."""
        if kind != FrameKind.REQUEST:
            super()._ext_rejected(kind, call_id, status, route, why)
            return
        if call_id in self.pending:
            raise ProtocolError(f"call id {call_id} is already in flight")
        started = self.clock.seconds()
        method = self.routes.get(route)
        if method is None:
            self._unknown_route(call_id, route, started)
            return
        limit = "max_metadata_entries" if "entries" in why else "max_metadata_size"
        error = ResourceExhaustedError(message=f"request not read: {why} ({limit})")
        self.fail_call(call_id, error, method.info.full_name, started)

    def _write_response(self, call_id: int, payload: bytes) -> None:
        size = len(payload)
        header = wire.encode_response(call_id, size)
        if size >= self.compress_min:  # (NEVER until the consumer compresses)
            header, payload, size = self.squeeze(header, payload)
        batch = self._batch
        if batch is None or size >= LARGE_PAYLOAD:
            self.send(header, payload)
        else:  # send()'s first branch, inline: this is the hot path
            batch.append(header)
            batch.append(payload)
            if len(batch) >= self._flush_at:
                self.flush_early(batch)

    def _write_status(self, call_id: int, code: int, message: str) -> None:
        self.send(wire.encode_status(call_id, code, message))

    def _write_message(self, call_id: int, payload: bytes) -> None:
        header = wire.encode_message(call_id, len(payload))
        if len(payload) >= self.compress_min:
            header, payload, _ = self.squeeze(header, payload)
        self.send(header, payload)

    def _write_headers(self, call_id: int, metadata: Mapping[str, str]) -> None:
        self.send(wire.encode_headers(call_id, metadata))

    def _write_window(self, call_id: int, increment: int) -> None:
        self.send(wire.encode_window(call_id, increment))

    def _write_end(
        self,
        call_id: int,
        code: int,
        message: str,
        trailers: Mapping[str, str] | None,
        payload: bytes = b"",
    ) -> None:
        header = wire.encode_header(
            wire.RESPONSE,
            call_id,
            len(payload),
            status=code,
            message=message,
            metadata=trailers,
        )
        if len(payload) >= self.compress_min:
            header, payload, _ = self.squeeze(header, payload)
        self.send(header, payload)

    def _cancel_received(self, call_id: int, *_: object) -> None:
        self.cancel_call(call_id)


class _EndOfRead:
    """Fired once the read that ran calls inline is handled (their answers
    written with its batch): they no longer count as in flight."""

    __slots__ = ("factory",)

    def __init__(self, factory: ServerFactory) -> None:
        self.factory = factory

    def fire(self) -> None:
        self.factory.inline_of = None
        self.factory.inline_ran = 0
