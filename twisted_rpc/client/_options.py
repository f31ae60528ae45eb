"""Every client setting and its default in one place: :class:`ClientOptions`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from twisted_rpc.client._balancer import balancer_named
from twisted_rpc.client._dials import (
    DEFAULT_MAX_CONCURRENT_DIALS,
    DEFAULT_MAX_DIALS_PER_SECOND,
    backoff_policy,
)
from twisted_rpc.client._service_config import ServiceConfig
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._compress import DEFAULT_COMPRESS_THRESHOLD, check_encoding
from twisted_rpc.core._flow import DEFAULT_STREAM_WINDOW, check_window
from twisted_rpc.core._propagation import DEFAULT_DEADLINE_MARGIN
from twisted_rpc.core._tls import ClientTLS
from twisted_rpc.discovery._types import PROTOCOLS

if TYPE_CHECKING:
    from twisted_rpc.client._balancer import Balancer

__all__ = ["DEFAULT_MAX_WRITE_BUFFER", "MAX_TIMEOUT", "ClientOptions", "timeout_error"]


DEFAULT_MAX_WRITE_BUFFER = 256 * 1024 * 1024
"""Bytes of calls a connection holds unsent before new calls fail RESOURCE_EXHAUSTED."""

DEFAULT_MAX_QUEUED_CALLS = 10000
"""Calls a connection holds back at its provider's limit of calls in flight."""


MAX_TIMEOUT = 0xFFFFFFFF / 1000
"""The longest call timeout in seconds: the wire carries it as u32 milliseconds."""


