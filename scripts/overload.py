"""Overload run: one real provider burning ~2 ms of CPU per call, offered 3x its peak (bounded).

    PYTHONPATH=. .venv/bin/python -m scripts.overload [--quick] [--factor 3] [--seconds 10]

One ``twistd mprpc`` provider of EchoService on 127.0.0.1
(testbed/burn_service.py: Echo burns ``--burn-ms`` of CPU in a later reactor
turn). First, with no limit, its *unloaded p99* (closed loop, one call at a
time) and its *peak goodput* (closed loop, ``--peak-concurrency`` calls at a
time). Then, on a fresh provider each, ``--factor`` times that peak offered
open loop (calls started at a fixed rate whatever the answers, each with a
``--deadline``), once without and once with ``[provider] adaptive_limit =
yes`` (and any ``--limiter-config`` lines). For each: goodput (calls answered
OK within their deadline, per second from the first call to the last answer),
p99 of the admitted calls (every call not shed, a failed one counted at its
latency) over the run and over the calls started in its second half (once the
limiter has settled), the calls shed, and the adaptive limit their answers
named in the second half.

Every figure is measured at the consumer. Prints one JSON line per phase and
a markdown table; exits non-zero when a provider would not start or a phase
gave no result. Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from twisted_rpc import Client, RpcError

SERVICES = "testbed.burn_service:BurnEchoService"
_LIMIT = re.compile(r"adaptive limit (\d+)")
TICK = 0.001  # seconds between the open loop's batches of calls (--tick)


def start_provider(adaptive: bool, burn_ms: float, config: str = "", inline: str = "") -> Provider:
    names = {"BURN_MS": str(burn_ms), "BURN_INLINE": inline}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        extra = ("adaptive_limit = yes\n" + config) if adaptive else ""
        return Provider(Path(tempfile.mkdtemp()), extra=extra, services=SERVICES)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def percentile_ms(values: list[float], share: float) -> float | None:
    """The ``share`` percentile of ``values`` (seconds) in ms; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 2)


