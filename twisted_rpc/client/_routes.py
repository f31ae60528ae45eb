"""What the :class:`~twisted_rpc.client.Client` keeps per call and per
service: :class:`ClientCall` (a call as interceptors see it) and the channels
serving a service with its balancer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from twisted_rpc.client._balancer import Balancer
from twisted_rpc.core._service import MethodInfo

if TYPE_CHECKING:
    from twisted_rpc.client._pool import Pool, Provider


@dataclass(slots=True)
class ClientCall:
    """An outgoing call as client interceptors see it (fields may be changed)."""

    method: MethodInfo
    timeout: float | None
    metadata: dict[str, str] = field(default_factory=dict)
    idempotent: bool = False
    balancer: Balancer | None = None


CLIENT_CLOSED = "client closed"
"""The UNAVAILABLE message of a call through a closed client."""


class _ServiceRoute:
    """The channels serving one service and the client's balancer for them."""

    __slots__ = ("channels", "pools", "balancer", "known", "waiters", "closed")

    def __init__(self, balancer: Balancer) -> None:
        self.channels: tuple[Provider, ...] = ()
        """What the balancer picks from: each provider's channel, or its pool."""
        self.pools: tuple[Pool, ...] = ()
        self.balancer = balancer
        self.known = False  # has discovery given a list yet?
        self.waiters: list[Deferred[None]] = []
        self.closed = False  # the client is closed: no channel, ever again

    def close(self) -> None:
        """No channels from now on; callers waiting for a first list go on
        (to fail with :data:`CLIENT_CLOSED`)."""
        self.channels, self.pools = (), ()
        self.known = self.closed = True
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def none_left(self, service: str) -> str:
        """Why no provider can take a call of ``service``."""
        return CLIENT_CLOSED if self.closed else f"no provider of {service}"
