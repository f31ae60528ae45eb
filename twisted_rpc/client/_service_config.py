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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import StatusCode

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
        default (an empty name), else None."""
        index = self._index
        return index.get((service, method)) or index.get((service, "")) or index.get(("", ""))

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
    return MethodConfig(
        tuple(_name(n, f"{where}.name[{i}]") for i, n in enumerate(names)),
        timeout,
        ready,
        retry,
        hedging,
    )


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
