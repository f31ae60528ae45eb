"""The one call runner every listener uses: :class:`CallRunner`.

A listener's connection class (the native :class:`ServerConnection`, the
C++ listener's ``CppServerProtocol``) mixes it in, as AMP's protocol mixes in
its ``BoxDispatcher``, and keeps only its wire: it reads a request and hands
it to :meth:`CallRunner.request_received`, and it says what an unknown route
is and writes what the runner decides through three hooks. The runner does
the rest, the same for every wire:

route lookup → draining refusal → limits (ordinary and long-lived budgets,
per connection and per listener) → parse → invoke through the interceptor
chain (a response, a Deferred or a coroutine) → response-type check →
serialise → error to status (an ``RpcError`` as it is, ``CancelledError`` as
CANCELLED, anything else INTERNAL with its traceback logged) → the observer
and the slow-call log; and for the calls in flight: deadlines, cancellation,
the connection's loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.core._codec import NOT_RUN_KEY, ProtocolError
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
from twisted_rpc.server._streams import StreamRunner

if TYPE_CHECKING:
    from twisted_rpc.server._listener import ListenerFactory

log = Logger(namespace="twisted_rpc.server")

_NOT_RUN = {NOT_RUN_KEY: "shed"}
"""The trailer that marks an answer as given before the call ran."""
_LATE = {NOT_RUN_KEY: "late"}
"""The same marking, for a call dropped unrun because its deadline had passed."""

_Pending = tuple[Deferred[object], MethodInfo, float, bool]
"""A call in flight: its handler's Deferred, method, start time, long-lived."""


