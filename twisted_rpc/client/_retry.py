"""Retries: which calls may be retried (:class:`Retries.policy_for`), the
retry budget bounding them (:class:`TokenBucket`, gRPC's ``retryThrottling``,
or :class:`WindowBudget`, Finagle's kind), and the coroutine sending a call
until it succeeds, fails for good or runs out of attempts, budget or deadline
(:func:`send_with_retries`). See docs/resilience.md.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twisted_rpc.client._calls import NotSentError, ShedError
from twisted_rpc.client._dials import _Clock
from twisted_rpc.client._events import Events
from twisted_rpc.client._hedge import attempts_error as _final
from twisted_rpc.client._hedge import send_hedged
from twisted_rpc.client._service_config import (
    HedgingPolicy,
    PublishedConfigs,
    RetryPolicy,
    RetryThrottling,
    ServiceConfig,
)
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import (
    CancelledError,
    DeadlineExceededError,
    RpcError,
    StatusCode,
)
from twisted_rpc.discovery._layout import PUBLISHED_KEY
from twisted_rpc.discovery._types import ProviderAddress

if TYPE_CHECKING:
    from twisted_rpc.client._balancer import Balancer
    from twisted_rpc.client._options import ClientOptions
    from twisted_rpc.client._pool import Provider

log = Logger(namespace="twisted_rpc.client")

IDEMPOTENT_POLICY = RetryPolicy(
    max_attempts=2,
    initial_backoff=0.0,
    max_backoff=0.0,
    backoff_multiplier=1.0,
    retryable_status_codes=frozenset({StatusCode.UNAVAILABLE}),
)
"""The policy of an idempotent method the service config does not name
(``proxy(..., idempotent=True)`` or ``option idempotency_level``): one retry
after UNAVAILABLE, at once (as before retry policies), on another provider
when there is one. A retryPolicy naming the method gives backoff."""

_SAFE_LEVELS = frozenset({MethodOptions.IDEMPOTENT, MethodOptions.NO_SIDE_EFFECTS})
_MAX_MEMO = 10_000  # methods whose policy is remembered


def descriptor_idempotent(method: MethodDescriptor | None) -> bool:
    """True if ``method``'s ``option idempotency_level`` is IDEMPOTENT or NO_SIDE_EFFECTS."""
    if method is None or not method.has_options:
        return False
    options = method.GetOptions()
    return isinstance(options, MethodOptions) and options.idempotency_level in _SAFE_LEVELS


def _find_method(method: MethodInfo) -> MethodDescriptor | None:
    try:
        found = descriptor_pool.Default().FindMethodByName(f"{method.service}.{method.name}")
    except KeyError:
        return None
    return found if isinstance(found, MethodDescriptor) else None


class RetryBudget(Protocol):
    """What bounds retries across a client's calls."""

    def deposit(self) -> None:
        """A retryable call starts."""

    def succeeded(self) -> None:
        """An attempt succeeded."""

    def failed(self) -> None:
        """An attempt failed with a retryable code."""

    def withdraw(self) -> bool:
        """May one more retry be made? (It is counted if so.)"""


