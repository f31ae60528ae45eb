"""When a client dials: the backoff policy and the queue of connection
attempts shared by a client's channels.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory

from twisted_rpc.client._states import ChannelState

if TYPE_CHECKING:
    from twisted_rpc.client._channel import Channel
    from twisted_rpc.client._connection import ClientConnection
    from twisted_rpc.discovery._types import ProviderAddress


ConnectionMaker = Callable[["Channel"], "ClientConnection"]
"""Builds a connection of another wire for a channel (see :func:`register_wire`)."""

_WIRES: dict[str, ConnectionMaker] = {}


def register_wire(protocol: str, maker: ConnectionMaker) -> None:
    """Dial addresses whose ``data["protocol"]`` is ``protocol`` with the
    connections ``maker(channel)`` builds: they present
    :class:`ClientConnection`'s surface (``twisted_rpc.grpc`` registers
    ``grpc``). Native connections need no registration."""
    _WIRES[protocol] = maker


class _Clock(Protocol):
    """IReactorTime's ``seconds`` and ``callLater`` (what the dial queue uses)."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...


class ClientReactor(_Clock, Protocol):
    """What a client uses of a reactor: its clock (IReactorTime) and TCP
    (IReactorTCP's ``connectTCP``). Structural, so that any reactor (the
    global one, a ``MemoryReactorClock``, a value typed by an interface that
    extends both) is accepted as it is."""

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory[Any],
        timeout: float = 30.0,
        bindAddress: tuple[str, int] | None = None,
    ) -> IConnector: ...


DEFAULT_MAX_CONCURRENT_DIALS = 32
"""Connection attempts (connect and first PING) a client has in progress at once."""


DEFAULT_MAX_DIALS_PER_SECOND = 500.0
"""Redials (after a failed attempt) a client starts per second at most, past a burst."""


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

    def __init__(self, clock: _Clock, limit: int, rate: float) -> None:
        self.clock = clock
        self.limit = limit
        self.rate = rate
        self.active = 0
        self.first: deque[Channel] = deque()
        self.again: deque[Channel] = deque()
        self._tokens = float(limit)
        self._refilled = clock.seconds()
        self._later: IDelayedCall | None = None

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
        if channel.state != ChannelState.QUEUED:
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


def _endpoint(
    reactor: ClientReactor, address: ProviderAddress, connect_timeout: float
) -> IStreamClientEndpoint:
    """A TCP endpoint for ``address``: IPv6 for a v6 literal, else IPv4 (a
    HostnameEndpoint would try both, and costs ~300 ms on a refused port)."""
    if isIPv6Address(address.host):
        return TCP6ClientEndpoint(reactor, address.host, address.port, connect_timeout)
    return TCP4ClientEndpoint(reactor, address.host, address.port, connect_timeout)
