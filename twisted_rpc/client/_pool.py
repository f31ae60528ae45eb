"""Several connections to one provider: :class:`Pool`, the channels a client
keeps to one address when the provider serves it with several worker
processes (``[consumer] connections_per_provider``, docs/cluster.md), and
:class:`ChannelBuilder`, the half of the client that builds channels and pools.

A balancer picks a provider; its pool then gives the call to the least
loaded of its ready connections. A pool of one connection is never seen by a
balancer: the route lists the channel itself (the hot path of one connection
per provider is unchanged). Each connection is a :class:`Channel` of its own
(backoff, GOAWAY, failure accrual and peak-EWMA per connection, as for one):
one that fails leaves the provider in rotation while another is ready.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Literal, overload

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twisted_rpc.client._balancer import EJECTED, _cost
from twisted_rpc.client._calls import TakenBack
from twisted_rpc.client._channel import Channel
from twisted_rpc.client._connection import ClientConnection
from twisted_rpc.client._options import MAX_CONNECTIONS_PER_PROVIDER, ClientOptions
from twisted_rpc.client._states import ChannelState
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import RpcError
from twisted_rpc.core._tls import ClientTLS
from twisted_rpc.discovery._types import ProviderAddress, check_address, dial_address

if TYPE_CHECKING:
    from twisted_rpc.client._dials import ClientReactor, _DialQueue
    from twisted_rpc.client._routes import _ServiceRoute

log = Logger(namespace="twisted_rpc.client")

MAX_WORKER_REDIALS = 8
"""Times a connection that landed on a worker another connection to the same
provider holds is dialled again (by a new connection: the kernel picks a
worker at random for each), before it is kept as it is."""


def reported_workers(value: object) -> int:
    """A ``workers`` count as a node's data or a connection's settings give
    it (an int, or its text); 0 when absent or not a count >= 1."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, str):
        value = int(value) if value.isdigit() else 0
    return value if isinstance(value, int) and value >= 1 else 0


class _PoolCost:
    """What the least_outstanding balancer weighs a pool by: the cost of the
    connection the call would go to (peak-EWMA latency times its calls)."""

    __slots__ = ("pool",)

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def cost(self, load: int) -> float:
        return _cost(self.pool.pick(advance=False))


