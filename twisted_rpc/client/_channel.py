"""One persistent connection to one provider: :class:`Channel` dials (through
the client's dial queue), proves, redials with backoff and drains on GOAWAY."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast, overload

from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rpc.client._calls import MAX_RESENDS, NotSentError, TakenBack
from twisted_rpc.client._connection import ClientConnection
from twisted_rpc.client._dials import _WIRES, ClientReactor, ConnectionMaker, _DialQueue, _endpoint
from twisted_rpc.client._options import ClientOptions, timeout_error
from twisted_rpc.client._outliers import AccruingConnection, observers
from twisted_rpc.client._parked import _deadline_exceeded, _Parked, _resend_on
from twisted_rpc.client._states import (
    _READY,
    _USABLE,
    DIALLING,
    ChannelEvent,
    ChannelState,
    ConnectionState,
    transition,
)
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import CancelledError, RpcError
from twisted_rpc.core._tls import wrap_client_endpoint
from twisted_rpc.discovery._types import ProviderAddress

log = Logger(namespace="twisted_rpc.client")
_OPEN = ConnectionState.OPEN


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: object) -> ClientConnection:
        c = self.channel
        if c.wire is not None:
            return c.wire(c)
        p: ClientConnection
        if c.accrual is not None:  # told of failed calls only
            p = AccruingConnection(c.accrual, c.clock, c.options, c._connection_lost, c._goaway)
        else:
            p = ClientConnection(
                c.clock, c.options, on_lost=c._connection_lost, on_goaway=c._goaway
            )
        p.on_shed = c.on_shed
        return p


class Channel:
    """One persistent connection to one provider, re-dialled with backoff.

    ``state`` is a :class:`ChannelState`, changed only through the one
    transition table (:data:`TRANSITIONS`, by :class:`ChannelEvent`); the
    states and what calls do in each are documented on :class:`ChannelState`.

    Only a connection that ends well resets the backoff: proven, and ended
    (lost, or GOAWAY for any reason) ``stable_after`` seconds or more after
    it was made. A proven connection lost sooner, or closed as idle sooner,
    counts as a failed attempt. A proven connection that is lost is
    redialled at once, but not again at once if that one is lost quickly too.
    """

    stable_after = 1.0
    """Seconds a proven connection must live for its end to reset the backoff."""
    overload_pause = 1.0
    """Seconds (+-20 %) out of rotation at least after a GOAWAY for overload."""

    def __init__(
        self,
        reactor: ClientReactor,
        address: ProviderAddress,
        options: ClientOptions | None = None,
        *,
        endpoint: IStreamClientEndpoint | None = None,
        dials: _DialQueue | None = None,
        resend: Callable[[Channel, GoawayReason, list[TakenBack]], object] | None = None,
        refused: str = "",
        **settings: Any,
    ) -> None:
        """``options`` (or ClientOptions' keywords as ``settings``) give the
        connection settings and backoff. ``dials`` is the client's dial
        queue (None: dial at once); ``resend`` sends calls a GOAWAY took back
        (default: again on this channel); ``refused``: why never to dial."""
        options = options or ClientOptions()
        self.options = options = options.replace(**settings) if settings else options
        self.reactor = reactor
        # The protocol has IReactorTime's methods; zope interfaces are
        # nominal, and Deferred.addTimeout and the connections ask for one.
        self.clock = cast(IReactorTime, reactor)
        self.address = address
        self.connect_timeout = options.connect_timeout
        self.backoff = options.backoff
        self._dials = dials
        self._resend = resend or _resend_on
        self.protocol_name: str = address.data.get("protocol") or "native"  # the wire dialled
        self.wire: ConnectionMaker | None = _WIRES.get(self.protocol_name)
        if self.wire is None and self.protocol_name != "native" and not refused:
            refused = f"no {self.protocol_name} wire (import twisted_rpc.grpc)"
        if endpoint is None and not refused:
            endpoint = _endpoint(reactor, address, options.connect_timeout)
            if options.tls is not None:
                alpn = (b"h2",) if self.protocol_name == "grpc" else ()
                endpoint = wrap_client_endpoint(endpoint, options.tls, address.host, alpn)
        self.endpoint = endpoint
        self.state: ChannelState = ChannelState.REFUSED if refused else ChannelState.IDLE
        self.last_error = refused
        self.protocol: ClientConnection | None = None
        """The proven connection calls go to, while ready."""
        self.direct: ClientConnection | None = None  # protocol, if no _watch: see Client.call
        self._proving: ClientConnection | None = None
        self._old: set[ClientConnection] = set()  # after GOAWAY: finishing their calls
        self._waiters: list[Deferred[ClientConnection]] = []
        self.failures = 0
        """Failed attempts in a row (what the backoff grows with)."""
        self._prompt_redial = True
        self._dial_slot = False
        self._retry: IDelayedCall | None = None
        self._attempt: Deferred[IProtocol] | None = None
        self._on_closed: list[Deferred[None]] = []
        self.accrual, self.latency, self._watch = observers(self)  # ejection; peak-EWMA
        self.on_ready: Callable[[Channel, ClientConnection], object] | None = None
        """Told of each connection proven, before the calls waiting go (client/_pool.py)."""
        self.on_shed: Callable[[TakenBack, RpcError], object] | None = None
        """Given the calls its connections' provider sheds (ClientConnection.on_shed)."""

    def __repr__(self) -> str:
        return f"<Channel {self.address} {self.state}>"

    def _to(self, event: ChannelEvent) -> None:
        """Move to the state the transition table gives for ``event``."""
        self.state = transition(self.state, event)

    @property
    def usable(self) -> bool:
        """Worth routing a call to (ready or about to be)."""
        return self.state in _USABLE

    @property
    def ready(self) -> bool:
        """Takes calls now: proven, or idle (the call that picks it redials)."""
        return self.state in _READY

    @property
    def dialling(self) -> bool:
        """A connection attempt is under way: calls routed here wait for it."""
        return self.state in DIALLING

    @property
    def load(self) -> int:
        """Calls in flight or waiting on this channel."""
        protocol = self.protocol
        load = len(self._waiters)
        if protocol is not None:
            load += len(protocol.outstanding) + len(protocol.streams) + len(protocol.held)
        for old in self._old:
            load += len(old.outstanding) + len(old.streams)
        return load

    def connect(self) -> None:
        """Start dialling if idle or failed (then without waiting for the backoff)."""
        if self.state != ChannelState.IDLE and self.state != ChannelState.FAILED:
            return
        self._cancel_retry()
        self._to(ChannelEvent.DIAL)
        if self._dials is None:
            self._dial()
        else:
            self._dials.request(self)

    def _dial(self) -> None:
        if self.state != ChannelState.QUEUED:
            return
        self._to(ChannelEvent.SLOT)
        self._dial_slot = self._dials is not None
        assert self.endpoint is not None  # only a refused channel has none: it never dials
        self._attempt = self.endpoint.connect(_ConnectionFactory(self))
        self._attempt.addCallbacks(self._connected, self._connect_failed)

    def _release_slot(self) -> None:
        if self._dial_slot:
            self._dial_slot = False
            assert self._dials is not None
            self._dials.release()

    @overload
    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        wait: Literal[True] = True,
    ) -> Deferred[Message]: ...

    @overload
    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        wait: bool,
    ) -> Deferred[Message] | None: ...

    def call(
        self,
        method: MethodInfo,
        request: Message,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        wait: bool = True,
    ) -> Deferred[Message] | None:
        """Send a call on the ready connection. Else, with ``wait``, dial if
        idle and send it once connected (within its timeout), or fail it with
        NotSentError at once if the channel is out of rotation; without
        ``wait``, return None at once (the client's fast path: it then
        chooses with failover)."""
        protocol = self.protocol
        if protocol is not None and protocol.state is _OPEN:
            d = protocol.call(method, request, timeout, metadata)
            watch = self._watch
            if watch is not None:
                watch(d)
            return d
        if not wait:
            return None
        error = timeout_error(timeout)
        if error is not None:
            return fail(error)
        if self.state == ChannelState.IDLE:
            self.connect()
        if self.state not in DIALLING:
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
        waiter: Deferred[ClientConnection] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        try:
            protocol = await waiter
        except defer.CancelledError:
            raise CancelledError(message="cancelled by the caller") from None
        if timeout:
            timeout = max(0.001, timeout - (self.clock.seconds() - started))
        return await protocol.call(method, request, timeout, metadata)

    def when_ready(self) -> Deferred[ClientConnection]:
        """The ready connection: at once if there is one, else once dialled
        (dialling if idle); NotSentError if the channel is out of rotation."""
        protocol = self.protocol
        if protocol is not None and protocol.state is _OPEN:
            return succeed(protocol)
        if self.state == ChannelState.IDLE:
            self.connect()
        if self.state not in DIALLING:
            return fail(NotSentError(message=f"provider {self.address}: {self.last_error}"))
        waiter: Deferred[ClientConnection] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def resume(self, call: TakenBack, fallback: Callable[[TakenBack, RpcError], object]) -> None:
        """Send a call a GOAWAY took back on this channel: at once when ready,
        else once connected (within its deadline). If it cannot be sent here,
        ``fallback(call, error)`` is called with a NotSentError."""
        protocol = self.protocol
        if protocol is not None and protocol.state is _OPEN:
            error = protocol.resume(call)
            if error is not None:
                fallback(call, error)
            return
        if self.state == ChannelState.IDLE:
            self.connect()
        if self.state not in DIALLING:
            fallback(call, NotSentError(message=f"provider {self.address}: {self.last_error}"))
            return
        _Parked(self, call, fallback)

    def close(self) -> Deferred[None]:
        """Stop re-dialling, close the connections (their calls fail
        UNAVAILABLE); fires once they are closed."""
        self._to(ChannelEvent.CLOSE)
        self.last_error = "channel closed"
        self._cancel_retry()
        if self.accrual is not None:
            self.accrual.stop()
        self._release_slot()
        if self._attempt is not None:
            self._attempt.cancel()
        self._release_waiters()
        open_ = [c for c in (self.protocol, self._proving, *self._old) if c is not None]
        if not open_:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._on_closed.append(closed)
        for connection in open_:
            connection.close()
        return closed

    # ----------------------------------------------------------------- internals

    def _connected(self, protocol: ClientConnection) -> None:
        self._attempt = None
        if self.state == ChannelState.CLOSED:
            protocol.close()
            return
        self._to(ChannelEvent.CONNECTED)
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
        if protocol is not self._proving or self.state != ChannelState.PROVING:
            return
        self._proving = None
        self._release_slot()
        self.protocol = protocol
        self.direct = protocol if self._watch is None else None
        self._to(ChannelEvent.PROVEN)
        if self.on_ready is not None:
            self.on_ready(self, protocol)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        self._release_slot()
        if self.state == ChannelState.CLOSED:
            return
        self.last_error = f"cannot connect: {failure.getErrorMessage()}"
        self._failed()

    def _failed(self) -> None:
        self._to(ChannelEvent.FAIL)
        self.failures += 1
        self._retry = self.clock.callLater(self.backoff(self.failures), self._redial)
        # Last: a waiter's errback may close this channel, which cancels the retry.
        self._release_waiters()

    def _redial(self) -> None:
        self._retry = None
        if self.state == ChannelState.FAILED:
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
            if self.state == ChannelState.DRAINING and not self._old:
                self._drained()
        elif protocol is self._proving:
            self._proving = None
            self._release_slot()
            if self.state != ChannelState.CLOSED:
                if not self.last_error.startswith("no answer to a PING"):
                    self.last_error = (
                        f"connection closed before it answered a PING: {reason.getErrorMessage()}"
                    )
                self._failed()
        elif protocol is self.protocol:
            self.protocol = self.direct = None
            if self.state != ChannelState.CLOSED:
                self._lost_proven(protocol, reason)
        if self.state == ChannelState.CLOSED and self.protocol is None and self._proving is None:
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
            self._to(ChannelEvent.LOST)
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
        if self.state == ChannelState.CLOSED:
            for d, *_ in calls:
                d.errback(NotSentError(message=f"provider {self.address}: {self.last_error}"))
            return
        well = False
        kept: ClientConnection | None = protocol
        if protocol is self._proving:
            self._proving = None
            self._release_slot()
        elif protocol is self.protocol:
            self.protocol = self.direct = None
            well = self._ended_well(protocol)
        else:
            kept = None  # already put aside
        if kept is not None:
            self._old.add(kept)
            if reason == GoawayReason.IDLE:
                if well:
                    # the next call redials, as if nothing happened
                    self._to(ChannelEvent.GOAWAY_IDLE)
                    if self._waiters:
                        self.connect()
                else:  # closed as idle as soon as made: not a healthy connection
                    self.last_error = (
                        f"provider said GOAWAY (idle) before the connection had lasted "
                        f"{self.stable_after:g}s"
                    )
                    self._pause(ChannelEvent.GOAWAY_IDLE_EARLY, self.backoff(self.failures + 1))
            elif reason == GoawayReason.OVERLOAD:
                self.last_error = "provider is overloaded"
                pause = self.overload_pause * random.uniform(0.8, 1.2)
                self._pause(
                    ChannelEvent.GOAWAY_OVERLOAD, max(pause, self.backoff(self.failures + 1))
                )
                self._release_waiters()
            else:
                self.last_error = "provider is shutting down"
                self._to(ChannelEvent.GOAWAY_SHUTDOWN)
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

    def _pause(self, event: ChannelEvent, seconds: float) -> None:
        """A failed attempt: the state ``event`` leads to (backoff or
        overloaded) for ``seconds``, then idle (redialled at once only if
        calls wait)."""
        self._to(event)
        self.failures += 1
        self._cancel_retry()
        self._retry = self.clock.callLater(seconds, self._pause_over, self.state)

    def _pause_over(self, state: ChannelState) -> None:
        self._retry = None
        if self.state == state:
            self._to(ChannelEvent.PAUSE_OVER)
            if self._waiters:
                self.connect()