class CallRunner(StreamRunner):
    """Runs the calls of one connection, whatever its wire.

    The class mixing it in calls :meth:`init_calls` from its constructor and
    provides:

    - ``factory``: its :class:`ListenerFactory` (limits, the listener's call
      counters, observer, slow-call threshold, drain waiters);
    - ``clock`` and ``peer`` (for handlers' :class:`CallContext` and logs);
    - ``routes``: its requests' keys → methods;
    - :meth:`_unknown_route`, :meth:`_write_response` and
      :meth:`_write_status`, its wire;
    - ``call_label`` (a class attribute) for its log lines.

    ``draining`` and ``goaway_message`` say whether new calls are refused,
    and with what message (set by the connection's ``goaway``).
    """

    factory: ListenerFactory[Any]
    clock: IReactorTime
    peer: str
    routes: Mapping[Any, ServerMethod]
    call_label: ClassVar[str] = "call {call_id}"
    """How this wire's log lines name a call (a format over the event's keys)."""
    failed = False
    """Set by :meth:`fail_call` (under the adaptive limit: whether the call
    just handed to :meth:`request_received` ended with an error)."""
    sampled = False
    """Set as a call's latency is given to the adaptive limiter."""
    received_at: float | None = None
    """When the read that brought the request being handled started (set by
    a wire that stamps its reads, as the native connection does): calls are
    timed from it. None: the runner takes the time itself."""

    def init_calls(self, clock: IReactorTime) -> None:
        self.pending: dict[int, _Pending] = {}
        """The calls answered through a Deferred, not answered yet."""
        self.long_lived = 0
        self.exempt = 0
        """Calls in ``pending`` not counted against ``max_calls_per_connection``
        (the long-lived ones), less the open streams (which are counted)."""
        """How many of the calls in ``pending`` are long-lived."""
        self.deadlines = DeadlineQueue(clock, self.pending, self._deadline_expired, by_record=True)
        self.draining = False
        self.goaway_message = ""
        self.last_call_id = 0
        """The highest call id accepted to run here (what a GOAWAY reports)."""
        self.init_streams()

    # ----------------------------------------------------------------- the wire

    def _unknown_route(self, call_id: int, route: Any, started: float) -> None:
        """End ``call_id``, whose ``route`` no service here serves, with
        NOT_FOUND (through :meth:`fail_call` with ``unknown=True``)."""
        raise NotImplementedError

    def _write_response(self, call_id: int, payload: bytes) -> None:
        """Send the serialised response of ``call_id``."""
        raise NotImplementedError

    def _write_status(self, call_id: int, code: int, message: str) -> None:
        """End ``call_id`` with a status other than OK (``message`` is clipped)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- a call

    def request_received(
        self,
        call_id: int,
        status: int,
        timeout_ms: int,
        route: Any,
        metadata: dict[str, str] | None,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        """A request arrived: run it, and end it with a response or a status
        through the wire's hooks, now or when its handler's Deferred fires.

        ``route`` is the request's key in ``routes``; ``timeout_ms`` the
        caller's timeout (0: none). The arguments are the native REQUEST
        frame's fields, in its order, so the native connection takes this
        method as its frame handler with no call in between (the provider's
        hot path); ``status`` and ``message`` are not used, and a wire
        without them (the C++ one) passes 0 and "".
        """
        started = self.received_at  # the call's arrival: when its read started
        if started is None:
            started = self.clock.seconds()
        method = self.routes.get(route)
        if method is None:
            self._unknown_route(call_id, route, started)
            return
        if call_id in self.pending:
            raise ProtocolError(f"call id {call_id} is already in flight")
        if self.draining:
            refused = UnavailableError(message=self.goaway_message)
            self.fail_call(call_id, refused, method.info.full_name, started)
            return
        deadline = started + timeout_ms / 1000.0 if timeout_ms else None
        # (Only a wire that stamps its reads can tell: the others' started is now.)
        if (
            deadline is not None
            and self.received_at is not None
            and deadline <= self.clock.seconds()
        ):
            self._drop_late(call_id, method.info.full_name, started)  # it waited too long
            return
        factory = self.factory
        limits = factory.limits
        if method.long_lived:
            if method.streaming:
                self.start_stream(call_id, timeout_ms, method, metadata, payload, started)
                return
            refusal = self._long_lived_refusal(method)
            if refusal is not None:
                self.fail_call(call_id, refusal, method.info.full_name, started)
                return
        elif len(self.pending) - self.exempt >= limits.max_calls_per_connection:
            self.fail_call(
                call_id,
                ResourceExhaustedError(
                    message=f"{limits.max_calls_per_connection} calls in flight on this "
                    "connection (the provider's max_calls_per_connection)"
                ),
                method.info.full_name,
                started,
            )
            return
        elif factory.in_flight >= factory.admit_limit:
            # admit_limit is max_calls, or the adaptive limit when lower
            self.refuse_over_limit(call_id, method.info.full_name, started, factory.in_flight)
            return
        if call_id > self.last_call_id:
            self.last_call_id = call_id
        try:
            # One C call (not a new message, then its parse). The stub says
            # bytes; protobuf parses any buffer, a memoryview without a copy.
            request = method.request_class.FromString(payload)  # type: ignore[arg-type]
        except Exception as e:
            self.fail_call(
                call_id,
                InvalidArgumentError(
                    message=f"cannot parse {method.request_class.DESCRIPTOR.full_name}: {e}"
                ),
                method.info.full_name,
                started,
            )
            return
        context = CallContext(call_id, method.info, metadata, deadline, self)
        try:
            result = method.invoke(request, context)
        except Exception as e:
            error = self._status_of(e, call_id, method.info)
            self.fail_call(call_id, error, method.info.full_name, started)
            return
        if type(result) is method.response_class:
            # The common case, inline: :meth:`_send_response` without its type check.
            try:
                answer = result.SerializeToString()
            except Exception as e:
                error = self._status_of(e, call_id, method.info)
                self.fail_call(call_id, error, method.info.full_name, started)
                return
            self._write_response(call_id, answer)
            if factory.timing:
                self._finished(method.info.full_name, StatusCode.OK, started, call_id)
            return
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            long_lived = method.long_lived
            self.pending[call_id] = (result, method.info, started, long_lived)
            if long_lived:
                self.long_lived += 1
                self.exempt += 1
                factory.long_lived_in_flight += 1
            else:
                factory.in_flight += 1
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

    def refuse_over_limit(self, call_id: int, method: str, started: float, flight: int) -> None:
        """Refuse ``call_id``: ``flight`` calls are in flight, as many as the
        provider admits (``max_calls``, or the adaptive limit when lower)."""
        max_calls = self.factory.limits.max_calls
        if flight < max_calls:
            self._shed(call_id, method, started, flight)
            return
        error = ResourceExhaustedError(
            message=f"{max_calls} calls in flight at this provider (the provider's max_calls)"
        )
        self.fail_call(call_id, error, method, started)

    def _shed(self, call_id: int, method: str, started: float, flight: int) -> None:
        """Refuse ``call_id`` unrun, over the adaptive limit: RESOURCE_EXHAUSTED
        marked not run (docs/protocol.md), so the consumer may send it elsewhere."""
        factory = self.factory
        limiter = factory.limiter
        assert limiter is not None
        limiter.shed += 1
        error = ResourceExhaustedError(
            message=f"shed: {flight} calls in flight at this provider "
            f"(adaptive limit {limiter.limit})"
        )
        self.fail_call(call_id, error, method, started, trailers=_NOT_RUN, quiet=True)
        self._refused_unrun(error)

    def _refused_unrun(self, error: RpcError) -> None:
        """Log calls refused unrun (shed, late) together, at most once every
        ``REFUSED_LOG_INTERVAL`` seconds (the listener's ``refusals``): a line per call would add to
        the overload that made them (they are counted in the metrics)."""
        factory = self.factory
        count = factory.refusals.due(self.clock.seconds())
        if count:
            log.warn(
                "{listener} listener: {count} calls refused unrun since the last such line "
                "(the last: {code} {message})",
                listener=factory.name,
                count=count,
                code=code_name(error.code),
                message=error.message,
            )

    def _drop_late(self, call_id: int, method: str, started: float) -> None:
        """Refuse ``call_id`` unrun: its deadline passed between its arrival and
        now. DEADLINE_EXCEEDED, marked not run as a shed call is; counted by
        the adaptive limiter (when on) as shed and dropped late."""
        limiter = self.factory.limiter
        if limiter is not None:
            limiter.shed += 1
            limiter.dropped_late += 1
        error = RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call ran")
        self.fail_call(call_id, error, method, started, trailers=_LATE, quiet=True)
        self._refused_unrun(error)

    def _sample(self, started: float, method: str) -> None:
        """Feed the adaptive limiter a finished call's latency."""
        factory = self.factory
        limiter = factory.limiter
        self.sampled = True
        if limiter is not None and limiter.sample(
            self.clock.seconds() - started, factory.in_flight + 1, method
        ):
            factory.limit_changed()

    def _async_answer(self, result: object, call_id: int, info: MethodInfo) -> None:
        entry = self._take(call_id)
        if entry is not None:
            if self.factory.limiter is not None and not entry[3]:
                self._sample(entry[2], info.full_name)
            self._send_response(call_id, result, info, entry[2])

    def _async_failure(self, failure: Failure, call_id: int, info: MethodInfo) -> None:
        entry = self._take(call_id)
        if entry is None:
            return  # cancelled, expired or disconnected: already answered or nobody waits
        if self.factory.limiter is not None and not entry[3]:
            self._sample(entry[2], info.full_name)
        error = self._status_of(failure.value or Exception(), call_id, info, failure)
        self.fail_call(call_id, error, info.full_name, entry[2])

    def _send_response(
        self, call_id: int, result: object, info: MethodInfo, started: float
    ) -> None:
        if type(result) is not info.response_class:
            error = self.wrong_result(call_id, info, "returned", result)
            self.fail_call(call_id, error, info.full_name, started)
            return
        try:
            payload: bytes = result.SerializeToString()
        except Exception as e:
            self.fail_call(call_id, self._status_of(e, call_id, info), info.full_name, started)
            return
        self._write_response(call_id, payload)
        if self.factory.timing:
            self._finished(info.full_name, StatusCode.OK, started, call_id)

    def fail_call(
        self,
        call_id: int,
        error: RpcError,
        method: str,
        started: float,
        unknown: bool = False,
        trailers: Mapping[str, str] | None = None,
        quiet: bool = False,
    ) -> None:
        """End ``call_id`` with ``error``, log it (unless ``quiet``) and tell
        the observer.

        ``method`` is the method's full name, or for a route no service here
        serves (``unknown``), the provider's clipped text of it. The message
        is cut to :data:`MAX_ERROR_MESSAGE` characters.
        """
        self.failed = True
        duration = self.clock.seconds() - started
        message = clip(error.message, MAX_ERROR_MESSAGE)
        if not quiet:
            log.info(
                self.call_label
                + " {method} from {peer} failed: {code} {message} ({duration_ms:.1f} ms)",
                call_id=call_id,
                method=method,
                service=method.rpartition("/")[0],
                peer=self.peer,
                code=code_name(error.code),
                message=message,
                duration_ms=duration * 1000,
            )
        if trailers:
            self._write_end(call_id, int(error.code), message, trailers)
        else:
            self._write_status(call_id, int(error.code), message)
        observer = self.factory.observer
        if observer is not None:
            observer.call_finished("?/?" if unknown else method, int(error.code), duration)

    def _finished(self, method: str, code: int, started: float, call_id: int | None = None) -> None:
        """Tell the observer of a call's end; log it if it was slow."""
        duration = self.clock.seconds() - started
        factory = self.factory
        observer = factory.observer
        if observer is not None:
            observer.call_finished(method, code, duration)
        threshold = factory.slow_call_threshold
        if code == StatusCode.OK and threshold and duration >= threshold:
            log.warn(
                "slow " + self.call_label + " {method} from {peer}: {duration_ms:.1f} ms",
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
            self.call_label + " {method} from {peer} failed: handler raised an exception",
            failure=failure or Failure(error),
            call_id=call_id,
            method=info.full_name,
            peer=self.peer,
        )
        return InternalError(message="internal error")

    # ----------------------------------------------------------------- calls in flight

    def _take(self, call_id: int) -> _Pending | None:
        """Remove a call from the calls in flight (None if it is not there)."""
        entry = self.pending.pop(call_id, None)
        if entry is not None:
            factory = self.factory
            if entry[3]:
                self.long_lived -= 1
                self.exempt -= 1
                factory.long_lived_in_flight -= 1
            else:
                factory.in_flight -= 1
            if factory.idle_waiters:
                factory.check_idle()
        return entry

    def cancel_call(self, call_id: int) -> None:
        """The caller gave up on ``call_id``: cancel its handler (no answer is sent)."""
        entry = self._take(call_id)
        if entry is not None:
            self._finished(entry[1].full_name, StatusCode.CANCELLED, entry[2])
            entry[0].cancel()
        elif self.streams:
            self.cancel_stream(call_id)

    def cancel_calls(self) -> None:
        """The connection is gone: cancel every call in flight (no answer is sent)."""
        self.deadlines.stop()
        self.cancel_streams()
        pending = list(self.pending.values())
        factory = self.factory
        long_lived = self.long_lived
        factory.in_flight -= len(pending) - long_lived
        factory.long_lived_in_flight -= long_lived
        self.long_lived = 0
        self.exempt = 0
        self.pending.clear()
        for d, info, started, _ in pending:
            self._finished(info.full_name, StatusCode.CANCELLED, started)
            d.cancel()
        factory.check_idle()

    def _deadline_expired(self, call_id: int) -> None:
        entry = self._take(call_id)
        if entry is not None:
            d, info, started, _ = entry
            error = RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded at the provider")
            self.fail_call(call_id, error, info.full_name, started)
            d.cancel()