class TokenBucket:
    """gRPC's ``retryThrottling``: ``max_tokens`` to start, -1 per failed
    attempt, +``token_ratio`` per success (up to ``max_tokens``); retries
    only while more than half the tokens are left."""

    def __init__(self, throttling: RetryThrottling) -> None:
        self.max_tokens = float(throttling.max_tokens)
        self.ratio = throttling.token_ratio
        self.tokens = self.max_tokens

    def deposit(self) -> None:
        pass

    def succeeded(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def failed(self) -> None:
        self.tokens = max(0.0, self.tokens - 1)

    def withdraw(self) -> bool:
        return self.tokens > self.max_tokens / 2


class WindowBudget:
    """Finagle's kind of retry budget: over the last ``window`` seconds,
    retries at most ``ratio`` of the retryable calls started, or
    ``min_per_second`` × ``window`` if that is more (so a trickle of calls
    can still be retried). Kept in one-second slots."""

    def __init__(
        self,
        clock: _Clock,
        ratio: float = 0.2,
        min_per_second: float = 1.0,
        window: float = 10.0,
    ) -> None:
        self.clock = clock
        self.ratio = ratio
        self.floor = min_per_second * window
        self.slots = max(1, int(window))
        self._second = [-1] * self.slots
        self._calls = [0] * self.slots
        self._retries = [0] * self.slots

    def _slot(self) -> int:
        second = int(self.clock.seconds())
        i = second % self.slots
        if self._second[i] != second:
            self._second[i], self._calls[i], self._retries[i] = second, 0, 0
        return i

    def deposit(self) -> None:
        self._calls[self._slot()] += 1

    def succeeded(self) -> None:
        pass

    def failed(self) -> None:
        pass

    def withdraw(self) -> bool:
        i = self._slot()
        oldest = self._second[i] - self.slots
        calls = retries = 0
        for j in range(self.slots):
            if self._second[j] > oldest:
                calls += self._calls[j]
                retries += self._retries[j]
        if retries + 1 > max(self.ratio * calls, self.floor):
            return False
        self._retries[i] += 1
        return True


class Retries:
    """A client's retry settings: the policy each method gets, and the budget."""

    def __init__(
        self,
        clock: _Clock,
        config: ServiceConfig | None,
        budget: RetryBudget,
        find: Callable[[MethodInfo], MethodDescriptor | None] = _find_method,
    ) -> None:
        self.clock = clock
        self.config = config
        self.budget = budget
        self.plain: set[bytes] = set()
        """Routes with no policy (neither configured nor idempotent by
        descriptor): a call to one not marked idempotent is sent once."""
        self._policies: dict[bytes, RetryPolicy | HedgingPolicy | None] = {}
        self._find = find
        self.random = random.random
        self._published: PublishedConfigs | None = None
        """Set once a provider list carried a published config (the config
        is then this client's own copy)."""

        self.events = Events()
        """Observers of retries and hedges (metrics; _events.py)."""

    @classmethod
    def from_options(cls, clock: _Clock, options: ClientOptions) -> Retries:
        """The retries of a client with ``options``: the service config's
        token bucket if it has ``retryThrottling``, else a WindowBudget."""
        config = cast("ServiceConfig | None", options.service_config)
        budget: RetryBudget
        if config is not None and config.retry_throttling is not None:
            budget = TokenBucket(config.retry_throttling)
        else:
            budget = WindowBudget(
                clock,
                options.retry_budget_ratio,
                options.retry_budget_min_per_second,
                options.retry_budget_window,
            )
        return cls(clock, config, budget)

    def published(self, service: str, addresses: Sequence[ProviderAddress]) -> ServiceConfig | None:
        """The service config once ``service``'s new provider list is taken
        into account: the config its providers publish in their nodes
        becomes the service's default under this client's own entries
        (:meth:`ServiceConfig.policy_for`). Nothing changes (and nothing is
        copied) while no provider publishes one."""
        config = self.config
        chooser = self._published
        if chooser is None:
            if not any(PUBLISHED_KEY in a.data for a in addresses):
                return config
            chooser = self._published = PublishedConfigs()
            if config is None:
                config = ServiceConfig()
            else:  # a copy: the caller's object may serve other clients
                config = ServiceConfig(config.method_configs, config.retry_throttling)
            self.config = config
        assert config is not None
        if config.publish(service, chooser.choose(service, addresses)):
            self._policies.clear()
            self.plain.clear()  # (the client's own set: emptied in place)
        return config

    def policy_for(
        self, method: MethodInfo, idempotent: bool
    ) -> RetryPolicy | HedgingPolicy | None:
        """The service config's retryPolicy or hedgingPolicy for ``method``,
        else the default retry one if it is idempotent (by its descriptor or
        ``idempotent``)."""
        try:
            policy = self._policies[method.route]
        except KeyError:
            policy = None
            entry = self.config and self.config.policy_for(method.service, method.name)
            if entry and entry.hedging_policy is not None:
                policy = entry.hedging_policy
            elif entry and entry.retry_policy is not None:
                policy = entry.retry_policy
            elif descriptor_idempotent(self._find(method)):
                policy = IDEMPOTENT_POLICY
            if len(self._policies) < _MAX_MEMO:
                self._policies[method.route] = policy
                if policy is None:
                    self.plain.add(method.route)
        if policy is None and idempotent:
            return IDEMPOTENT_POLICY
        return policy

    def backoff(self, policy: RetryPolicy, retry: int) -> float:
        """Seconds before retry number ``retry`` (1, 2...): full jitter,
        uniform in [0, min(max_backoff, initial × multiplier^(retry-1)))."""
        ceiling = policy.initial_backoff * policy.backoff_multiplier ** (retry - 1)
        return self.random() * min(policy.max_backoff, ceiling)


async def send_with_retries(
    retries: Retries,
    channels: Callable[[], Sequence[Provider]],
    balancer: Balancer,
    channel: Provider,
    method: MethodInfo,
    request: Message,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
    policy: RetryPolicy | HedgingPolicy | None,
) -> Message:
    """Send until an answer, a final error, or no attempt, budget or time
    left. A call never written anywhere (NotSentError) goes to each provider
    not tried yet (as before, not counted); with ``policy``, a call failing
    with one of its retryable codes is sent again after a jittered backoff,
    to a provider not tried yet when there is one, if the budget allows and
    the retry can start before the deadline. A hedging policy hedges the
    call instead (_hedge.py)."""
    if isinstance(policy, HedgingPolicy):
        return await send_hedged(
            retries.clock,
            retries.budget,
            channels,
            balancer,
            channel,
            method,
            request,
            timeout,
            metadata,
            policy,
            retries.events,
        )
    clock = retries.clock
    budget = retries.budget
    started = clock.seconds()
    deadline = None if not timeout else started + timeout
    tried: list[Provider] = []
    attempts = 0
    if policy is not None:
        budget.deposit()
    while True:
        tried.append(channel)
        remaining = None
        if deadline is not None:
            remaining = deadline - clock.seconds()
            if remaining <= 0:
                error: RpcError = DeadlineExceededError(
                    message=f"deadline of {timeout:g}s exceeded"
                )
                raise _final(error, attempts) if attempts > 1 else error
        try:
            answer = await channel.call(method, request, remaining, metadata)
        except NotSentError as e:
            next_channel = balancer.pick(channels(), tried)
            if next_channel is None:
                if attempts:
                    _final(e, attempts)
                raise
            if isinstance(e, ShedError) and not may_resend_shed(retries, method):
                raise _final(e, attempts + 1, "retry budget exhausted") from None
            channel = next_channel
            continue
        except RpcError as e:
            attempts += 1
            if policy is None or e.code not in policy.retryable_status_codes:
                if attempts > 1:
                    _final(e, attempts)
                raise
            budget.failed()
            if attempts >= policy.max_attempts:
                raise _final(e, attempts) from None
            if not budget.withdraw():
                retries.events("retry_refused", method.full_name)
                raise _final(e, attempts, "retry budget exhausted") from None
            delay = retries.backoff(policy, attempts)
            if deadline is not None and clock.seconds() + delay >= deadline:
                raise _final(e, attempts, "no time left to retry") from None
            log.debug(
                "retrying {method} in {delay:.3f}s: {error}",
                method=method.full_name,
                delay=delay,
                error=e.message,
            )
            if delay > 0:
                try:
                    await sleep(clock, delay)
                except defer.CancelledError:
                    raise CancelledError(message="cancelled by the caller") from None
            listed = channels()
            next_channel = balancer.pick(listed, tried) or balancer.pick(listed)
            if next_channel is None:
                raise _final(e, attempts, "no provider left") from None
            retries.events("retried", method.full_name, e.code)
            channel = next_channel
            continue
        if policy is not None:
            budget.succeeded()
        return answer


def may_resend_shed(retries: Retries, method: MethodInfo) -> bool:
    """May a call a provider shed (answered "not run") go elsewhere? Only
    if the retry budget allows it, as any retry, so that a fleet-wide
    overload is not multiplied by consumers resending what was shed."""
    if not retries.budget.withdraw():
        retries.events("retry_refused", method.full_name)
        return False
    retries.events("retried", method.full_name, StatusCode.RESOURCE_EXHAUSTED)
    return True


def sleep(clock: _Clock, delay: float) -> defer.Deferred[None]:
    """Fires after ``delay``; cancelling it cancels the timer (Twisted's
    ``deferLater``, given the clock this module is typed with)."""
    return deferLater(cast(IReactorTime, clock), delay)
