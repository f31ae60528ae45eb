"""Chaos run: three real providers misbehaving, one consumer with a policy (bounded).

    PYTHONPATH=. .venv/bin/python -m scripts.chaos [--mode hedging|failing] [--calls 20000]

``hedging`` (the default): three ``twistd mprpc`` providers of EchoService on
127.0.0.1 (testbed/chaos_service.py): one answers 30 % of its calls
UNAVAILABLE, one answers 5 % of them 500 ms late, one is healthy. One
``Client`` with the three as static providers and a service config giving
Echo a hedgingPolicy (maxAttempts 3, hedgingDelay 50 ms, UNAVAILABLE
non-fatal) makes ``--calls`` calls, ``--concurrency`` at a time. Outlier
ejection is on as by default (the 30 % provider soon leaves the rotation);
``--no-ejection`` turns it off so that hedging alone faces every fault.

``failing``: every provider answers UNAVAILABLE; Echo has a retryPolicy
(maxAttempts 5): the retry budget must keep attempts within 1.2x the calls.

Attempts are counted at the providers (each counts the Echo calls it
received; read at the end). Prints one JSON line (success rate, attempts
per call, p50/p99 latency) and a markdown table. Exits non-zero when the run
went past ``--max-seconds`` or a provider could not be read.
"""

from __future__ import annotations

import argparse
import json
import os
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

SERVICES = "testbed.chaos_service:ChaosEchoService"
NAME = [{"service": ECHO.full_name, "method": "Echo"}]
HEDGING = {
    "methodConfig": [
        {
            "name": NAME,
            "timeout": "2s",
            "hedgingPolicy": {
                "maxAttempts": 3,
                "hedgingDelay": "0.05s",
                "nonFatalStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
RETRYING = {
    "methodConfig": [
        {
            "name": NAME,
            "timeout": "2s",
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
# (CHAOS_FAIL, CHAOS_SLOW) of each provider, by mode
ROLES = {
    "hedging": [("0.3", "0"), ("0", "0.05"), ("0", "0")],
    "failing": [("1", "0"), ("1", "0"), ("1", "0")],
}


def start_providers(mode: str, started: list[Provider]) -> None:
    """One provider per role, its behaviour set through its environment."""
    saved = {k: os.environ.get(k) for k in ("CHAOS_FAIL", "CHAOS_SLOW", "CHAOS_SEED")}
    try:
        for i, (fail, slow) in enumerate(ROLES[mode]):
            os.environ.update(CHAOS_FAIL=fail, CHAOS_SLOW=slow, CHAOS_SEED=str(17 + i))
            started.append(Provider(Path(tempfile.mkdtemp()), services=SERVICES))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def percentile_ms(values: list[float], share: float) -> float | None:
    """The ``share`` percentile of ``values`` (seconds) in ms; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 2)


async def run(args: argparse.Namespace, providers: list[Provider]) -> dict[str, Any]:
    client = Client(
        reactor,
        providers={ECHO.full_name: [p.address for p in providers]},
        service_config=HEDGING if args.mode == "hedging" else RETRYING,
        consecutive_failures=0 if args.no_ejection else 5,
    )
    echo = client.proxy(ECHO)
    # one call to each provider first, so that every connection is up
    for p in providers:
        single = Client(reactor, providers={ECHO.full_name: [p.address]})
        await single.proxy(ECHO).AsyncEcho(echo_pb2.EchoRequest(), timeout=10)
        await single.close()
    await echo.AsyncEcho(echo_pb2.EchoRequest(), timeout=10)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"next": 0}
    started = time.monotonic()
    end = started + args.max_seconds

    async def worker() -> None:
        while state["next"] < args.calls and time.monotonic() < end:
            state["next"] += 1
            t0 = time.perf_counter()
            try:
                await echo.Echo(echo_pb2.EchoRequest(payload=b"x"))
            except RpcError as e:
                key = f"{type(e).__name__}: {e.message}"[:120]
                errors[key] = errors.get(key, 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)

    await Deferred.fromCoroutine(_gather([worker() for _ in range(args.concurrency)]))
    elapsed = time.monotonic() - started
    await client.close()
    received = []
    for p in providers:
        single = Client(reactor, providers={ECHO.full_name: [p.address]})
        reply = await single.proxy(ECHO).AsyncEcho(echo_pb2.EchoRequest(), timeout=10)
        received.append(reply.call_id)
        await single.close()
    calls = state["next"]
    return {
        "mode": args.mode,
        "calls": calls,
        "completed": calls == args.calls,
        "ok": len(latencies),
        "success_rate": len(latencies) / calls if calls else 0.0,
        "attempts": sum(received),
        "attempts_per_call": sum(received) / calls if calls else 0.0,
        "attempts_by_provider": received,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "seconds": round(elapsed, 2),
        "concurrency": args.concurrency,
        "ejection": not args.no_ejection,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


async def _gather(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    deferreds = [Deferred.fromCoroutine(c) for c in coroutines]
    for d in deferreds:
        await d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=sorted(ROLES), default="hedging")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument(
        "--no-ejection",
        action="store_true",
        help="never eject a provider (consecutive_failures=0): the policy alone faces the faults",
    )
    args = parser.parse_args()
    if not 0 < args.calls <= 1_000_000 or not 0 < args.concurrency <= 1000:
        parser.error("--calls must be within 1 and 1,000,000, --concurrency within 1 and 1,000")
    providers: list[Provider] = []
    result: dict[str, Any] = {}
    try:
        start_providers(args.mode, providers)

        async def go(_reactor: object) -> None:
            result.update(await run(args, providers))

        task.react(lambda _reactor: Deferred.fromCoroutine(go(_reactor)))
    except SystemExit:
        pass  # react() always exits; the result is what matters
    finally:
        for p in providers:
            p.stop()
    if not result:
        print("FAILED: the run gave no result", file=sys.stderr)
        return 1
    print(json.dumps(result))
    print(
        "\n| mode | calls | success | attempts/call | p50 | p99 |\n|---|---:|---:|---:|---:|---:|"
    )
    print(
        f"| {result['mode']} | {result['calls']:,} | {result['success_rate']:.4%} "
        f"| {result['attempts_per_call']:.3f} | {result['p50_ms']} ms | {result['p99_ms']} ms |"
    )
    if not result["completed"]:
        print(f"FAILED: not every call made within {args.max_seconds:g} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