class Pool:
    """The channels to one provider address (``members``, the first the
    client's channel for that address), presenting a channel's surface to
    balancers and callers when it has more than one (:attr:`face`)."""

    def __init__(
        self,
        primary: Channel,
        setting: int | str,
        make: Callable[[int], Channel],
        drop: Callable[[Channel], object],
        changed: Callable[[Pool], object],
    ) -> None:
        """``make(i)`` builds (and dials) the pool's ``i``-th channel,
        ``drop(channel)`` retires one no longer wanted, ``changed(pool)``
        is told when :attr:`face` changed."""
        self.members: list[Channel] = [primary]
        self.setting = setting
        self.reported = 0
        """Workers the provider's connection settings reported (0: none)."""
        self._make = make
        self._drop = drop
        self._changed = changed
        self._redials: dict[int, int] = {}
        """Redials in a row, by member index, for a worker of its own."""
        self._turn = 0
        self.latency = _PoolCost(self)
        if setting != 1 and primary.protocol_name == "native":
            primary.on_ready = self._member_ready
        self.resize()

    def __repr__(self) -> str:
        return f"<Pool {self.address} x{len(self.members)}>"

    @property
    def face(self) -> Channel | Pool:
        """What the route lists: the one channel, or this pool when it has more."""
        return self.members[0] if len(self.members) == 1 else self

    @property
    def address(self) -> ProviderAddress:
        return self.members[0].address

    def target(self) -> int:
        """How many connections the provider should have now."""
        primary = self.members[0]
        if primary.protocol_name != "native" or primary.state == ChannelState.REFUSED:
            return 1  # gRPC providers and refused ones: one channel
        if isinstance(self.setting, int):
            return self.setting
        workers = reported_workers(primary.address.data.get("workers")) or self.reported
        return min(workers or 1, MAX_CONNECTIONS_PER_PROVIDER)

    def resize(self) -> None:
        """Open or retire connections up to :meth:`target`."""
        before = len(self.members)
        wanted = self.target()
        while len(self.members) < wanted:
            channel = self._make(len(self.members))
            channel.on_ready = self._member_ready
            self.members.append(channel)
        while len(self.members) > wanted:
            channel = self.members.pop()
            channel.on_ready = None
            self._redials.pop(len(self.members), None)
            self._drop(channel)
        if (before == 1) != (len(self.members) == 1):
            self._changed(self)

    def _member_ready(self, channel: Channel, protocol: ClientConnection) -> None:
        """A connection of the pool is proven: learn the workers it reports,
        and dial it again if its worker is one another connection holds."""
        settings = getattr(protocol, "peer_settings", None) or {}
        if self.setting == "auto":
            reported = reported_workers(settings.get("workers"))
            if reported and reported != self.reported:
                self.reported = reported
                self.resize()
        worker = settings.get("worker")
        if worker is None or channel not in self.members:
            return
        for other in self.members:
            held = other.protocol
            if other is channel or held is None or held.peer_settings is None:
                continue
            if held.peer_settings.get("worker") == worker:
                break
        else:
            self._redials.pop(self.members.index(channel), None)  # a worker of its own
            return
        # One of the two goes: never the primary (the client's channel for the address).
        target = other if channel is self.members[0] else channel
        index = self.members.index(target)
        tries = self._redials.get(index, 0)
        if tries >= MAX_WORKER_REDIALS:
            self._redials.pop(index, None)  # kept (it still serves); checked again next time
            return
        self._redials[index] = tries + 1
        log.debug(
            "connection to {address} landed on worker {worker} another holds: dialling again",
            address=channel.address,
            worker=worker,
        )
        # A new connection in its place; it is retired (out of the pool at
        # once, closed once its calls in flight have finished: closing its
        # transport here would fail the calls picked for it meanwhile).
        target.on_ready = None
        self._drop(target)
        replacement = self._make(index)
        replacement.on_ready = self._member_ready
        self.members[index] = replacement

    # ------------------------------------------------ a channel's surface

    def pick(self, advance: bool = True) -> Channel:
        """The connection for the next call: the least loaded ready one
        (not ejected; ties taken in turn, so that calls made one at a time
        reach every worker), else one dialling, else one usable, else the
        first. ``advance=False``: only looking (the turn is left as it is)."""
        best: Channel | None = None
        members = self.members
        count = len(members)
        turn = (self._turn + 1) % count
        if advance:
            self._turn = turn
        for i in range(count):
            member = members[(turn + i) % count]
            if member.ready and not (EJECTED and member in EJECTED):
                if best is None or member.load < best.load:
                    best = member
        if best is not None:
            return best
        for member in self.members:
            if member.dialling:
                return member
        for member in self.members:
            if member.usable:
                return member
        return self.members[0]

    @property
    def usable(self) -> bool:
        return any(m.usable for m in self.members)

    @property
    def ready(self) -> bool:
        return any(m.ready and not (EJECTED and m in EJECTED) for m in self.members)

    @property
    def dialling(self) -> bool:
        return any(m.dialling for m in self.members)

    @property
    def load(self) -> int:
        return sum(m.load for m in self.members)

    @property
    def state(self) -> ChannelState:
        return self.pick(advance=False).state

    @property
    def last_error(self) -> str:
        return self.pick(advance=False).last_error

    @property
    def protocol(self) -> ClientConnection | None:
        return self.pick(advance=False).protocol

    direct: ClientConnection | None = None
    """(None: a call to a pool goes through :meth:`call`, which picks the member.)"""

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
        """:meth:`Channel.call` on the connection :meth:`pick` gives."""
        return self.pick().call(method, request, timeout, metadata, wait)

    def when_ready(self) -> Deferred[ClientConnection]:
        return self.pick().when_ready()

    def resume(self, call: TakenBack, fallback: Callable[[TakenBack, RpcError], object]) -> None:
        self.pick().resume(call, fallback)


Provider = Channel | Pool
"""What a route lists per provider: its channel, or its pool of several."""


