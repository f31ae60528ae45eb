"""One provider-side connection: :class:`ServerConnection` runs its calls
(parse, invoke, answer, deadlines, cancellation, the limits of its factory).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import FrameKind, GoawayReason, ProtocolError
from twisted_rpc.core._connection import RpcConnection
from twisted_rpc.core._deadlines import DeadlineQueue
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import (
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RpcError,
    StatusCode,
    UnavailableError,
    code_name,
)
from twisted_rpc.server._context import CallContext
from twisted_rpc.server._dispatcher import MAX_ERROR_MESSAGE, ServerMethod, clip

if TYPE_CHECKING:
    from twisted_rpc.server._factory import ServerFactory
log = Logger(namespace="twisted_rpc.server")


_Pending = tuple[Deferred, MethodInfo, float, bool]
"""A call in flight: its handler's Deferred, method, start time, long-lived."""


class ServerConnection(RpcConnection):
    """One provider-side connection: many calls in flight, answered in any order."""

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
        self.pending: dict[int, _Pending] = {}
        self.long_lived = 0
        """How many of the calls in ``pending`` are long-lived."""
        self.deadlines = DeadlineQueue(
            factory.clock, self.pending, self._deadline_expired, by_record=True
        )
        self.draining = False
        self.goaway_message = ""
        self.last_call_id = 0
        """The highest call id accepted to run here (what a GOAWAY reports)."""
        self.held = 0
        """Bytes of a partial frame counted in the factory's ``partial_bytes``."""
        self._handlers[FrameKind.REQUEST] = self._request_received
        self._handlers[FrameKind.CANCEL] = self._cancel_received

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connection_made(self)
        if self.factory.draining:
            self.goaway("provider is shutting down")

    def connectionLost(self, reason: Failure) -> None:
        self._release_partial()
        super().connectionLost(reason)
        factory = self.factory
        factory.connection_lost(self)
        self.deadlines.stop()
        pending = list(self.pending.values())
        long_lived = self.long_lived
        factory.in_flight -= len(pending) - long_lived
        factory.long_lived_in_flight -= long_lived
        self.long_lived = 0
        self.pending.clear()
        for d, info, started, _ in pending:
            self._finished(info.full_name, StatusCode.CANCELLED, started)
            d.cancel()
        factory.check_idle()

    # ----------------------------------------------------------------- partial frames

    def partial_frame(self, completed: bool) -> None:
        super().partial_frame(completed)
        held = self.decoder.buffered
        factory = self.factory
        factory.partial_bytes += held - self.held
        self.held = held
        if held and factory.partial_bytes > factory.limits.max_buffered_bytes:
            factory.shed_partial_frames()

    def _release_partial(self) -> None:
        """Stop counting this connection's partial frame (it is dropped)."""
        self.factory.partial_bytes -= self.held
        self.held = 0

    def drop(self, why: str) -> None:
        """Close at once for ``why`` (logged), letting go of a partial frame now."""
        self._release_partial()
        self.abort(why)

    def write_buffer_full(self) -> None:
        # Answers are not being read: stop reading requests until they are.
        super().write_buffer_full()
        log.info("{peer} is not reading its answers: pausing its requests", peer=self.peer)
        self.transport.pauseProducing()

    def write_buffer_drained(self) -> None:
        super().write_buffer_drained()
        self.transport.resumeProducing()

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

    def _request_received(
        self,
        call_id: int,
        status: int,
        timeout_ms: int,
        route: bytes,
        metadata: dict[str, str] | None,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        started = self.clock.seconds()
        method = self.routes.get(route)
        if method is None:
            self._unknown_route(call_id, route, started)
            return
        if call_id in self.pending:
            raise ProtocolError(f"call id {call_id} is already in flight")
        if self.draining:
            self._send_error(
                call_id,
                UnavailableError(message=self.goaway_message),
                method.info.full_name,
                started,
            )
            return
        limits = self.factory.limits
        if method.long_lived:
            refusal = self._long_lived_refusal(method)
            if refusal is not None:
                self._send_error(call_id, refusal, method.info.full_name, started)
                return
        elif len(self.pending) - self.long_lived >= limits.max_calls_per_connection:
            self._send_error(
                call_id,
                ResourceExhaustedError(
                    message=f"{limits.max_calls_per_connection} calls in flight on this connection"
                ),
                method.info.full_name,
                started,
            )
            return
        elif self.factory.in_flight >= limits.max_calls:
            self._send_error(
                call_id,
                ResourceExhaustedError(
                    message=f"{limits.max_calls} calls in flight at this provider"
                ),
                method.info.full_name,
                started,
            )
            return
        if call_id > self.last_call_id:
            self.last_call_id = call_id
        request = method.request_class()
        try:
            request.ParseFromString(payload)
        except Exception as e:
            self._send_error(
                call_id,
                InvalidArgumentError(
                    message=f"cannot parse {method.request_class.DESCRIPTOR.full_name}: {e}"
                ),
                method.info.full_name,
                started,
            )
            return
        deadline = started + timeout_ms / 1000.0 if timeout_ms else None
        context = CallContext(call_id, method.info, metadata, deadline, self)
        try:
            result = method.invoke(request, context)
        except Exception as e:
            error = self._status_of(e, call_id, method.info)
            self._send_error(call_id, error, method.info.full_name, started)
            return
        if type(result) is method.response_class:
            self._send_response(call_id, result, method.info, started)
            return
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            long_lived = method.long_lived
            self.pending[call_id] = (result, method.info, started, long_lived)
            if long_lived:
                self.long_lived += 1
                self.factory.long_lived_in_flight += 1
            else:
                self.factory.in_flight += 1
            if deadline is not None:
                self.deadlines.add(deadline, call_id)
            result.addCallbacks(
                self._async_answer,
                self._async_failure,
                callbackArgs=(call_id, method.info),
                errbackArgs=(call_id, method.info),
            )
        else:
            self._send_response(call_id, result, method.info, started)

    def _unknown_route(self, call_id: int, route: bytes, started: float) -> None:
        not_found = self.factory.dispatcher.not_found(route)
        text = clip(route.decode("utf-8", "replace"))
        self._send_error(call_id, not_found, text, started, unknown=True)

    def _long_lived_refusal(self, method: ServerMethod) -> RpcError | None:
        """Why a long-lived call cannot start now (None: it can)."""
        limits = self.factory.limits
        if self.long_lived >= limits.max_long_lived_calls_per_connection:
            return ResourceExhaustedError(
                message=f"{limits.max_long_lived_calls_per_connection} long-lived calls "
                f"({method.info.full_name} and the like) in flight on this connection"
            )
        if self.factory.long_lived_in_flight >= limits.max_long_lived_calls:
            return ResourceExhaustedError(
                message=f"{limits.max_long_lived_calls} long-lived calls "
                f"({method.info.full_name} and the like) in flight at this provider"
            )
        return None

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
        self._send_error(call_id, error, method.info.full_name, started)

    def _async_answer(self, result: object, call_id: int, info: MethodInfo) -> None:
        entry = self._take(call_id)
        if entry is not None:
            self._send_response(call_id, result, info, entry[2])

    def _async_failure(self, failure: Failure, call_id: int, info: MethodInfo) -> None:
        entry = self._take(call_id)
        if entry is None:
            return  # cancelled, expired or disconnected: already answered or nobody waits
        error = self._status_of(failure.value, call_id, info, failure)
        self._send_error(call_id, error, info.full_name, entry[2])

    def _send_response(
        self, call_id: int, result: object, info: MethodInfo, started: float
    ) -> None:
        if type(result) is not info.response_class:
            log.error(
                "call {call_id} {method} from {peer}: handler returned {kind}, expected {expected}",
                call_id=call_id,
                method=info.full_name,
                peer=self.peer,
                kind=type(result).__name__,
                expected=info.response_class.DESCRIPTOR.full_name,
            )
            error = InternalError(message="internal error")
            self._send_error(call_id, error, info.full_name, started)
            return
        try:
            payload = result.SerializeToString()  # type: ignore[attr-defined]
        except Exception as e:
            self._send_error(call_id, self._status_of(e, call_id, info), info.full_name, started)
            return
        self.send(wire.encode_response(call_id, len(payload)), payload)
        if self.factory.timing:
            self._finished(info.full_name, StatusCode.OK, started, call_id)

    def _send_error(
        self, call_id: int, error: RpcError, method: str, started: float, unknown: bool = False
    ) -> None:
        """Answer ``call_id`` with ``error``, and log the failed call.

        ``method`` and the message are the provider's own text or already
        clipped; the message is cut to :data:`MAX_ERROR_MESSAGE` anyway.
        """
        duration = self.clock.seconds() - started
        message = clip(error.message, MAX_ERROR_MESSAGE)
        log.info(
            "call {call_id} {method} from {peer} failed: {code} {message} ({duration_ms:.1f} ms)",
            call_id=call_id,
            method=method,
            service=method.rpartition("/")[0],
            peer=self.peer,
            code=code_name(error.code),
            message=message,
            duration_ms=duration * 1000,
        )
        self.send(wire.encode_status(call_id, int(error.code), message))
        observer = self.factory.observer
        if observer is not None:
            observer.call_finished("?/?" if unknown else method, int(error.code), duration)

    def _finished(self, method: str, code: int, started: float, call_id: int | None = None) -> None:
        """Tell the observer of a call's end; log it if it was slow."""
        duration = self.clock.seconds() - started
        observer = self.factory.observer
        if observer is not None:
            observer.call_finished(method, code, duration)
        threshold = self.factory.slow_call_threshold
        if code == StatusCode.OK and threshold and duration >= threshold:
            log.warn(
                "slow call {call_id} {method} from {peer}: {duration_ms:.1f} ms",
                call_id=call_id,
                method=method,
                peer=self.peer,
                code="OK",
                duration_ms=duration * 1000,
            )

    def _status_of(
        self, error: BaseException, call_id: int, info: MethodInfo, failure: Failure | None = None
    ) -> RpcError:
        """The error to send for ``error``: RpcErrors as they are, others as INTERNAL."""
        if isinstance(error, RpcError):
            return error
        if isinstance(error, defer.CancelledError):
            return RpcError(StatusCode.CANCELLED, "cancelled by the provider")
        log.failure(
            "call {call_id} {method} from {peer} failed",
            failure=failure or Failure(error),
            call_id=call_id,
            method=info.full_name,
            peer=self.peer,
        )
        return InternalError(message="internal error")

    def _take(self, call_id: int) -> _Pending | None:
        """Remove a call from the calls in flight (None if it is not there)."""
        entry = self.pending.pop(call_id, None)
        if entry is not None:
            factory = self.factory
            if entry[3]:
                self.long_lived -= 1
                factory.long_lived_in_flight -= 1
            else:
                factory.in_flight -= 1
            if factory.idle_waiters:
                factory.check_idle()
        return entry

    def _cancel_received(self, call_id: int, *_: object) -> None:
        entry = self._take(call_id)
        if entry is not None:
            self._finished(entry[1].full_name, StatusCode.CANCELLED, entry[2])
            entry[0].cancel()

    def _deadline_expired(self, call_id: int) -> None:
        entry = self._take(call_id)
        if entry is not None:
            d, info, started, _ = entry
            error = RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded at the provider")
            self._send_error(call_id, error, info.full_name, started)
            d.cancel()
