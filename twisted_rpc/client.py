"""Consumer side: connections, per-provider channels, the client and its proxies.

:class:`ClientConnection` runs calls on one connection (call ids, the
outstanding map, deadlines, cancellation). :class:`Channel` keeps one
persistent connection to one provider, reconnecting with backoff.
:class:`Client` picks a channel per call from the provider lists its
discovery gives, and builds :class:`ServiceProxy` objects whose methods
return Deferreds::

    client = Client(reactor, providers={"example.UserService": ["127.0.0.1:8000"]})
    users = client.proxy(user_pb2.DESCRIPTOR.services_by_name["UserService"])
    response = await users.Login(LoginRequest(name="zhang san", pwd="123456"), timeout=2)
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc import wire
from twisted_rpc.balancer import Balancer, RoundRobin, balancer_named
from twisted_rpc.deadlines import DeadlineQueue
from twisted_rpc.interfaces import IClientInterceptor, IServiceDiscovery
from twisted_rpc.protocol import LARGE_PAYLOAD, RpcConnection
from twisted_rpc.registry import ProviderAddress, StaticRegistry, check_address
from twisted_rpc.service import (
    MethodInfo,
    Service,
    describe,
    resolve_descriptor,
    wrong_request_type,
)
from twisted_rpc.status import (
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RpcError,
    UnavailableError,
)
from twisted_rpc.tls import ClientTLS, wrap_client_endpoint
from twisted_rpc.wire import FrameKind, GoawayReason

__all__ = [
    "Channel",
    "Client",
    "ClientCall",
    "ClientConnection",
    "MAX_TIMEOUT",
    "NotSentError",
    "ServiceProxy",
    "backoff_policy",
    "timeout_error",
]

log = Logger()

DEFAULT_MAX_WRITE_BUFFER = 256 * 1024 * 1024
"""Bytes of calls a connection holds unsent before new calls fail RESOURCE_EXHAUSTED."""

MAX_TIMEOUT = 0xFFFFFFFF / 1000
"""The longest call timeout in seconds: the wire carries it as u32 milliseconds."""

DEFAULT_MAX_CONCURRENT_DIALS = 32
"""Connection attempts (connect and first PING) a client has in progress at once."""

DEFAULT_MAX_DIALS_PER_SECOND = 500.0
"""Redials (after a failed attempt) a client starts per second at most, past a burst."""

MAX_RESENDS = 1
"""Times a call is sent again after a GOAWAY showed it was never run. Past
it the call fails with NotSentError: a provider that says GOAWAY to every
call cannot keep one going round."""

GOAWAY_CLOSE_GRACE = 10.0
"""Seconds a connection closed after its GOAWAY (its calls done) may take to
flush; then it is aborted (a peer that does not read)."""


def timeout_error(timeout: object) -> ValueError | None:
    """Why ``timeout`` is not a call timeout (None, or 0 to MAX_TIMEOUT seconds), or None."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        return ValueError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not 0 <= timeout <= MAX_TIMEOUT:  # also false for nan
        return ValueError(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds, not {timeout!r}")
    return None


class NotSentError(UnavailableError):
    """UNAVAILABLE before the call was written to any connection: safe to send elsewhere."""


class _Call(Deferred):
    """A call's Deferred, which knows its call id and who holds it, so
    cancelling it is one lookup.

    ``holder`` is the connection whose outstanding map holds it, or, when a
    GOAWAY took the call back and its channel is dialling, the
    :class:`_Parked` entry that waits for the connection; None in between.
    A call sent again keeps its Deferred: it moves, nothing is chained to it.
    ``resends`` counts the times it was sent again (see MAX_RESENDS).
    """

    __slots__ = ("call_id", "holder")
    resends = 0


def _cancel_call(d: _Call) -> None:
    holder = d.holder
    if holder is not None:
        holder._cancel(d)


TakenBack = tuple[_Call, MethodInfo, bytes, "Mapping[str, str] | None", float]
"""A call a GOAWAY showed was never run: its Deferred, method, serialized
request, metadata and absolute deadline (0: none)."""


class ClientConnection(RpcConnection):
    """One consumer-side connection: numbered calls, answered in any order.

    ``outstanding`` maps a call id to ``(deferred, method, payload, metadata,
    deadline)``: what it takes to send the call again if a GOAWAY shows the
    provider never ran it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        on_lost: Callable[[ClientConnection, Failure], object] | None = None,
        on_goaway: Callable[[ClientConnection, GoawayReason, list[TakenBack]], object]
        | None = None,
        keepalive_interval: float = 0.0,
        keepalive_timeout: float = 10.0,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    ) -> None:
        super().__init__(clock, max_frame_size)
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.max_write_buffer = max_write_buffer
        self.pong_abort_bytes = max_write_buffer
        self._written_while_blocked = 0
        self.keepalive_failed = False
        self._keepalive: Any = None
        self.outstanding: dict[int, TakenBack] = {}
        self.deadlines = DeadlineQueue(clock, self.outstanding, self._deadline_expired)
        self.goaway_received = False
        self.goaway_reason: GoawayReason | None = None
        self.available = False
        """True while new calls may be sent here (connected, no GOAWAY)."""
        self.made_at = 0.0
        """When the connection was made (clock seconds)."""
        self._next_id = 1
        self._wrapped = False
        self._timeout: float = 0.0  # the last call's timeout (checked), and it in ms for the wire
        self._timeout_ms = 0
        self._on_lost = on_lost
        self._on_goaway = on_goaway
        self._handlers[FrameKind.RESPONSE] = self._response_received
        self._handlers[FrameKind.GOAWAY] = self._goaway_received

    def connectionMade(self) -> None:
        super().connectionMade()
        self.made_at = self.clock.seconds()
        self.available = True
        if self.keepalive_interval > 0:
            self._keepalive = self.clock.callLater(self.keepalive_interval, self._send_keepalive)

    def _send_keepalive(self) -> None:
        """PING; a peer that does not answer within keepalive_timeout is dead."""
        self._keepalive = None
        if not self.connected:
            return
        d = self.ping()
        d.addTimeout(self.keepalive_timeout, self.clock)
        d.addCallbacks(self._keepalive_answered, self._keepalive_missed)

    def _keepalive_answered(self, rtt: float) -> None:
        if self.connected:
            self._keepalive = self.clock.callLater(self.keepalive_interval, self._send_keepalive)

    def _keepalive_missed(self, failure: Failure) -> None:
        if self.connected:
            self.keepalive_failed = True
            self.log.warn(
                "no answer to a keepalive ping from {peer} in {t:g}s: closing the connection",
                peer=self.peer,
                t=self.keepalive_timeout,
            )
            self.transport.abortConnection()

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred:
        """Send one call; the Deferred fires with the response or an RpcError.

        A bad ``timeout`` (not a number, negative, nan, past MAX_TIMEOUT)
        fails the Deferred with ValueError; nothing is sent.
        """
        if timeout:
            # The last call's timeout was checked already: the same object,
            # or an equal float or int (True == 1, Decimal(1) == 1: checked).
            if timeout is not self._timeout and (
                timeout != self._timeout
                or (type(timeout) is not float and type(timeout) is not int)
            ):
                error = timeout_error(timeout)
                if error is not None:
                    return fail(error)
                self._timeout = timeout
                self._timeout_ms = max(1, int(timeout * 1000))
        elif timeout is not None and (
            timeout != 0 or (type(timeout) is not float and type(timeout) is not int)
        ):
            return fail(timeout_error(timeout) or ValueError(f"bad timeout {timeout!r}"))
        if not self.available:
            why = "provider is shutting down" if self.goaway_received else "not connected"
            return fail(NotSentError(message=f"{self.peer}: {why}"))
        try:
            payload = request.SerializeToString()
        except Exception as e:
            return fail(InvalidArgumentError(message=f"cannot serialize request: {e}"))
        size = len(payload)
        if self.write_blocked and self._over_write_buffer(size):
            return fail(
                ResourceExhaustedError(
                    message=f"{self.peer} reads slower than calls are made: more than "
                    f"{self.max_write_buffer} bytes of calls wait to be sent"
                )
            )
        call_id = self._next_id
        if call_id < 0xFFFFFFFF and not self._wrapped:
            self._next_id = call_id + 1
        else:
            call_id = self._next_wrapped_id()
        try:
            if timeout:
                deadline = self.clock.seconds() + timeout
                header = wire.encode_request(
                    call_id, method.route, size, self._timeout_ms, metadata
                )
            else:
                deadline = 0.0
                header = wire.encode_request(call_id, method.route, size, 0, metadata)
        except Exception as e:  # metadata that is not text, say
            return fail(InvalidArgumentError(message=f"cannot encode the call: {e}"))
        d = _Call(_cancel_call)
        d.call_id = call_id
        d.holder = self
        self.outstanding[call_id] = (d, method, payload, metadata, deadline)
        if deadline:
            self.deadlines.add(deadline, call_id)
        batch = self._batch
        if batch is None or size >= LARGE_PAYLOAD:
            self.send(header, payload)
        else:  # send()'s first branch, inline: this is the hot path
            batch.append(header)
            batch.append(payload)
        return d

    def resume(self, call: TakenBack) -> RpcError | None:
        """Send a call a GOAWAY took back (from another connection) here: the
        same Deferred, a new call id, what is left of its deadline.

        Returns why it could not be sent (NotSentError: it may go elsewhere),
        or None: sent, or ended (its deadline passed, the buffer is full).
        """
        d, method, payload, metadata, deadline = call
        if not self.available:
            why = "provider is shutting down" if self.goaway_received else "not connected"
            return NotSentError(message=f"{self.peer}: {why}")
        timeout_ms = 0
        if deadline:
            left = deadline - self.clock.seconds()
            if left <= 0:
                d.holder = None
                d.errback(DeadlineExceededError(message="deadline exceeded"))
                return None
            timeout_ms = max(1, int(left * 1000))
        size = len(payload)
        if self.write_blocked and self._over_write_buffer(size):
            d.holder = None
            d.errback(
                ResourceExhaustedError(
                    message=f"{self.peer} reads slower than calls are made: more than "
                    f"{self.max_write_buffer} bytes of calls wait to be sent"
                )
            )
            return None
        call_id = self._next_id
        if call_id < 0xFFFFFFFF and not self._wrapped:
            self._next_id = call_id + 1
        else:
            call_id = self._next_wrapped_id()
        header = wire.encode_request(call_id, method.route, size, timeout_ms, metadata)
        d.call_id = call_id
        d.holder = self
        self.outstanding[call_id] = call
        if deadline:
            self.deadlines.add(deadline, call_id)
        self.send(header, payload)
        return None

    def _over_write_buffer(self, size: int) -> bool:
        """Whether ``size`` more bytes would pass max_write_buffer.

        Asked only while the transport is paused: the provider reads slower
        than we write (busy, or not reading at all). A transport that does not
        tell what it holds is assumed to hold all written since the pause.
        """
        unsent = self.unsent_bytes()
        if unsent is None:
            unsent = self._written_while_blocked
        if unsent + size > self.max_write_buffer:
            return True
        self._written_while_blocked += size
        return False

    def write_buffer_drained(self) -> None:
        super().write_buffer_drained()
        self._written_while_blocked = 0

    def close(self) -> None:
        """Close at once. The calls in flight fail either way, and flushing
        unsent ones first could wait forever: the transport stops reading
        when asked to close, so a provider with answers for us stops reading
        too once its own buffer is full."""
        self.transport.abortConnection()

    def _next_wrapped_id(self) -> int:
        """After 2**32 - 1 calls the ids wrap: skip the ones still in flight."""
        self._wrapped = True
        call_id = self._next_id
        while call_id in self.outstanding:
            call_id = call_id + 1 if call_id < 0xFFFFFFFF else 1
        self._next_id = call_id + 1 if call_id < 0xFFFFFFFF else 1
        return call_id

    def _response_received(
        self,
        call_id: int,
        status: int,
        timeout_ms: int,
        route: bytes,
        metadata: dict[str, str] | None,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        entry = self.outstanding.pop(call_id, None)
        if entry is None:
            return  # answered locally already (cancelled or timed out), or taken back
        d = entry[0]
        if status:
            d.errback(RpcError.from_status(status, message))
            return
        response = entry[1].response_class()
        try:
            response.ParseFromString(payload)
        except Exception as e:
            d.errback(DataLossError(message=f"cannot parse the response: {e}"))
            return
        d.callback(response)

    def _goaway_received(self, last_call_id: int, status: int, *_: object) -> None:
        """No new calls here; the calls above ``last_call_id`` were never run.

        They are taken out of this connection and handed to ``on_goaway`` to
        be sent again (a late UNAVAILABLE answer to one of them is ignored).
        """
        self.goaway_received = True
        self.available = False
        try:
            reason = GoawayReason(status)
        except ValueError:
            reason = GoawayReason.UNSPECIFIED
        self.goaway_reason = reason
        # From now on, the connection closes once its last call is done.
        self._handlers[FrameKind.RESPONSE] = self._response_after_goaway
        taken = self._take_back(last_call_id)
        self.log.info(
            "{peer} sent GOAWAY ({reason}, last call {last}): {n} calls it never ran go again",
            peer=self.peer,
            reason=reason.name.lower(),
            last=last_call_id,
            n=len(taken),
        )
        if self._on_goaway is not None:
            self._on_goaway(self, reason, taken)
        else:
            for d, *_rest in taken:
                d.errback(NotSentError(message=f"{self.peer}: provider sent GOAWAY"))
        self._close_if_done()

    def _response_after_goaway(self, *frame: Any) -> None:
        self._response_received(*frame)
        self._close_if_done()

    def _close_if_done(self) -> None:
        """After a GOAWAY, once no call is left: close the connection (a
        provider may leave it open), and abort it if it has not closed
        GOAWAY_CLOSE_GRACE seconds later (a peer that does not read)."""
        if self.outstanding or not self.connected or self._close_timer is not None:
            return
        RpcConnection.close(self)  # flushes what was written (a CANCEL, say)
        self._close_timer = self.clock.callLater(GOAWAY_CLOSE_GRACE, self._close_overdue)

    def _close_overdue(self) -> None:
        self._close_timer = None
        if self.connected:
            self.log.warn(
                "aborting the connection to {peer}: not closed {t:g}s after its GOAWAY",
                peer=self.peer,
                t=GOAWAY_CLOSE_GRACE,
            )
            self.transport.abortConnection()

    def _take_back(self, last_call_id: int) -> list[TakenBack]:
        """Remove and return the calls sent after ``last_call_id``.

        After the ids wrapped around, "after" cannot be told from the id:
        then nothing is taken back, and those calls end as the connection does.
        """
        if self._wrapped:
            return []
        outstanding = self.outstanding
        ids = [call_id for call_id in outstanding if call_id > last_call_id]
        taken = [outstanding.pop(call_id) for call_id in ids]
        for entry in taken:
            entry[0].holder = None  # in transit
        return taken

    def _cancel(self, d: _Call) -> None:
        call_id = d.call_id
        entry = self.outstanding.get(call_id)
        if entry is None or entry[0] is not d:
            return
        del self.outstanding[call_id]
        if self.connected:
            self.send(wire.encode_cancel(call_id))
        d.errback(CancelledError(message="cancelled by the caller"))
        if self.goaway_received:
            self._close_if_done()

    def _deadline_expired(self, call_id: int) -> None:
        entry = self.outstanding.pop(call_id, None)
        if entry is not None:
            entry[0].errback(DeadlineExceededError(message="deadline exceeded"))
            if self.goaway_received:
                self._close_if_done()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.available = False
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        self.deadlines.stop()
        outstanding = list(self.outstanding.values())
        self.outstanding.clear()
        for d, *_ in outstanding:
            d.errback(UnavailableError(message=f"connection to {self.peer} lost"))
        if self._on_lost is not None:
            self._on_lost(self, reason)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: object) -> ClientConnection:
        c = self.channel
        return ClientConnection(
            c.clock,
            c.max_frame_size,
            c._connection_lost,
            c._goaway,
            c.keepalive_interval,
            c.keepalive_timeout,
            c.max_write_buffer,
        )


def _endpoint(reactor: Any, address: ProviderAddress, connect_timeout: float) -> Any:
    """A TCP endpoint for ``address``: IPv6 for a v6 literal, else IPv4 (a
    HostnameEndpoint would try both, and costs ~300 ms on a refused port)."""
    if isIPv6Address(address.host):
        return TCP6ClientEndpoint(reactor, address.host, address.port, connect_timeout)
    return TCP4ClientEndpoint(reactor, address.host, address.port, connect_timeout)


def backoff_policy(
    initial: float = 0.1,
    maximum: float = 5.0,
    factor: float = 2.0,
    jitter: float = 0.2,
    rng: Callable[[], float] = random.random,
) -> Callable[[int], float]:
    """A backoff policy (as Twisted's ``backoffPolicy``): failed attempts in
    a row -> seconds to wait before the next, growing by ``factor`` up to
    ``maximum``, each times a random factor in ``1 +- jitter``."""

    def policy(failures: int) -> float:
        delay = min(initial * factor ** min(max(failures - 1, 0), 64), maximum)
        return delay * (1 - jitter + 2 * jitter * rng())

    return policy


class _DialQueue:
    """Connection attempts across a client's channels: at most ``limit`` in
    progress at once, first dials before redials; redials (after a failed
    attempt) start at most ``rate`` per second, past a burst of ``limit``.
    The rate matters when attempts end fast: thousands of registered ports
    that refuse would otherwise be redialled as fast as they refuse."""

    def __init__(self, clock: IReactorTime, limit: int, rate: float) -> None:
        self.clock = clock
        self.limit = limit
        self.rate = rate
        self.active = 0
        self.first: deque[Channel] = deque()
        self.again: deque[Channel] = deque()
        self._tokens = float(limit)
        self._refilled = clock.seconds()
        self._later: Any = None

    def request(self, channel: Channel) -> None:
        (self.again if channel.failures else self.first).append(channel)
        self._pump()

    def release(self) -> None:
        self.active -= 1
        self._pump()

    def _pump(self) -> None:
        while self.first and self.active < self.limit:
            self._start(self.first.popleft())
        if not self.again:
            return
        now = self.clock.seconds()
        self._tokens = min(self.limit, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        while self.again and self.active < self.limit:
            if self._tokens < 0.999:
                if self._later is None:
                    wait = max((1 - self._tokens) / self.rate, 0.001)
                    self._later = self.clock.callLater(wait, self._wake)
                return
            if self._start(self.again.popleft()):
                self._tokens -= 1

    def _start(self, channel: Channel) -> bool:
        if channel.state != "queued":
            return False  # closed (or dialled another way) meanwhile
        self.active += 1
        channel._dial()
        return True

    def _wake(self) -> None:
        self._later = None
        self._pump()

    def stop(self) -> None:
        self.first.clear()
        self.again.clear()
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None


class Channel:
    """One persistent connection to one provider, re-dialled with backoff.

    States (``state``):

    - ``idle``: no connection and none wanted yet; a call dials.
    - ``queued``: waiting for the client's dial slot (``max_concurrent_dials``).
    - ``connecting``: TCP (and TLS) connection under way.
    - ``proving``: connected, the first PING sent: a connection takes calls
      only once it has answered a frame (within connect_timeout), so a port
      that accepts and says nothing, or speaks something else, never does.
    - ``ready``: proven; calls go to ``protocol``.
    - ``failed``: the last attempt failed (refused, lost or closed before it was
      proven, no answer to keepalive pings); calls fail at once with
      UNAVAILABLE until the redial, which waits ``backoff(failures)``.
    - ``backoff``: a GOAWAY (idle) ended a connection before it had lasted
      ``stable_after``: a failed attempt. Calls wait; after
      ``backoff(failures)`` the channel redials if calls wait, else is idle.
    - ``draining``: GOAWAY (shutdown): out of rotation, calls in flight finish.
    - ``overloaded``: GOAWAY (overload): out of rotation for
      ``backoff(failures)`` (at least ``overload_pause``), then idle: the
      next call redials.
    - ``refused``: never dialled (the registry entry asks for what this client
      refuses, such as TLS off when the client requires it).
    - ``closed``.

    Calls waiting for a connection wait while queued, connecting, proving or
    in backoff. Only a connection that ends well resets the backoff: proven,
    and ended (lost, or GOAWAY for any reason) ``stable_after`` seconds or
    more after it was made. A proven connection lost sooner, or closed as
    idle sooner, counts as a failed attempt. A proven connection that is lost
    is redialled at once, but not again at once if that one is lost quickly
    too. After a GOAWAY the old connection is closed once its calls are done.
    """

    stable_after = 1.0
    """Seconds a proven connection must live for its end to reset the backoff
    (a provider's ``idle_timeout`` shorter than this counts as failures)."""
    overload_pause = 1.0
    """Seconds (+- 20 %) at least out of rotation after a GOAWAY saying overload."""

    def __init__(
        self,
        reactor: Any,
        address: ProviderAddress,
        *,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        connect_timeout: float = 5.0,
        endpoint: Any = None,
        keepalive_interval: float = 0.0,
        keepalive_timeout: float = 10.0,
        tls: ClientTLS | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        backoff: Callable[[int], float] | None = None,
        dials: _DialQueue | None = None,
        resend: Callable[[Channel, GoawayReason, list[TakenBack]], object] | None = None,
        refused: str = "",
    ) -> None:
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.max_write_buffer = max_write_buffer
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.address = address
        self.max_frame_size = max_frame_size
        self.connect_timeout = connect_timeout
        self.backoff = backoff or backoff_policy()
        self._dials = dials
        self._resend = resend or _resend_on
        if endpoint is None and not refused:
            endpoint = _endpoint(reactor, address, connect_timeout)
            if tls is not None:
                endpoint = wrap_client_endpoint(endpoint, tls, address.host)
        self.endpoint = endpoint
        self.state = "refused" if refused else "idle"
        self.last_error = refused
        self.protocol: ClientConnection | None = None
        """The proven connection calls go to, while ready."""
        self._proving: ClientConnection | None = None
        self._old: set[ClientConnection] = set()  # after GOAWAY: finishing their calls
        self._waiters: list[Deferred] = []
        self.failures = 0
        """Failed attempts in a row (what the backoff grows with)."""
        self._prompt_redial = True
        self._dial_slot = False
        self._retry: Any = None
        self._attempt: Deferred | None = None
        self._on_closed: list[Deferred] = []

    def __repr__(self) -> str:
        return f"<Channel {self.address} {self.state}>"

    @property
    def usable(self) -> bool:
        """Worth routing a call to (ready or about to be)."""
        return self.state in _USABLE

    @property
    def ready(self) -> bool:
        """Takes calls now: a proven connection, or idle (a provider closed an
        idle connection: the call that picks it redials, transparently)."""
        return self.state in _READY

    @property
    def dialling(self) -> bool:
        """A connection attempt is under way: calls routed here wait for it."""
        return self.state in _DIALLING

    @property
    def load(self) -> int:
        """Calls in flight or waiting on this channel."""
        protocol = self.protocol
        load = len(self._waiters) + (len(protocol.outstanding) if protocol is not None else 0)
        for old in self._old:
            load += len(old.outstanding)
        return load

    def connect(self) -> None:
        """Start dialling if idle or failed (then without waiting for the backoff)."""
        if self.state not in ("idle", "failed"):
            return
        self._cancel_retry()
        self.state = "queued"
        if self._dials is None:
            self._dial()
        else:
            self._dials.request(self)

    def _dial(self) -> None:
        if self.state != "queued":
            return
        self.state = "connecting"
        self._dial_slot = self._dials is not None
        self._attempt = self.endpoint.connect(_ConnectionFactory(self))
        self._attempt.addCallbacks(self._connected, self._connect_failed)

    def _release_slot(self) -> None:
        if self._dial_slot:
            self._dial_slot = False
            assert self._dials is not None
            self._dials.release()

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> Deferred:
        protocol = self.protocol
        if protocol is not None and protocol.available:
            return protocol.call(method, request, timeout, metadata)
        error = timeout_error(timeout)
        if error is not None:
            return fail(error)
        if self.state == "idle":
            self.connect()
        if self.state not in _DIALLING:
            return fail(NotSentError(message=f"provider {self.address}: {self.last_error}"))
        d = Deferred.fromCoroutine(self._call_when_ready(method, request, timeout, metadata))
        if timeout:
            d.addTimeout(timeout, self.clock, onTimeoutCancel=_deadline_exceeded)
        return d

    async def _call_when_ready(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> Message:
        started = self.clock.seconds()
        waiter: Deferred = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        try:
            protocol = await waiter
        except defer.CancelledError:
            raise CancelledError(message="cancelled by the caller") from None
        if timeout:
            timeout = max(0.001, timeout - (self.clock.seconds() - started))
        return await protocol.call(method, request, timeout, metadata)

    def resume(self, call: TakenBack, fallback: Callable[[TakenBack, RpcError], object]) -> None:
        """Send a call a GOAWAY took back on this channel: at once when ready,
        else once connected (within its deadline). If it cannot be sent here,
        ``fallback(call, error)`` is called with a NotSentError."""
        protocol = self.protocol
        if protocol is not None and protocol.available:
            error = protocol.resume(call)
            if error is not None:
                fallback(call, error)
            return
        if self.state == "idle":
            self.connect()
        if self.state not in _DIALLING:
            fallback(call, NotSentError(message=f"provider {self.address}: {self.last_error}"))
            return
        _Parked(self, call, fallback)

    def close(self) -> Deferred:
        """Stop re-dialling and close the connections (their calls fail UNAVAILABLE).

        The Deferred fires once they are closed.
        """
        self.state = "closed"
        self.last_error = "channel closed"
        self._cancel_retry()
        self._release_slot()
        if self._attempt is not None:
            self._attempt.cancel()
        self._release_waiters()
        open_ = [c for c in (self.protocol, self._proving, *self._old) if c is not None]
        if not open_:
            return succeed(None)
        closed: Deferred = Deferred()
        self._on_closed.append(closed)
        for connection in open_:
            connection.close()
        return closed

    # ----------------------------------------------------------------- internals

    def _connected(self, protocol: ClientConnection) -> None:
        self._attempt = None
        if self.state == "closed":
            protocol.close()
            return
        self.state = "proving"
        self._proving = protocol
        d = protocol.ping()
        d.addTimeout(self.connect_timeout, self.clock)
        d.addCallbacks(lambda _: self._ready(protocol), lambda f: self._unproven(protocol, f))

    def _unproven(self, protocol: ClientConnection, failure: Failure) -> None:
        if protocol is not self._proving or not protocol.connected:
            return  # lost already: _connection_lost counted it
        log.warn(
            "closing the connection to {address}: no answer to its first PING in {t:g}s",
            address=self.address,
            t=self.connect_timeout,
        )
        self.last_error = f"no answer to a PING in {self.connect_timeout:g}s"
        protocol.transport.abortConnection()

    def _ready(self, protocol: ClientConnection) -> None:
        if protocol is not self._proving or self.state != "proving":
            return
        self._proving = None
        self._release_slot()
        self.protocol = protocol
        self.state = "ready"
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        self._release_slot()
        if self.state == "closed":
            return
        self.last_error = f"cannot connect: {failure.getErrorMessage()}"
        self._failed()

    def _failed(self) -> None:
        self.state = "failed"
        self.failures += 1
        self._retry = self.clock.callLater(self.backoff(self.failures), self._redial)
        # Last: a waiter's errback may close this channel, which cancels the retry.
        self._release_waiters()

    def _redial(self) -> None:
        self._retry = None
        if self.state == "failed":
            self.connect()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(NotSentError(message=f"provider {self.address}: {self.last_error}"))

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _connection_lost(self, protocol: ClientConnection, reason: Failure) -> None:
        if protocol in self._old:
            self._old.discard(protocol)
            if self.state == "draining" and not self._old:
                self._drained()
        elif protocol is self._proving:
            self._proving = None
            self._release_slot()
            if self.state != "closed":
                if not self.last_error.startswith("no answer to a PING"):
                    self.last_error = (
                        f"connection closed before it answered a PING: {reason.getErrorMessage()}"
                    )
                self._failed()
        elif protocol is self.protocol:
            self.protocol = None
            if self.state != "closed":
                self._lost_proven(protocol, reason)
        if self.state == "closed" and self.protocol is None and self._proving is None:
            if not self._old:
                closed, self._on_closed = self._on_closed, []
                for d in closed:
                    d.callback(None)

    def _ended_well(self, protocol: ClientConnection) -> bool:
        """Whether a proven connection that ends now lasted: then the backoff
        starts afresh. (Its age counts from when it was made: a provider's
        idle timer starts no earlier.)"""
        if self.clock.seconds() - protocol.made_at < self.stable_after:
            return False
        self.failures = 0
        self._prompt_redial = True
        return True

    def _lost_proven(self, protocol: ClientConnection, reason: Failure) -> None:
        if protocol.keepalive_failed:
            # A frozen provider still accepts connections (its kernel does):
            # keep it out of rotation and retry with backoff.
            self.last_error = "no answer to keepalive pings"
            self._failed()
            return
        self.last_error = f"connection lost: {reason.getErrorMessage()}"
        self._ended_well(protocol)
        if self._prompt_redial:
            # Dial again at once (a restarted provider is back quickly), once:
            # if that connection does not last either, the backoff applies.
            self._prompt_redial = False
            self.state = "idle"
            self.connect()
        else:
            self._failed()

    def _drained(self) -> None:
        """The connection that said GOAWAY (shutdown) has closed: come back
        only after a backoff (a stopping provider refuses for a while)."""
        self.last_error = "provider shut down"
        self._failed()

    def _goaway(
        self, protocol: ClientConnection, reason: GoawayReason, calls: list[TakenBack]
    ) -> None:
        if self.state == "closed":
            for d, *_ in calls:
                d.errback(NotSentError(message=f"provider {self.address}: {self.last_error}"))
            return
        well = False
        if protocol is self._proving:
            self._proving = None
            self._release_slot()
        elif protocol is self.protocol:
            self.protocol = None
            well = self._ended_well(protocol)
        else:
            protocol = None  # already put aside
        if protocol is not None:
            self._old.add(protocol)
            if reason == GoawayReason.IDLE:
                if well:
                    self.state = "idle"  # the next call redials, as if nothing happened
                    if self._waiters:
                        self.connect()
                else:  # closed as idle as soon as made: not a healthy connection
                    self.last_error = (
                        f"provider said GOAWAY (idle) before the connection had lasted "
                        f"{self.stable_after:g}s"
                    )
                    self._pause("backoff", self.backoff(self.failures + 1))
            elif reason == GoawayReason.OVERLOAD:
                self.last_error = "provider is overloaded"
                pause = self.overload_pause * random.uniform(0.8, 1.2)
                self._pause("overloaded", max(pause, self.backoff(self.failures + 1)))
                self._release_waiters()
            else:
                self.last_error = "provider is shutting down"
                self.state = "draining"
                self._release_waiters()
        if calls:
            again = []
            for call in calls:
                d = call[0]
                if d.resends >= MAX_RESENDS:
                    d.errback(
                        NotSentError(
                            message=f"provider {self.address} said GOAWAY "
                            f"({reason.name.lower()}) before running the call, which was "
                            f"sent again after a GOAWAY already: not sent again"
                        )
                    )
                else:
                    d.resends += 1
                    again.append(call)
            if again:
                self._resend(self, reason, again)

    def _pause(self, state: str, seconds: float) -> None:
        """A failed attempt: ``state`` for ``seconds``, then idle (redialled
        at once only if calls wait)."""
        self.state = state
        self.failures += 1
        self._cancel_retry()
        self._retry = self.clock.callLater(seconds, self._pause_over, state)

    def _pause_over(self, state: str) -> None:
        self._retry = None
        if self.state == state:
            self.state = "idle"
            if self._waiters:
                self.connect()


class _Parked:
    """A call a GOAWAY took back, waiting for its channel's connection; its
    deadline and cancelling still apply."""

    __slots__ = ("channel", "call", "fallback", "waiter", "timer")

    def __init__(
        self,
        channel: Channel,
        call: TakenBack,
        fallback: Callable[[TakenBack, RpcError], object],
    ) -> None:
        self.channel = channel
        self.call = call
        self.fallback = fallback
        call[0].holder = self
        self.waiter: Deferred = Deferred()
        channel._waiters.append(self.waiter)
        self.waiter.addCallbacks(self._connected, self._not_sent)
        deadline = call[4]
        self.timer: Any = None
        if deadline:
            wait = max(0.0, deadline - channel.clock.seconds())
            self.timer = channel.clock.callLater(wait, self._expired)

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _connected(self, protocol: ClientConnection) -> None:
        self._stop_timer()
        self.call[0].holder = None
        error = protocol.resume(self.call)
        if error is not None:
            self.fallback(self.call, error)

    def _not_sent(self, failure: Failure) -> None:
        self._stop_timer()
        self.call[0].holder = None
        error = failure.value
        if not isinstance(error, RpcError):
            error = NotSentError(message=f"provider {self.channel.address}: {error}")
        self.fallback(self.call, error)

    def _cancel(self, d: _Call) -> None:
        self._end(CancelledError(message="cancelled by the caller"))

    def _expired(self) -> None:
        self.timer = None
        self._end(DeadlineExceededError(message="deadline exceeded"))

    def _end(self, error: RpcError) -> None:
        self._stop_timer()
        waiters = self.channel._waiters
        if self.waiter in waiters:
            waiters.remove(self.waiter)
        d = self.call[0]
        d.holder = None
        d.errback(error)


_USABLE = frozenset(("ready", "idle", "queued", "connecting", "proving", "backoff"))
_READY = frozenset(("ready", "idle"))
_DIALLING = frozenset(("queued", "connecting", "proving", "backoff"))


def _not_sent(call: TakenBack, error: RpcError) -> None:
    d = call[0]
    d.holder = None
    d.errback(error)


def _resend_on(channel: Channel, reason: GoawayReason, calls: list[TakenBack]) -> None:
    """Send calls a GOAWAY took back again on the same channel (a standalone
    channel's way; a Client sends them to another provider when it can)."""
    for call in calls:
        channel.resume(call, _not_sent)


def _deadline_exceeded(result: object, timeout: float) -> Failure:
    return Failure(DeadlineExceededError(message=f"deadline of {timeout:g}s exceeded"))


@dataclass(slots=True)
class ClientCall:
    """An outgoing call as client interceptors see it (fields may be changed)."""

    method: MethodInfo
    timeout: float | None
    metadata: dict[str, str] = field(default_factory=dict)
    idempotent: bool = False
    balancer: Balancer | None = None


class _ServiceRoute:
    """The channels serving one service and the client's balancer for them."""

    __slots__ = ("channels", "balancer", "known", "waiters")

    def __init__(self, balancer: Balancer) -> None:
        self.channels: tuple[Channel, ...] = ()
        self.balancer = balancer
        self.known = False  # has discovery given a list yet?
        self.waiters: list[Deferred] = []


BalancerChoice = str | type[Balancer] | None


def _make_balancer(choice: BalancerChoice) -> Balancer:
    if choice is None:
        return RoundRobin()
    if isinstance(choice, str):
        return balancer_named(choice)()
    return choice()


class Client:
    """Calls services on providers; owns the connections, shared by all proxies.

    Provider lists come from ``discovery`` (an ``IServiceDiscovery``, e.g. a
    ``ZooKeeperRegistry``), or from ``providers``
    (``{"package.Service": ["host:port", ...]}``) for the embedded static
    registry. ``balancer`` is ``round_robin`` (default), ``weighted_random`` or
    ``least_outstanding``. A call that could not be written to its provider
    goes to another one; a call lost in flight fails with UNAVAILABLE unless
    its method is idempotent, in which case it is retried once elsewhere
    within its deadline.
    """

    def __init__(
        self,
        reactor: Any = None,
        *,
        providers: Mapping[str, Iterable[str]] | None = None,
        discovery: IServiceDiscovery | None = None,
        interceptors: Sequence[IClientInterceptor] = (),
        timeout: float | None = None,
        balancer: BalancerChoice = None,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        connect_timeout: float = 5.0,
        retire_grace: float = 60.0,
        keepalive_interval: float = 0.0,
        keepalive_timeout: float = 10.0,
        tls: ClientTLS | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        max_concurrent_dials: int = DEFAULT_MAX_CONCURRENT_DIALS,
        max_dials_per_second: float = DEFAULT_MAX_DIALS_PER_SECOND,
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        error = timeout_error(timeout)
        if error is not None:
            raise error
        if isinstance(max_concurrent_dials, bool) or not isinstance(max_concurrent_dials, int):
            raise TypeError(f"max_concurrent_dials must be an int, not {max_concurrent_dials!r}")
        if max_concurrent_dials < 1:
            raise ValueError(f"max_concurrent_dials must be at least 1, not {max_concurrent_dials}")
        if not isinstance(max_dials_per_second, (int, float)) or not (
            0 < max_dials_per_second < float("inf")
        ):
            raise ValueError(f"max_dials_per_second must be positive, not {max_dials_per_second!r}")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if discovery is None:
            discovery = StaticRegistry(providers or {})
        elif providers is not None:
            raise TypeError("give providers or discovery, not both")
        self.reactor = reactor
        self.discovery = discovery
        self.interceptors = list(interceptors)
        self.timeout = timeout
        self.balancer = balancer
        _make_balancer(balancer)  # fail now on an unknown name
        self.max_frame_size = max_frame_size
        self.connect_timeout = connect_timeout
        self.retire_grace = retire_grace
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.tls = tls
        self.max_write_buffer = max_write_buffer
        self.max_concurrent_dials = max_concurrent_dials
        self.backoff = backoff or backoff_policy()
        self.max_dials_per_second = max_dials_per_second
        self._dials = _DialQueue(reactor, max_concurrent_dials, max_dials_per_second)
        self.channels: dict[str, Channel] = {}
        self._routes: dict[str, _ServiceRoute] = {}
        self._unsubscribe: list[Callable[[], object]] = []
        self._retiring: set[Channel] = set()
        self._invoke = self._send
        for interceptor in reversed(self.interceptors):
            self._invoke = _client_intercepted(interceptor, self._invoke)

    @classmethod
    def from_config(cls, path: str, reactor: Any = None, **kw: Any) -> Client:
        """A client configured by a consumer ini file (see docs/config.md)."""
        from twisted_rpc.config import load_consumer_config

        config = load_consumer_config(path)
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        kw.setdefault("timeout", config.timeout)
        kw.setdefault("balancer", config.balancer)
        kw.setdefault("keepalive_interval", config.keepalive_interval)
        kw.setdefault("keepalive_timeout", config.keepalive_timeout)
        kw.setdefault("max_write_buffer", config.max_write_buffer)
        kw.setdefault("tls", config.tls)
        kw.setdefault("max_concurrent_dials", config.max_concurrent_dials)
        kw.setdefault("max_dials_per_second", config.max_dials_per_second)
        if config.registry.kind == "zookeeper":
            from twisted_rpc.zkregistry import ZooKeeperRegistry

            reg = config.registry
            kw["discovery"] = ZooKeeperRegistry(
                reactor,
                reg.hosts,
                root=reg.root,
                session_timeout=reg.session_timeout,
                auth=reg.auth,
            )
        else:
            kw["providers"] = {
                name: [str(a) for a in addrs] for name, addrs in config.providers.items()
            }
        return cls(
            reactor,
            max_frame_size=config.max_frame_size,
            connect_timeout=config.connect_timeout,
            **kw,
        )

    def proxy(
        self,
        service: ServiceDescriptor | str | type[Service],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: BalancerChoice = None,
        idempotent: bool | Iterable[str] = False,
    ) -> ServiceProxy:
        """A proxy whose methods call ``service`` (descriptor, Service class or name).

        ``idempotent`` is True (every method) or the names of the methods that
        may be retried once on another provider after a connection loss.
        ``balancer`` overrides the client's for this proxy.
        """
        error = timeout_error(timeout)
        if error is not None:
            raise error
        info = describe(resolve_descriptor(service))
        self._route(info.name)
        if isinstance(idempotent, bool):
            retry = set(info.methods) if idempotent else set()
        else:
            retry = set(idempotent)
            unknown = retry - set(info.methods)
            if unknown:
                raise ValueError(f"{info.name} has no method {', '.join(sorted(unknown))}")
        chosen = _make_balancer(balancer) if balancer is not None else None
        return ServiceProxy(self, info.methods.values(), timeout, metadata, chosen, retry)

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotent: bool = False,
        balancer: Balancer | None = None,
    ) -> Deferred:
        """Call ``method`` on one of its providers (what proxy methods do)."""
        if type(request) is not method.request_class:
            return fail(wrong_request_type(method, request))
        if timeout is None:
            timeout = self.timeout
        if self.interceptors:
            call = ClientCall(method, timeout, dict(metadata or {}), idempotent, balancer)
            return self._invoke(call, request)
        # The hot path, kept flat: a ready connection to the provider picked.
        route = self._routes.get(method.service) or self._route(method.service)
        channel = (balancer or route.balancer).pick(route.channels)
        if channel is not None and not idempotent:
            protocol = channel.protocol
            if protocol is not None and protocol.available:
                return protocol.call(method, request, timeout, metadata)
        return self._send_to(method, request, timeout, metadata, idempotent, balancer, channel)

    def _send(self, call: ClientCall, request: Message) -> Deferred:
        return self._send_to(
            call.method, request, call.timeout, call.metadata, call.idempotent, call.balancer
        )

    def _send_to(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotent: bool,
        balancer: Balancer | None,
        channel: Channel | None = None,
    ) -> Deferred:
        """Send to ``channel`` (else the one the balancer picks), with failover."""
        error = timeout_error(timeout)
        if error is not None:
            return fail(error)
        route = self._routes.get(method.service) or self._route(method.service)
        balancer = balancer or route.balancer
        if channel is None:
            channel = balancer.pick(route.channels)
        if channel is None:
            if not route.known:
                return Deferred.fromCoroutine(
                    self._first_list(
                        route, method, request, timeout, metadata, idempotent, balancer
                    )
                )
            return fail(NotSentError(message=f"no provider of {method.service}"))
        protocol = channel.protocol
        if protocol is not None and protocol.available and not idempotent:
            return protocol.call(method, request, timeout, metadata)
        return Deferred.fromCoroutine(
            self._failover(route, balancer, channel, method, request, timeout, metadata, idempotent)
        )

    async def _first_list(
        self,
        route: _ServiceRoute,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotent: bool,
        balancer: Balancer,
    ) -> Message:
        """Wait (up to the timeout, or connect_timeout) for discovery's first list."""
        started = self.reactor.seconds()
        waiter: Deferred = Deferred(route.waiters.remove)
        route.waiters.append(waiter)
        wait = timeout or self.connect_timeout
        timer = self.reactor.callLater(wait, waiter.cancel)
        try:
            await waiter
        except defer.CancelledError:
            if timer.active():
                raise CancelledError(message="cancelled by the caller") from None
            raise NotSentError(
                message=f"no provider of {method.service}: none known after {wait:g}s"
            ) from None
        finally:
            if timer.active():
                timer.cancel()
        if timeout:
            timeout = max(0.001, timeout - (self.reactor.seconds() - started))
        return await self._send_to(method, request, timeout, metadata, idempotent, balancer)

    async def _failover(
        self,
        route: _ServiceRoute,
        balancer: Balancer,
        channel: Channel,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotent: bool,
    ) -> Message:
        started = self.reactor.seconds()
        tried: list[Channel] = []
        retried = False
        while True:
            tried.append(channel)
            remaining = None
            if timeout:
                remaining = timeout - (self.reactor.seconds() - started)
                if remaining <= 0:
                    raise DeadlineExceededError(message=f"deadline of {timeout:g}s exceeded")
            try:
                return await channel.call(method, request, remaining, metadata)
            except NotSentError as e:
                error: RpcError = e
            except UnavailableError as e:
                if not idempotent or retried:
                    raise
                retried = True
                error = e
                log.info(
                    "retrying idempotent {method} elsewhere: {error}",
                    method=method.full_name,
                    error=e.message,
                )
            next_channel = balancer.pick(route.channels, tried)
            if next_channel is None:
                raise error
            channel = next_channel

    def _route(self, service: str) -> _ServiceRoute:
        route = self._routes.get(service)
        if route is None:
            route = self._routes[service] = _ServiceRoute(_make_balancer(self.balancer))
            self._unsubscribe.append(
                self.discovery.subscribe(service, partial(self._providers_changed, route))
            )
        return route

    def _providers_changed(
        self, route: _ServiceRoute, addresses: Sequence[ProviderAddress]
    ) -> None:
        """Discovery's new list for a service. A bad entry is skipped with a
        warning: it never breaks the others, nor raises into discovery."""
        channels = []
        for address in addresses:
            try:
                channels.append(self._channel(address))
            except Exception as e:
                log.warn(
                    "skipping provider {address!r} from discovery: {error}",
                    address=address,
                    error=e,
                )
        route.channels = tuple(channels)
        route.known = True
        waiters, route.waiters = route.waiters, []
        for waiter in waiters:
            waiter.callback(None)
        used = {c for r in self._routes.values() for c in r.channels}
        for key, channel in list(self.channels.items()):
            if channel not in used:
                del self.channels[key]
                self._retire(channel, self.reactor.seconds() + self.retire_grace)

    def _channel(self, address: ProviderAddress) -> Channel:
        check_address(address)
        channel = self.channels.get(address.key)
        if channel is not None and channel.state == "refused":
            if self._refusal(address) != channel.last_error:
                channel = None  # what the registry says changed: build it again
        if channel is None:
            refused = self._refusal(address)
            if refused:
                log.error("not dialling {address}: {why}", address=address, why=refused)
            channel = Channel(
                self.reactor,
                address,
                max_frame_size=self.max_frame_size,
                connect_timeout=self.connect_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_timeout=self.keepalive_timeout,
                tls=None if refused else self._tls_for(address),
                max_write_buffer=self.max_write_buffer,
                backoff=self.backoff,
                dials=self._dials,
                resend=self._resend,
                refused=refused,
            )
            old = self.channels.get(address.key)
            self.channels[address.key] = channel
            if old is not None:
                old.close()
            channel.connect()
        else:
            channel.address = address  # the weight may have changed
        return channel

    def _refusal(self, address: ProviderAddress) -> str:
        """Why ``address`` must not be dialled, or "" if it may."""
        if address.data.get("tls") is False and self.tls is not None:
            return (
                "its registration says tls=false, and this client requires TLS: "
                "refused (never sent in cleartext)"
            )
        return ""

    def _tls_for(self, address: ProviderAddress) -> ClientTLS | None:
        """TLS settings to dial ``address`` with: the client's, or the
        platform's trust roots if its registration asks for TLS and the client
        has none (an upgrade). A registration never turns TLS off (see
        _refusal)."""
        if address.data.get("tls") and self.tls is None:
            return ClientTLS()  # the platform's trust roots
        return self.tls

    def _resend(self, channel: Channel, reason: GoawayReason, calls: list[TakenBack]) -> None:
        """Send calls a GOAWAY showed were never run again: after an idle
        close on a fresh connection to the same provider, else to another
        provider (this one is out of rotation) when there is one; if one
        cannot take it, to the next."""
        for call in calls:
            method = call[1]
            route = self._routes.get(method.service)
            if route is None:  # the client is closing
                _not_sent(call, NotSentError(message=f"no provider of {method.service}"))
                continue
            tried = [channel]
            fallback = partial(self._resend_elsewhere, route, tried)
            if reason == GoawayReason.IDLE:
                channel.resume(call, fallback)
            else:
                why = NotSentError(message=f"provider {channel.address}: {channel.last_error}")
                fallback(call, why)

    def _resend_elsewhere(
        self, route: _ServiceRoute, tried: list[Channel], call: TakenBack, error: RpcError
    ) -> None:
        """Send ``call`` to a provider not ``tried`` yet, else fail it with ``error``."""
        if not isinstance(error, NotSentError):
            _not_sent(call, error)
            return
        channel = route.balancer.pick(route.channels, tried)
        if channel is None:
            _not_sent(call, error)
            return
        tried.append(channel)
        channel.resume(call, partial(self._resend_elsewhere, route, tried))

    def _retire(self, channel: Channel, deadline: float) -> None:
        """Close a channel no service routes to, once its calls are done."""
        if channel.load and self.reactor.seconds() < deadline:
            self._retiring.add(channel)
            self.reactor.callLater(0.5, self._retire, channel, deadline)
            return
        self._retiring.discard(channel)
        channel.close().addErrback(lambda f: log.failure("closing {c}", f, c=channel))

    def close(self) -> Deferred:
        """Close every connection; calls still in flight fail with UNAVAILABLE."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._dials.stop()
        closing = [channel.close() for channel in [*self.channels.values(), *self._retiring]]
        closing.append(self.discovery.close())
        self.channels.clear()
        self._retiring.clear()
        self._routes.clear()
        return gatherResults(closing).addCallback(lambda _: None)


def _client_intercepted(
    interceptor: IClientInterceptor, proceed: Callable[[ClientCall, Message], Deferred]
) -> Callable[[ClientCall, Message], Deferred]:
    def invoke(call: ClientCall, request: Message) -> Deferred:
        return defer.maybeDeferred(interceptor.intercept, call, request, proceed)

    return invoke


class ServiceProxy:
    """Deferred-returning methods named as in the service, built from its descriptor.

    ``proxy.Login(request, timeout=None, metadata=None)`` returns a Deferred
    that fires with the response message or fails with an ``RpcError``;
    ``d.cancel()`` cancels the call (CANCELLED) and tells the provider.
    """

    def __init__(
        self,
        client: Client,
        methods: Iterable[MethodInfo],
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        balancer: Balancer | None = None,
        idempotent: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        for method in methods:
            stub = _stub(client, method, timeout, metadata, balancer, method.name in idempotent)
            setattr(self, method.name, stub)


def _stub(
    client: Client,
    method: MethodInfo,
    default_timeout: float | None,
    default_metadata: Mapping[str, str] | None,
    balancer: Balancer | None,
    idempotent: bool,
) -> Callable[..., Deferred]:
    call = client.call

    def stub(
        request: Message,
        *,
        timeout: float | None = default_timeout,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred:
        if default_metadata:
            metadata = {**default_metadata, **(metadata or {})}
        return call(method, request, timeout, metadata, idempotent, balancer)

    stub.__name__ = method.name
    stub.__qualname__ = f"{method.service}.{method.name}"
    stub.__doc__ = (
        f"Call {method.full_name}({method.request_class.DESCRIPTOR.full_name}) "
        f"-> Deferred[{method.response_class.DESCRIPTOR.full_name}]"
    )
    return stub