def timeout_error(timeout: object) -> ValueError | None:
    """Why ``timeout`` is not a call timeout (None, or 0 to MAX_TIMEOUT seconds), or None."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        return ValueError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not 0 <= timeout <= MAX_TIMEOUT:  # also false for nan
        return ValueError(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds, not {timeout!r}")
    return None


_DEFAULT_BACKOFF = backoff_policy()


def _number(name: str, value: object, kind: type, minimum: float, above: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        what = "a number" if kind is float else "an int"
        raise TypeError(f"{name} must be {what}, not {value!r}")
    if not math.isfinite(value) or value < minimum or (above and value == minimum):
        bound = f"more than {minimum:g}" if above else f"at least {minimum:g}"
        raise ValueError(f"{name} must be finite and {bound}, not {value!r}")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Every setting of a :class:`twisted_rpc.client.Client` (and of its
    channels and connections), with its default; checked when built (a
    wrong type: TypeError, a value out of range: ValueError).

    ``Client(reactor, options)`` takes one; ``Client(reactor, timeout=2,
    ...)`` builds one from keywords; a consumer ini file's ``[consumer]``
    and ``[tls]`` sections build one (``docs/config.md``). Change one with
    :meth:`replace`.
    """

    timeout: float | None = None
    """Default call timeout in seconds (None: none), up to MAX_TIMEOUT."""
    balancer: str | type[Balancer] | None = None
    """``round_robin`` (None), ``weighted_random``, ``least_outstanding`` or a Balancer class."""
    max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE
    """Largest frame read from a provider (at least 64 bytes)."""
    connect_timeout: float = 5.0
    """Seconds to connect, and for a new connection to answer its first PING."""
    retire_grace: float = 60.0
    """Seconds a provider discovery no longer lists keeps its connection for calls in flight."""
    keepalive_interval: float = 10.0
    """Seconds between keepalive PINGs on a connection while calls are in
    flight on it (0: none), so a provider cut off is noticed."""
    keepalive_timeout: float = 20.0
    """Seconds a keepalive PING has to be answered before the connection is aborted."""
    keepalive_without_calls: bool = False
    """PING idle connections too (gRPC's keepalive_permit_without_calls); by
    default an idle connection is left idle, so a provider's idle_timeout holds."""
    tls: ClientTLS | None = None
    """Dial providers over TLS with these settings (None: cleartext unless a
    registration asks for TLS)."""
    max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER
    """Bytes of calls a connection holds unsent before new calls fail RESOURCE_EXHAUSTED."""
    max_concurrent_dials: int = DEFAULT_MAX_CONCURRENT_DIALS
    """Connection attempts (connect and first PING) in progress at once (at least 1)."""
    max_dials_per_second: float = DEFAULT_MAX_DIALS_PER_SECOND
    """Redials started per second at most, past a burst of max_concurrent_dials."""
    backoff: Callable[[int], float] = _DEFAULT_BACKOFF
    """Failed attempts in a row -> seconds before the next (the signature of
    Twisted's ``backoffPolicy``); default :func:`backoff_policy`: 0.1 s
    doubling up to 5 s, +- 20 %."""
    stream_window: int = DEFAULT_STREAM_WINDOW
    """Bytes of replies each stream may receive ahead of the application
    taking them (its receive window, told to providers in the settings)."""
    protocol: str = "native"
    """The wire to dial providers with when their address does not say:
    ``native`` or ``grpc`` (any gRPC server; see docs/grpc.md). A registry
    node saying ``"protocol"`` is dialled its way whatever this says."""
    snapshot: str = ""
    """A file where a consumer following ZooKeeper keeps its provider lists
    ("": none); started while ZooKeeper is unreachable, it calls the file's
    providers that answer a Health check (docs/registry.md). Used by
    ``Client.from_config``; in code, give ``ZooKeeperRegistry(snapshot=...)``."""
    service_config: ServiceConfig | Mapping[str, Any] | str | None = None
    """A service config in gRPC's JSON shape (a dict or JSON text), checked
    and made a :class:`ServiceConfig` when the options are built: its
    methods' ``timeout`` applies when a call gives none (over ``timeout``);
    see docs/resilience.md."""
    compression: str | None = None
    """Compress requests and stream messages with this encoding (``zlib``,
    or ``zstd`` with the zstandard package) for providers that read it; they
    then answer compressed too. None: only methods whose service-config
    entry names an encoding are compressed (answers are always read)."""
    compression_threshold: int = DEFAULT_COMPRESS_THRESHOLD
    """Smallest payload compressed, in bytes (when anything is)."""

    propagate_metadata: tuple[str, ...] = ()
    """Prefixes of metadata keys (``("x-trace-",)``) carried from the call a
    handler serves to the calls it makes (see docs/resilience.md)."""
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN
    """Seconds a call made from a handler keeps back from the inherited deadline."""
    consecutive_failures: int = 5
    """Calls to one provider in a row failing UNAVAILABLE, INTERNAL or
    DEADLINE_EXCEEDED that eject it from rotation (0: never eject);
    docs/resilience.md."""
    base_ejection_time: float = 30.0
    """Seconds a provider is first ejected for, doubled at each ejection in a
    row (+- 10 %); it returns only once it answers a Health check."""
    max_ejection_time: float = 300.0
    """The longest ejection, in seconds (at least base_ejection_time)."""
    max_ejection_percent: int = 50
    """Most providers of a service out at once, in percent (rounded down:
    a service's only provider is never ejected at 50 %)."""
    success_rate_min_calls: int = 100
    """Calls a provider must finish in a window for its success rate to be
    compared with its peers' (0: no success-rate ejection); docs/resilience.md."""
    success_rate_min_providers: int = 3
    """Providers with that many calls needed to compare them (at least 2)."""
    success_rate_ratio: float = 0.85
    """A provider whose success rate is under this times the mean of the
    others' is ejected (0 to 1)."""
    success_rate_window: float = 10.0
    """Seconds at least between two comparisons (each over the calls since the last)."""
    latency_decay: float = 10.0
    """Time constant in seconds of the peak-EWMA latency the
    ``least_outstanding`` balancer weighs providers by."""
    retry_budget_ratio: float = 0.2
    """Retries at most this share of the retryable calls started over the
    last ``retry_budget_window`` seconds (when the service config has no
    ``retryThrottling``); docs/resilience.md."""
    retry_budget_min_per_second: float = 1.0
    """Retries allowed per second of the window whatever the share (so a
    trickle of calls can still be retried)."""
    retry_budget_window: float = 10.0
    """Seconds the retry budget looks back over (at least 1; whole seconds)."""
    connections_per_provider: int | str = "auto"
    """Connections to each provider (1 to MAX_CONNECTIONS_PER_PROVIDER), or
    ``auto``: as many as it reports workers (its registry node's
    ``workers``, else its connection's settings), 1 if it reports none;
    docs/cluster.md. gRPC providers get one."""
    max_queued_calls: int = DEFAULT_MAX_QUEUED_CALLS
    """Calls each connection holds back while the provider's announced
    ``max_calls_per_connection`` are in flight (sent as calls finish, within
    their deadlines); one more fails RESOURCE_EXHAUSTED. 0: none held back."""
    tracing: bool = False
    """OpenTelemetry spans for every call and stream, their context sent in
    the metadata (needs ``twisted_rpc[otel]``; docs/tracing.md)."""

    awaitables: str = "twisted"
    """What proxies hand out: ``twisted`` (Deferreds and the Twisted
    streams) or ``asyncio`` (asyncio Futures and asyncio stream adapters,
    for asyncio tasks under Twisted's asyncio reactor; docs/asyncio.md)."""

    def __post_init__(self) -> None:
        error = timeout_error(self.timeout)
        if error is not None:
            raise error
        if self.balancer is not None and not isinstance(self.balancer, type):
            if not isinstance(self.balancer, str):
                raise TypeError(f"balancer must be a name or a Balancer class: {self.balancer!r}")
            balancer_named(self.balancer)  # ValueError on an unknown name
        _number("max_frame_size", self.max_frame_size, int, 64)
        _number("connect_timeout", self.connect_timeout, float, 0, above=True)
        _number("retire_grace", self.retire_grace, float, 0)
        _number("keepalive_interval", self.keepalive_interval, float, 0)
        _number("keepalive_timeout", self.keepalive_timeout, float, 0, above=True)
        if type(self.keepalive_without_calls) is not bool:
            raise TypeError(
                "keepalive_without_calls must be True or False, "
                f"not {self.keepalive_without_calls!r}"
            )
        if self.tls is not None and not isinstance(self.tls, ClientTLS):
            raise TypeError(f"tls must be a ClientTLS or None, not {self.tls!r}")
        _number("max_write_buffer", self.max_write_buffer, int, 0)
        _number("max_concurrent_dials", self.max_concurrent_dials, int, 1)
        _number("max_dials_per_second", self.max_dials_per_second, float, 0, above=True)
        check_window(self.stream_window)
        _number("consecutive_failures", self.consecutive_failures, int, 0)
        _number("base_ejection_time", self.base_ejection_time, float, 0, above=True)
        _number("max_ejection_time", self.max_ejection_time, float, self.base_ejection_time)
        _number("max_ejection_percent", self.max_ejection_percent, int, 0)
        if self.max_ejection_percent > 100:
            raise ValueError(
                f"max_ejection_percent must be 0 to 100, not {self.max_ejection_percent}"
            )
        _number("success_rate_min_calls", self.success_rate_min_calls, int, 0)
        _number("success_rate_min_providers", self.success_rate_min_providers, int, 2)
        _number("success_rate_ratio", self.success_rate_ratio, float, 0, above=True)
        if self.success_rate_ratio > 1:
            raise ValueError(f"success_rate_ratio must be at most 1, not {self.success_rate_ratio}")
        _number("success_rate_window", self.success_rate_window, float, 0, above=True)
        _number("latency_decay", self.latency_decay, float, 0, above=True)
        _number("retry_budget_ratio", self.retry_budget_ratio, float, 0)
        _number("retry_budget_min_per_second", self.retry_budget_min_per_second, float, 0)
        _number("retry_budget_window", self.retry_budget_window, float, 1)
        check_connections(self.connections_per_provider)
        _number("max_queued_calls", self.max_queued_calls, int, 0)
        if type(self.tracing) is not bool:
            raise TypeError(f"tracing must be True or False, not {self.tracing!r}")

        if self.awaitables not in AWAITABLES:
            raise ValueError(
                f"awaitables must be one of {', '.join(AWAITABLES)}, not {self.awaitables!r}"
            )
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}"
            )
        if not isinstance(self.snapshot, str):
            raise TypeError(f"snapshot must be a file path, not {self.snapshot!r}")
        if self.service_config is not None:
            parsed = ServiceConfig.parse(self.service_config)  # ServiceConfigError (ValueError)
            object.__setattr__(self, "service_config", parsed)
        check_encoding(self.compression)
        _number("compression_threshold", self.compression_threshold, int, 0)
        if isinstance(self.propagate_metadata, str) or not all(
            isinstance(p, str) and p for p in self.propagate_metadata
        ):
            prefixes = self.propagate_metadata
            raise TypeError(f"propagate_metadata must be a tuple of key prefixes, not {prefixes!r}")
        object.__setattr__(self, "propagate_metadata", tuple(self.propagate_metadata))
        _number("deadline_margin", self.deadline_margin, float, 0)
        if self.backoff is None:  # what Client(backoff=None) always meant
            object.__setattr__(self, "backoff", _DEFAULT_BACKOFF)
        if not callable(self.backoff):
            raise TypeError(f"backoff must be callable (failures -> seconds): {self.backoff!r}")

    def replace(self, **changes: Any) -> ClientOptions:
        """A copy with ``changes`` (checked the same way)."""
        unknown = set(changes) - _NAMES
        if unknown:
            raise TypeError(f"unknown client option(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)


AWAITABLES = ("twisted", "asyncio")
"""The values of ``awaitables``."""


MAX_CONNECTIONS_PER_PROVIDER = 64
"""The most connections a client keeps to one provider (its workers beyond are shared)."""


def check_connections(value: object) -> None:
    """Check a ``connections_per_provider`` value: ``auto`` or 1 to 64."""
    if value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"connections_per_provider must be 'auto' or a number, not {value!r}")
    if not 1 <= value <= MAX_CONNECTIONS_PER_PROVIDER:
        raise ValueError(
            f"connections_per_provider must be 'auto' or 1 to "
            f"{MAX_CONNECTIONS_PER_PROVIDER}, not {value}"
        )


_NAMES = frozenset(f.name for f in fields(ClientOptions))