def _sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def _gather(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    deferreds = [Deferred.fromCoroutine(c) for c in coroutines]
    for d in deferreds:
        await d


class Tally:
    """The outcomes of one phase's calls."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.ok: list[float] = []  # latency of calls answered OK within their deadline
        self.admitted: list[float] = []  # latency of every call not shed
        self.settled: list[float] = []  # the same, for calls started after ``settle_at``
        self.settle_at = float("inf")
        self.limits: list[int] = []  # the adaptive limit named by shed answers (2nd half)
        self.shed = 0
        self.late = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.started = 0
        self.finished = 0

    async def call(self, echo: Any) -> None:
        self.started += 1
        t0 = time.perf_counter()
        try:
            await echo.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=self.deadline)
        except RpcError as e:
            latency = time.perf_counter() - t0
            if "shed" in e.message:
                self.shed += 1
                match = _LIMIT.search(e.message)
                if match and t0 >= self.settle_at:
                    self.limits.append(int(match[1]))
            else:
                self._admit(t0, latency)
                self.failed += 1
                key = f"{type(e).__name__}: {e.message}"[:80]
                self.errors[key] = self.errors.get(key, 0) + 1
        else:
            latency = time.perf_counter() - t0
            self._admit(t0, latency)
            if latency <= self.deadline:
                self.ok.append(latency)
            else:
                self.late += 1
        finally:
            self.finished += 1

    def _admit(self, t0: float, latency: float) -> None:
        self.admitted.append(latency)
        if t0 >= self.settle_at:
            self.settled.append(latency)

    def result(self, phase: str, seconds: float, **extra: Any) -> dict[str, Any]:
        return {
            "phase": phase,
            "calls": self.started,
            "ok": len(self.ok),
            "goodput": round(len(self.ok) / seconds, 1),
            "admitted_p99_ms": percentile_ms(self.admitted, 0.99),
            "settled_p99_ms": percentile_ms(self.settled, 0.99),
            "ok_p50_ms": percentile_ms(self.ok, 0.50),
            "ok_p99_ms": percentile_ms(self.ok, 0.99),
            "shed": self.shed,
            "late": self.late,
            "limit_range": [min(self.limits), max(self.limits)] if self.limits else None,
            "failed": self.failed,
            "seconds": round(seconds, 2),
            "errors": dict(sorted(self.errors.items(), key=lambda kv: -kv[1])[:3]),
            **extra,
        }


async def closed_loop(
    echo: Any, concurrency: int, seconds: float, calls: int, deadline: float
) -> tuple[Tally, float]:
    """``concurrency`` workers, each one call at a time, until ``calls`` or ``seconds``."""
    tally = Tally(deadline)
    started = time.monotonic()
    end = started + seconds

    async def worker() -> None:
        while tally.started < calls and time.monotonic() < end:
            await tally.call(echo)

    await _gather([worker() for _ in range(concurrency)])
    return tally, time.monotonic() - started


async def open_loop(
    echo: Any, rate: float, seconds: float, deadline: float, tick: float = TICK
) -> tuple[Tally, float]:
    """Calls started at ``rate`` per second for ``seconds``, whatever the answers; the
    time until the last answer. ``settled`` figures are for calls of the second half."""
    tally = Tally(deadline)
    tally.settle_at = time.perf_counter() + seconds / 2
    total = int(rate * seconds)
    running: list[Deferred[None]] = []
    started = time.monotonic()
    while tally.started < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1)
        while tally.started < due:
            running.append(Deferred.fromCoroutine(tally.call(echo)))
        await _sleep(tick)
    for d in running:  # each ends by its deadline
        await d
    return tally, time.monotonic() - started


async def warm_up(echo: Any, calls: int) -> None:
    for _ in range(calls):
        await echo.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=10)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    provider = start_provider(False, args.burn_ms, inline=args.inline)
    try:
        client = Client(reactor, providers={ECHO.full_name: [provider.address]})
        echo = client.proxy(ECHO)
        await warm_up(echo, args.warm_up)
        tally, took = await closed_loop(echo, 1, args.seconds, args.unloaded_calls, 10)
        results.append(tally.result("unloaded", took, concurrency=1))
        tally, took = await closed_loop(
            echo, args.peak_concurrency, args.seconds, 1_000_000, args.deadline
        )
        results.append(tally.result("peak", took, concurrency=args.peak_concurrency))
        await client.close()
    finally:
        provider.stop()
    rate = args.factor * results[-1]["goodput"]
    for adaptive in (False, True):
        provider = start_provider(
            adaptive, args.burn_ms, "\n".join(args.limiter_config), inline=args.inline
        )
        try:
            client = Client(reactor, providers={ECHO.full_name: [provider.address]})
            echo = client.proxy(ECHO)
            await warm_up(echo, args.warm_up)
            tally, took = await open_loop(echo, rate, args.seconds, args.deadline, args.tick)
            phase = "overload, adaptive limit" if adaptive else "overload, no limit"
            results.append(tally.result(phase, took, offered_per_s=round(rate, 1)))
            await client.close()
        finally:
            provider.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds in all")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load / peak goodput")
    parser.add_argument("--deadline", type=float, default=1.0, help="each call's timeout (s)")
    parser.add_argument("--burn-ms", type=float, default=2.0)
    parser.add_argument(
        "--inline",
        action="store_const",
        const="1",
        default="",
        help="the handler burns and answers inline (no Deferred)",
    )
    parser.add_argument(
        "--threaded",
        action="store_const",
        const="thread",
        dest="inline",
        help="the handler burns in the reactor's thread pool (deferToThread)",
    )
    parser.add_argument("--peak-concurrency", type=int, default=8)
    parser.add_argument(
        "--tick", type=float, default=TICK, help="seconds between the open loop's batches"
    )
    parser.add_argument("--unloaded-calls", type=int, default=2000)
    parser.add_argument("--warm-up", type=int, default=200)
    parser.add_argument(
        "--limiter-config",
        action="append",
        default=[],
        metavar="LINE",
        help="a [provider] line for the adaptive run, e.g. 'adaptive_min_limit = 1'",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.unloaded_calls, args.warm_up = 1.0, 300, 100
    if not 0 < args.seconds <= 120 or not 1 <= args.factor <= 10 or not 0 < args.deadline <= 10:
        parser.error("--seconds within 0 and 120, --factor within 1 and 10, --deadline within 0-10")
    if not 0 < args.burn_ms <= 100 or not 1 <= args.peak_concurrency <= 256:
        parser.error("--burn-ms within 0 and 100, --peak-concurrency within 1 and 256")
    results: list[dict[str, Any]] = []
    try:

        async def go() -> None:
            results.extend(await run(args))

        task.react(lambda _reactor: Deferred.fromCoroutine(go()))
    except SystemExit:
        pass  # react() always exits; the results are what matter
    if len(results) != 4:
        print("FAILED: the run gave no result", file=sys.stderr)
        return 1
    for r in results:
        print(json.dumps(r))
    unloaded_p99, peak = results[0]["ok_p99_ms"], results[1]["goodput"]
    print(f"\nunloaded p99 {unloaded_p99} ms, peak goodput {peak}/s\n")
    print(
        "| phase | offered/s | goodput/s | % of peak | admitted p99 | x unloaded p99 "
        "| 2nd half p99 | shed | failed | limit (2nd half) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results[2:]:
        p99 = r["admitted_p99_ms"]
        ratio = f"{p99 / unloaded_p99:.1f}x" if p99 and unloaded_p99 else "-"
        failed = r["failed"] + r["late"]
        print(
            f"| {r['phase']} | {r['offered_per_s']} | {r['goodput']} "
            f"| {r['goodput'] / peak:.0%} | {p99} ms | {ratio} | {r['settled_p99_ms']} ms "
            f"| {r['shed']:,} | {failed:,} | {r['limit_range'] or '-'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
