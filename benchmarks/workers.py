"""Calls/s of a CPU-bound provider with ``workers = 1`` and ``workers = 2``,
found through ZooKeeper by consumers with default settings (docs/cluster.md,
"Figures"). Not a test.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.workers [--rounds 2] [--seconds 8]
        [--consumers 2] [--concurrency 16] [--burn-ms 1]

A local ZooKeeper (twisted_rpc.testing.local_zookeeper); per round, a
``twistd mprpc`` provider of ``testbed.burn_service:BurnEchoService`` (each
call burns ``--burn-ms`` of pure-Python CPU) with ``workers = 1``, then one
with ``workers = 2`` (alternating, ``--rounds`` of each), registered in
ZooKeeper; ``--consumers`` consumer processes (this module with
``--consumer``), each a ``Client(discovery=ZooKeeperRegistry(...))`` with
default settings running ``--concurrency`` call loops: a warm-up, then
``--seconds`` measured, the same wall-clock window for all. Prints calls/s
per round, the CPU the consumers took in the window (in cores: they share
the machine with the provider), the mean per configuration and the ratio.
Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

WARM_UP = 2.0
"""Seconds of calls before the measured window (pools filled, code warm)."""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _consume(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet import defer, task

    from testbed.protos import echo_pb2
    from twisted_rpc import Client, ZooKeeperRegistry

    client = Client(reactor, discovery=ZooKeeperRegistry(reactor, args.hosts, root=args.root))
    echo = client.proxy(echo_pb2.DESCRIPTOR.services_by_name["EchoService"])
    start, end = args.start, args.start + args.seconds
    counted = [0, 0]  # calls in the window, failures
    request = echo_pb2.EchoRequest(payload=b"x")

    async def loop() -> None:
        while time.time() < end:
            try:
                await echo.Echo(request, timeout=10)
            except Exception:
                counted[1] += 1
                await task.deferLater(reactor, 0.05, lambda: None)
                continue
            if time.time() >= start:
                counted[0] += 1

    cpu: list[float] = []
    reactor.callLater(max(0.0, start - time.time()), lambda: cpu.append(_cpu()))
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(loop()) for _ in range(args.concurrency)]
    )
    cpu.append(_cpu())
    calls, failed = counted
    print(json.dumps({"calls": calls, "failed": failed, "cpu": cpu[-1] - cpu[0]}), flush=True)
    await client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _provider_cpu(pids: list[int]) -> float:
    """CPU seconds the provider's processes (supervisor and workers) took so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _machine() -> tuple[int, int]:
    """The machine's busy and total CPU ticks so far (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _round(hosts: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    from testbed.processes import Provider, environment

    root = f"/bench-workers-{uuid.uuid4().hex[:8]}"
    extra = (
        f"workers = {workers}\ngrace_period = 2\n"
        f"[registry]\nkind = zookeeper\nhosts = {hosts}\nroot = {root}\n"
    )
    ready = " ready" if workers > 1 else "provider listening on"
    provider = Provider(
        Path(tempfile.mkdtemp()),
        extra,
        services="testbed.burn_service:BurnEchoService",
        ready=ready,
    )
    consumers: list[subprocess.Popen[str]] = []
    try:
        deadline = time.monotonic() + 60
        while len(re.findall(r"worker \d+ ready", provider.output)) < (
            workers if workers > 1 else 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready:\n{provider.output}")
            time.sleep(0.05)
        start = time.time() + WARM_UP + 1.0  # (the consumers' own start up too)
        for _ in range(args.consumers):
            consumers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.workers", "--consumer", "--hosts", hosts,
                     "--root", root, "--start", repr(start), "--seconds", str(args.seconds),
                     "--concurrency", str(args.concurrency)],
                    env=environment(),
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )  # fmt: skip
        pids = [int(p) for p in re.findall(r"worker (\d+) ready", provider.output)]
        pids = [provider.pid, *pids]
        time.sleep(max(0.0, start - time.time()))
        before = _provider_cpu(pids), _machine()
        time.sleep(max(0.0, start + args.seconds - time.time()))
        after = _provider_cpu(pids), _machine()
        results = []
        for consumer in consumers:
            out, _ = consumer.communicate(timeout=args.seconds + 60)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for consumer in consumers:
            if consumer.poll() is None:
                consumer.kill()
                consumer.wait(10)
        provider.stop()
        for pid in map(int, re.findall(r"worker (\d+) started", provider.output)):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    busy, total = (b - a for a, b in zip(before[1], after[1], strict=True))
    return {
        "provider_cores": (after[0] - before[0]) / args.seconds,
        "machine_busy": busy / total if total else 0.0,
        "rate": sum(r["calls"] for r in results) / args.seconds,
        "failed": sum(r["failed"] for r in results),
        "consumer_cores": sum(r["cpu"] for r in results) / args.seconds,
    }


def main(args: argparse.Namespace) -> None:
    from twisted_rpc.testing import local_zookeeper

    os.environ["BURN_MS"] = str(args.burn_ms)  # (the providers' environment)
    rates: dict[int, list[float]] = {1: [], 2: []}
    print(
        f"BurnEchoService ({args.burn_ms} ms of CPU a call); {args.consumers} consumer "
        f"processes x {args.concurrency} call loops, default settings, through ZooKeeper; "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    with local_zookeeper() as hosts:
        for n in range(args.rounds):
            for workers in (1, 2):
                result = _round(hosts, workers, args)
                rates[workers].append(result["rate"])
                print(
                    f"round {n + 1} workers = {workers}: {result['rate']:.0f} calls/s, "
                    f"provider took {result['provider_cores']:.2f} cores "
                    f"({result['rate'] / max(result['provider_cores'], 0.01):.0f} calls "
                    f"per provider CPU second), "
                    f"consumers {result['consumer_cores']:.2f} cores, "
                    f"machine busy {100 * result['machine_busy']:.0f} %, "
                    f"{result['failed']:.0f} failed calls",
                    flush=True,
                )
    one, two = (sum(v) / len(v) for v in (rates[1], rates[2]))
    print(
        f"mean: workers = 1 {one:.0f} calls/s, workers = 2 {two:.0f} calls/s, ratio {two / one:.2f}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--consumers", type=int, default=2, help="consumer processes")
    parser.add_argument("--concurrency", type=int, default=16, help="call loops per consumer")
    parser.add_argument("--burn-ms", type=float, default=1.0)
    parser.add_argument("--consumer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hosts", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse()
    if options.consumer:
        from twisted.internet import defer, task

        task.react(lambda reactor: defer.Deferred.fromCoroutine(_consume(reactor, options)))
    else:
        main(options)
