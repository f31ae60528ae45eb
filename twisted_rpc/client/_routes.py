"""What the :class:`twisted_rpc.client.Client` keeps per call, per
service and per method: :class:`ClientCall` (a call as interceptors see it),
the channels serving a service with its balancer, and the encoding each
method's calls are compressed with (:class:`MethodEncodings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from twisted.internet.defer import Deferred

from twisted_rpc.client._balancer import Balancer
from twisted_rpc.core._service import MethodInfo

if TYPE_CHECKING:
    from twisted_rpc.client._options import ClientOptions
    from twisted_rpc.client._pool import Pool, Provider
    from twisted_rpc.client._service_config import ServiceConfig

_MAX_MEMO = 4096
"""Routes whose encoding a :class:`MethodEncodings` remembers at most."""


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


class MethodEncodings:
    """The encoding each method's calls and stream messages are compressed
    with: its service-config entry's ``compression`` (``identity``: none),
    else the client's ``compression``. Looked up once per route, then
    remembered; asked only for payloads that reach the threshold.

    Only the consumer's own config counts: a ``compression`` a provider
    publishes in its registry node is not used (what a consumer spends CPU
    on is its own choice)."""

    __slots__ = ("config", "default", "wanted", "_memo")

    def __init__(self, config: ServiceConfig | None, default: str | None) -> None:
        self.config = config
        self.default = default
        named = [default, *(m.compression for m in config.method_configs)] if config else [default]
        self.wanted = tuple(dict.fromkeys(n for n in named if n and n != "identity"))
        """The encodings some call may be sent with (the client's first)."""
        self._memo: dict[bytes, str | None] = {}

    @classmethod
    def of(cls, options: ClientOptions) -> MethodEncodings | None:
        """Those of a client with ``options``; None if nothing is ever
        compressed (no ``compression``, no config entry naming an encoding)."""
        config = cast("ServiceConfig | None", options.service_config)
        encodings = cls(config, options.compression)
        return encodings if encodings.wanted else None

    def __call__(self, method: MethodInfo) -> str | None:
        """``method``'s encoding (None: sent as it is)."""
        try:
            return self._memo[method.route]
        except KeyError:
            config = self.config
            found = self.default
            if config is not None:
                found = config.compression_for(method, found)
            if len(self._memo) < _MAX_MEMO:
                self._memo[method.route] = found
            return found
