"""A service config in gRPC's own JSON shape (``methodConfig``,
``retryThrottling``), parsed and checked up front into frozen dataclasses:
:class:`ServiceConfig` (see ``docs/resilience.md``).

Every problem is a :class:`ServiceConfigError` (a ValueError) whose message
is one line naming the JSON path of the first bad value::

    service_config: methodConfig[0].retryPolicy.maxAttempts: expected an integer >= 2, got 1
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from twisted.logger import Logger

from twisted_rpc.core._compress import ENCODING_IDS, check_encoding
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import StatusCode
from twisted_rpc.discovery._layout import PUBLISHED_KEY
from twisted_rpc.discovery._types import ProviderAddress

__all__ = [
    "HedgingPolicy",
    "MethodConfig",
    "MethodName",
    "RetryPolicy",
    "RetryThrottling",
    "ServiceConfig",
    "ServiceConfigError",
]


MAX_ATTEMPTS = 5
"""gRPC's cap: a retry or hedging policy asking for more attempts gets this many."""
MAX_TOKENS = 1000
"""The largest ``retryThrottling.maxTokens`` (gRPC refuses more too)."""
MAX_TEXT = 1024 * 1024
"""Characters of JSON text read at most (a service config is small)."""
_MAX_SECONDS = 0xFFFFFFFF / 1000  # the longest call timeout the wire carries (MAX_TIMEOUT)
_DURATION = re.compile(r"([0-9]{1,12})(?:\.([0-9]{1,9}))?s\Z")
_MAX_MEMO = 10_000  # methods whose timeout is remembered
_IGNORED = frozenset({"loadBalancingConfig", "loadBalancingPolicy", "healthCheckConfig"})
"""Top-level gRPC keys accepted (so a gRPC config loads) but not applied."""

# The bounds a config providers publish is clamped to (published_entries):
MIN_PUBLISHED_TIMEOUT = 0.05  # seconds of timeout at least
MIN_PUBLISHED_BACKOFF = 0.05  # initialBackoff and hedgingDelay from this...
MAX_PUBLISHED_BACKOFF = 30.0  # ... to this, as maxBackoff
MAX_PUBLISHED_MULTIPLIER = 10.0  # backoffMultiplier from 1 to this
_MAX_PUBLISHED_TEXTS = 64  # distinct published configs remembered (parsed or refused)

log = Logger(namespace="twisted_rpc.client")


class ServiceConfigError(ValueError):
    """A service config that is not valid JSON or not a valid config."""


@dataclass(frozen=True, slots=True)
class MethodName:
    """One ``name`` entry: a method (``method`` set), a whole service
    (``method`` empty) or, both empty, the default for every call."""

    service: str = ""
    method: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``retryPolicy`` (durations in seconds; codes as :class:`StatusCode`)."""

    max_attempts: int
    initial_backoff: float
    max_backoff: float
    backoff_multiplier: float
    retryable_status_codes: frozenset[StatusCode]


@dataclass(frozen=True, slots=True)
class HedgingPolicy:
    """``hedgingPolicy`` (``hedging_delay`` in seconds)."""

    max_attempts: int
    hedging_delay: float = 0.0
    non_fatal_status_codes: frozenset[StatusCode] = frozenset()


@dataclass(frozen=True, slots=True)
class RetryThrottling:
    """``retryThrottling``: gRPC's retry token bucket."""

    max_tokens: int
    token_ratio: float


@dataclass(frozen=True, slots=True)
class MethodConfig:
    """One ``methodConfig`` entry; a field None is one the entry leaves unset."""

    names: tuple[MethodName, ...]
    timeout: float | None = None
    wait_for_ready: bool | None = None
    retry_policy: RetryPolicy | None = None
    hedging_policy: HedgingPolicy | None = None
    compression: str | None = None
    """Our extension (gRPC's service config has no such key): ``"zlib"``,
    ``"zstd"`` or ``"identity"`` (none) for this entry's calls, over the
    client's ``compression`` option."""