class ChannelBuilder:
    """The half of a :class:`twisted_rpc.client.Client` that builds the
    channels (and pools) to the addresses discovery lists."""

    options: ClientOptions
    reactor: ClientReactor
    tls: ClientTLS | None
    retire_grace: float
    channels: dict[str, Channel]
    _pools: dict[str, Pool]
    _routes: dict[str, _ServiceRoute]
    _dials: _DialQueue

    def _resend(self, channel: Channel, reason: GoawayReason, calls: list[TakenBack]) -> None:
        raise NotImplementedError

    def _retire(self, channel: Channel, deadline: float) -> None:
        raise NotImplementedError

    def _resend_shed(self, channel: Channel, call: TakenBack, error: RpcError) -> None:
        raise NotImplementedError

    def _pool(self, address: ProviderAddress) -> Pool:
        """The pool of connections to ``address`` (its channel first)."""
        channel = self._channel(address)
        key = channel.address.key
        pool = self._pools.get(key)
        if pool is None or pool.members[0] is not channel:
            if pool is not None:  # the address's channel was built again
                pool.members[0].on_ready = None
                for extra in pool.members[1:]:
                    self._drop(key, extra)
            pool = Pool(
                channel,
                self.options.connections_per_provider,
                partial(self._extra, key, channel),
                lambda extra: self._drop(key, extra),
                self._face_changed,
            )
            self._pools[key] = pool
        else:
            for extra in pool.members[1:]:
                extra.address = channel.address
            pool.resize()  # its node's workers may have changed
        return pool

    def _face_of(self, channel: Channel) -> Provider:
        """What routes list for ``channel``'s provider: its pool if it is a
        member of one of several, else itself (so that a call sent again
        elsewhere is not sent to another connection to the same provider)."""
        pool = self._pools.get(channel.address.key)
        return pool.face if pool is not None and channel in pool.members else channel

    def _extra(self, key: str, primary: Channel, index: int) -> Channel:
        """The ``index``-th channel (from 1) to ``primary``'s address."""
        channel = self._new_channel(primary.address, "")
        self._install(f"{key}#{index + 1}", channel)
        return channel

    def _install(self, name: str, channel: Channel) -> None:
        """``channel`` under ``name`` (closing the one it replaces), dialling."""
        old = self.channels.get(name)
        self.channels[name] = channel
        if old is not None:
            old.close()
        channel.connect()

    def _drop(self, key: str, channel: Channel) -> None:
        for name, held in list(self.channels.items()):
            if held is channel:
                del self.channels[name]
        self._retire(channel, self.reactor.seconds() + self.retire_grace)

    def _face_changed(self, pool: Pool) -> None:
        for route in self._routes.values():
            if pool in route.pools:
                route.channels = tuple(p.face for p in route.pools)

    def _channel(self, address: ProviderAddress) -> Channel:
        check_address(address)
        address = dial_address(address, self.options.protocol)
        channel = self.channels.get(address.key)
        if channel is not None and channel.state == ChannelState.REFUSED:
            if self._refusal(address) != channel.last_error:
                channel = None  # what the registry says changed: build it again
        if channel is not None and channel.protocol_name != address.data["protocol"]:
            channel = None  # the node now says another wire: dial it that way
        if channel is None:
            refused = self._refusal(address)
            if refused:
                log.error("not dialling {address}: {why}", address=address, why=refused)
            channel = self._new_channel(address, refused)
            self._install(address.key, channel)
        else:
            channel.address = address  # the weight may have changed
        return channel

    def _new_channel(self, address: ProviderAddress, refused: str) -> Channel:
        options = self.options
        tls = None if refused else self._tls_for(address)
        if tls is not options.tls:
            options = options.replace(tls=tls)
        channel = Channel(
            self.reactor, address, options, dials=self._dials, resend=self._resend, refused=refused
        )
        channel.on_shed = partial(self._resend_shed, channel)
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

    def _used(self) -> set[Channel]:
        """Every channel some route's pools hold."""
        return {c for r in self._routes.values() for p in r.pools for c in p.members}