@dataclass(frozen=True)
class ServiceConfig:
    """A checked service config. Build one with :meth:`parse` (a dict, or
    JSON text); ``Client(..., service_config=...)`` and the consumer ini's
    ``[consumer] service_config`` take either and parse them."""

    method_configs: tuple[MethodConfig, ...] = ()
    retry_throttling: RetryThrottling | None = None
    _index: dict[tuple[str, str], MethodConfig] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _timeouts: dict[bytes, float | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _published: dict[tuple[str, str], MethodConfig] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for config in self.method_configs:
            for name in config.names:
                self._index.setdefault((name.service, name.method), config)

    @classmethod
    def parse(cls, value: ServiceConfig | Mapping[str, Any] | str | bytes) -> ServiceConfig:
        """Check ``value`` (a parsed JSON object, or its text) and build one;
        a ServiceConfig is returned as it is."""
        if isinstance(value, ServiceConfig):
            return value
        if isinstance(value, (str, bytes)):
            if len(value) > MAX_TEXT:
                raise ServiceConfigError(f"service_config: longer than {MAX_TEXT} characters")
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ServiceConfigError(f"service_config: not JSON: {e}") from None
        top = _object(value, "")
        _keys(top, "", {"methodConfig", "retryThrottling"} | _IGNORED)
        configs = tuple(
            _method_config(entry, f"methodConfig[{i}]")
            for i, entry in enumerate(_list(top.get("methodConfig", []), "methodConfig"))
        )
        seen: dict[MethodName, int] = {}
        for i, config in enumerate(configs):
            for j, name in enumerate(config.names):
                if name in seen:
                    _bad(
                        f"methodConfig[{i}].name[{j}]",
                        f"the same name as methodConfig[{seen[name]}]",
                        {"service": name.service, "method": name.method},
                    )
                seen[name] = i
        throttling = None
        if "retryThrottling" in top:
            throttling = _throttling(top["retryThrottling"], "retryThrottling")
        return cls(configs, throttling)

    def policy_for(self, service: str, method: str) -> MethodConfig | None:
        """The entry for ``service``/``method`` as gRPC picks it: the one
        naming the method, else the one naming its service, else the
        default (an empty name), else None. Entries its providers published
        (:meth:`publish`) come after this config's own for the method and
        its service, and before its default."""
        index = self._index
        found = index.get((service, method)) or index.get((service, ""))
        if found is None and self._published:
            published = self._published
            found = published.get((service, method)) or published.get((service, ""))
        return found or index.get(("", ""))

    def publish(self, service: str, entries: Sequence[MethodConfig]) -> bool:
        """Make ``entries`` (from :func:`published_entries`) the published
        defaults of ``service``, replacing the ones it had; whether that
        changed anything (the memoized timeouts are then forgotten)."""
        published = self._published
        old = {k: v for k, v in published.items() if k[0] == service}
        new = {(n.service, n.method): e for e in entries for n in e.names if n.service == service}
        if old == new:
            return False
        for key in old:
            del published[key]
        published.update(new)
        self._timeouts.clear()
        return True

    def timeout_for(self, method: MethodInfo, default: float | None) -> float | None:
        """``method``'s config ``timeout``, else ``default`` (memoized by
        route: this is on the call path)."""
        try:
            timeout = self._timeouts[method.route]
        except KeyError:
            config = self.policy_for(method.service, method.name)
            timeout = None if config is None else config.timeout
            if len(self._timeouts) < _MAX_MEMO:
                self._timeouts[method.route] = timeout
        return default if timeout is None else timeout

    def compression_for(self, method: MethodInfo, default: str | None) -> str | None:
        """The encoding ``method``'s entry names (None for ``identity``),
        else ``default`` (the client's ``compression``)."""
        config = self.policy_for(method.service, method.name)
        chosen = default if config is None or config.compression is None else config.compression
        return None if chosen == "identity" else chosen


def parse_duration(text: object, where: str = "duration") -> float:
    """Seconds in a duration as gRPC writes it in JSON (``"0.1s"``, ``"2s"``,
    up to 9 fractional digits); anything else is refused."""
    if not isinstance(text, str) or _DURATION.match(text) is None:
        _bad(where, 'a duration like "0.5s" (seconds, up to 9 decimals)', text)
    return float(text[:-1])


def _bad(where: str, expected: str, got: object) -> NoReturn:
    shown = json.dumps(got) if isinstance(got, (str, int, float, bool, type(None))) else repr(got)
    if isinstance(got, (Mapping, list, tuple)):
        shown = "an object" if isinstance(got, Mapping) else "a list"
    if len(shown) > 60:  # one short line, whatever the input
        shown = shown[:57] + "..."
    at = f" {where}:" if where else ""
    raise ServiceConfigError(f"service_config:{at} expected {expected}, got {shown}")


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _bad(where, "an object", value)
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        _bad(where, "a list", value)
    return list(value)


def _keys(obj: Mapping[str, Any], where: str, known: set[str] | frozenset[str]) -> None:
    for key in obj:
        if key not in known:
            at = f"{where}." if where else ""
            raise ServiceConfigError(
                f"service_config: {at}{key}: unknown key (known: {', '.join(sorted(known))})"
            )


def _int(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _bad(where, f"an integer >= {minimum}", value)
    return value


def _positive(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _bad(where, "a number > 0", value)
    if not (math.isfinite(value) and value > 0):
        _bad(where, "a number > 0", value)
    return float(value)


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        _bad(where, "a string", value)
    return value


def _duration(value: object, where: str, zero: bool = False) -> float:
    seconds = parse_duration(value, where)
    if seconds > _MAX_SECONDS or (seconds == 0 and not zero):
        bound = "0s" if zero else "more than 0s"
        _bad(where, f"a duration from {bound} to {_MAX_SECONDS:g}s", value)
    return seconds


def _codes(value: object, where: str, required: bool) -> frozenset[StatusCode]:
    items = _list(value, where)
    if required and not items:
        _bad(where, "a non-empty list of status codes", value)
    codes: set[StatusCode] = set()
    for i, item in enumerate(items):
        code = None
        if isinstance(item, str):
            code = StatusCode.__members__.get(item.upper())
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= 16:
            code = StatusCode(item)
        if code is None or code == StatusCode.OK:
            _bad(f"{where}[{i}]", 'a status code other than OK ("UNAVAILABLE" or 14)', item)
        codes.add(code)
    return frozenset(codes)


def _name(value: object, where: str) -> MethodName:
    obj = _object(value, where)
    _keys(obj, where, {"service", "method"})
    service = _string(obj.get("service", ""), f"{where}.service")
    method = _string(obj.get("method", ""), f"{where}.method")
    if method and not service:
        _bad(f"{where}.service", "a service when a method is named", service)
    return MethodName(service, method)


_METHOD_KEYS = {
    "name",
    "timeout",
    "waitForReady",
    "retryPolicy",
    "hedgingPolicy",
    "maxRequestMessageBytes",
    "maxResponseMessageBytes",
    "compression",
}


def _method_config(value: object, where: str) -> MethodConfig:
    obj = _object(value, where)
    _keys(obj, where, _METHOD_KEYS)
    names = _list(obj.get("name"), f"{where}.name")
    if not names:
        _bad(f"{where}.name", "a non-empty list of names", names)
    timeout = None
    if "timeout" in obj:
        timeout = _duration(obj["timeout"], f"{where}.timeout")
    ready = obj.get("waitForReady")
    if ready is not None and not isinstance(ready, bool):
        _bad(f"{where}.waitForReady", "true or false", ready)
    for key in ("maxRequestMessageBytes", "maxResponseMessageBytes"):
        if key in obj:  # accepted, as gRPC has them; not applied (frames have their limits)
            _int(obj[key], f"{where}.{key}", 0)
    if "retryPolicy" in obj and "hedgingPolicy" in obj:
        raise ServiceConfigError(
            f"service_config: {where}: retryPolicy and hedgingPolicy are exclusive (give one)"
        )
    retry = hedging = None
    if "retryPolicy" in obj:
        retry = _retry(obj["retryPolicy"], f"{where}.retryPolicy")
    if "hedgingPolicy" in obj:
        hedging = _hedging(obj["hedgingPolicy"], f"{where}.hedgingPolicy")
    compression = None
    if "compression" in obj:
        compression = _compression(obj["compression"], f"{where}.compression")
    return MethodConfig(
        tuple(_name(n, f"{where}.name[{i}]") for i, n in enumerate(names)),
        timeout,
        ready,
        retry,
        hedging,
        compression,
    )


def _compression(value: object, where: str) -> str:
    """An encoding this process has, or ``identity`` (none)."""
    if value == "identity":
        return "identity"
    if not isinstance(value, str) or value not in ENCODING_IDS:
        choices = ", ".join(f'"{name}"' for name in (*ENCODING_IDS, "identity"))
        _bad(where, f"one of {choices}", value)
    try:
        check_encoding(value)
    except ValueError as e:
        raise ServiceConfigError(f"service_config: {where}: {e}") from None
    return value


_RETRY_KEYS = {
    "maxAttempts",
    "initialBackoff",
    "maxBackoff",
    "backoffMultiplier",
    "retryableStatusCodes",
}


def _retry(value: object, where: str) -> RetryPolicy:
    obj = _object(value, where)
    _keys(obj, where, _RETRY_KEYS)
    for key in sorted(_RETRY_KEYS):  # every field is required, as in gRPC
        if key not in obj:
            raise ServiceConfigError(f"service_config: {where}.{key}: required")
    return RetryPolicy(
        min(_int(obj["maxAttempts"], f"{where}.maxAttempts", 2), MAX_ATTEMPTS),
        _duration(obj["initialBackoff"], f"{where}.initialBackoff"),
        _duration(obj["maxBackoff"], f"{where}.maxBackoff"),
        _positive(obj["backoffMultiplier"], f"{where}.backoffMultiplier"),
        _codes(obj["retryableStatusCodes"], f"{where}.retryableStatusCodes", True),
    )


def _hedging(value: object, where: str) -> HedgingPolicy:
    obj = _object(value, where)
    _keys(obj, where, {"maxAttempts", "hedgingDelay", "nonFatalStatusCodes"})
    if "maxAttempts" not in obj:
        raise ServiceConfigError(f"service_config: {where}.maxAttempts: required")
    return HedgingPolicy(
        min(_int(obj["maxAttempts"], f"{where}.maxAttempts", 2), MAX_ATTEMPTS),
        _duration(obj.get("hedgingDelay", "0s"), f"{where}.hedgingDelay", zero=True),
        _codes(obj.get("nonFatalStatusCodes", []), f"{where}.nonFatalStatusCodes", False),
    )


def _throttling(value: object, where: str) -> RetryThrottling:
    obj = _object(value, where)
    _keys(obj, where, {"maxTokens", "tokenRatio"})
    for key in ("maxTokens", "tokenRatio"):
        if key not in obj:
            raise ServiceConfigError(f"service_config: {where}.{key}: required")
    tokens = _int(obj["maxTokens"], f"{where}.maxTokens", 1)
    if tokens > MAX_TOKENS:
        _bad(f"{where}.maxTokens", f"an integer from 1 to {MAX_TOKENS}", tokens)
    return RetryThrottling(
        tokens,
        _positive(obj["tokenRatio"], f"{where}.tokenRatio"),
    )


# ------------------------------------------------ configs providers publish


def published_entries(service: str, value: object) -> tuple[MethodConfig, ...]:
    """The ``methodConfig`` entries a provider of ``service`` published (its
    node's ``serviceConfig``: a JSON object, or its text), checked as a
    consumer's own config is (:class:`ServiceConfigError` if bad), kept only
    for names of ``service`` (no default ``{}``, no other service), and
    clamped: timeouts >= MIN_PUBLISHED_TIMEOUT, backoffs and hedging delays
    from MIN_PUBLISHED_BACKOFF to MAX_PUBLISHED_BACKOFF, multipliers 1 to
    MAX_PUBLISHED_MULTIPLIER (attempts are capped at 5 by the parser).
    ``retryThrottling`` is never taken: the consumer's budget stays."""
    if not isinstance(value, (str, bytes, Mapping)):
        _bad("", "an object", value)
    config = ServiceConfig.parse(value)
    kept = []
    for entry in config.method_configs:
        names = tuple(n for n in entry.names if n.service == service)
        if names:
            kept.append(_clamped(replace(entry, names=names)))
    return tuple(kept)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _clamped(entry: MethodConfig) -> MethodConfig:
    timeout = entry.timeout
    if timeout is not None:
        timeout = max(timeout, MIN_PUBLISHED_TIMEOUT)
    retry = entry.retry_policy
    if retry is not None:
        initial = _clamp(retry.initial_backoff, MIN_PUBLISHED_BACKOFF, MAX_PUBLISHED_BACKOFF)
        retry = replace(
            retry,
            initial_backoff=initial,
            max_backoff=_clamp(retry.max_backoff, initial, MAX_PUBLISHED_BACKOFF),
            backoff_multiplier=_clamp(retry.backoff_multiplier, 1.0, MAX_PUBLISHED_MULTIPLIER),
        )
    hedging = entry.hedging_policy
    if hedging is not None:
        delay = _clamp(hedging.hedging_delay, MIN_PUBLISHED_BACKOFF, MAX_PUBLISHED_BACKOFF)
        hedging = replace(hedging, hedging_delay=delay)
    return replace(entry, timeout=timeout, retry_policy=retry, hedging_policy=hedging)


class PublishedConfigs:
    """Picks, per service, the config its providers publish in their
    registry nodes (see docs/resilience.md): each distinct one is checked
    once (a bad one is logged once and never used); when providers
    disagree, the one most of them publish wins, a tie going to the one
    the smallest address (host, then port) publishes."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, str], tuple[MethodConfig, ...] | None] = {}

    def choose(
        self, service: str, addresses: Sequence[ProviderAddress]
    ) -> tuple[MethodConfig, ...]:
        votes: dict[str, list[tuple[str, int]]] = {}
        found: dict[str, tuple[MethodConfig, ...]] = {}
        for address in addresses:
            value = address.data.get(PUBLISHED_KEY)
            if value is None:
                continue
            try:
                text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            except (TypeError, ValueError, RecursionError):
                text = repr(value)[:200]
            entries = self._entries(service, text, value, address)
            if entries is not None:
                found[text] = entries
                votes.setdefault(text, []).append((address.host, address.port))
        if not votes:
            return ()
        best = min(votes, key=lambda t: (-len(votes[t]), min(votes[t])))
        return found[best]

    def _entries(
        self, service: str, text: str, value: object, address: ProviderAddress
    ) -> tuple[MethodConfig, ...] | None:
        key = (service, text)
        if key in self._parsed:
            return self._parsed[key]
        if len(self._parsed) >= _MAX_PUBLISHED_TEXTS:
            self._parsed.clear()
        entries: tuple[MethodConfig, ...] | None
        try:
            entries = published_entries(service, value)
        except (ServiceConfigError, RecursionError) as e:
            entries = None
            log.warn(
                "ignoring the service config {address} publishes for {service}: {error}",
                address=str(address),
                service=service,
                error=str(e)[:200],
            )
        self._parsed[key] = entries
        return entries
