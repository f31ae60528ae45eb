"""Tables for docs/benchmarks.md from one run of the peer benchmark's run_all.py.

    python benchmarks/ratios.py peers.json [--system twisted_rpc]

Prints twisted_rpc's medians against the pipelined raw-Twisted floor and
grpc-aio of the same run, the first performance round's targets, then the
second round's (issue 19): each cell against every peer of the same run.
Only ratios inside one run mean anything.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

FLOOR = "twisted-pipeline"
SIZES = {32: "32 B", 65536: "64 KiB", 1048576: "1 MiB"}


def _us(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}"


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "−") + _us(abs(x))


def ratio_rows(
    medians: dict[tuple[str, int, int], dict[str, Any]],
    system: str,
    errors: dict[tuple[str, int, int], int] | None = None,
) -> list[str]:
    """One row per cell of ``system``; ``errors`` are its failed calls, all rounds."""
    errors = errors or {}
    rows = [
        "| payload | C | calls/s | ÷ floor | ÷ grpc-aio | p99 µs (ours / floor) "
        "| CPU µs/call (ours / floor) | added CPU µs/call | failed calls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, payload, c), ours in sorted(medians.items(), key=lambda kv: kv[0][1:]):
        if name != system:
            continue
        floor, aio = medians[(FLOOR, payload, c)], medians[("grpc-aio", payload, c)]
        rows.append(
            f"| {SIZES.get(payload, f'{payload} B')} | {c} | {ours['calls_per_s']:,.0f} "
            f"| {ours['calls_per_s'] / floor['calls_per_s']:.2f}× "
            f"| {ours['calls_per_s'] / aio['calls_per_s']:.1f}× "
            f"| {ours['p99_us']:,.0f} / {floor['p99_us']:,.0f} "
            f"| {_us(ours['cpu_us_per_call'])} / {_us(floor['cpu_us_per_call'])} "
            f"| {_signed(ours['cpu_us_per_call'] - floor['cpu_us_per_call'])} "
            f"| {errors.get((name, payload, c), 0)} |"
        )
    return rows


def target_rows(
    medians: dict[tuple[str, int, int], dict[str, Any]],
    system: str,
    errors: dict[tuple[str, int, int], int] | None = None,
) -> list[str]:
    """The issue's targets; a cell with failed calls meets none."""
    errors = errors or {}

    def cell(payload: int, c: int, name: str = system) -> dict[str, Any]:
        return medians[(name, payload, c)]

    def vs_floor(payload: int, c: int) -> float:
        return cell(payload, c)["calls_per_s"] / cell(payload, c, FLOOR)["calls_per_s"]

    def added(c: int) -> float:
        return cell(32, c)["cpu_us_per_call"] - cell(32, c, FLOOR)["cpu_us_per_call"]

    p99 = cell(32, 16)["p99_us"] / cell(32, 16, FLOOR)["p99_us"]
    aio = cell(32, 16)["calls_per_s"] / cell(32, 16, "grpc-aio")["calls_per_s"]
    checks = [
        ("32 B, C=16: ≥ 0.85× floor", f"{vs_floor(32, 16):.2f}×", vs_floor(32, 16) >= 0.85),
        ("32 B, C=128: ≥ 0.70× floor", f"{vs_floor(32, 128):.2f}×", vs_floor(32, 128) >= 0.70),
        ("32 B, C=1: ≥ 1.0× floor", f"{vs_floor(32, 1):.2f}×", vs_floor(32, 1) >= 1.0),
        ("32 B, C=16: p99 ≤ 1.3× floor's", f"{p99:.2f}×", p99 <= 1.3),
        ("32 B, C=16: added CPU ≤ 2.5 µs/call", _signed(added(16)), added(16) <= 2.5),
        ("32 B, C=128: added CPU ≤ 2.5 µs/call", _signed(added(128)), added(128) <= 2.5),
    ]
    for payload in (65536, 1048576):
        for c in (1, 16, 128):
            if (system, payload, c) in medians:
                r = vs_floor(payload, c)
                checks.append((f"{SIZES[payload]}, C={c}: ≥ 1.1× floor", f"{r:.2f}×", r >= 1.1))
    checks.append(("32 B, C=16: ≥ 10× grpc-aio", f"{aio:.1f}×", aio >= 10))
    rows = ["| target | this run | met? |", "|---|---:|---|"]
    for what, value, ok in checks:
        size, c = what.split(":")[0].split(", C=")
        failed = errors.get((system, {v: k for k, v in SIZES.items()}[size], int(c)), 0)
        if failed:
            value, ok = f"{value} ({failed} failed calls)", False
        rows.append(f"| {what} | {value} | {'yes' if ok else 'no'} |")
    return rows


PEERS = ("grpc-sync", "grpc-aio", "twisted-conns", FLOOR)


def peer_rows(
    medians: dict[tuple[str, int, int], dict[str, Any]],
    system: str,
    errors: dict[tuple[str, int, int], int] | None = None,
) -> list[str]:
    """The second round's goals, per cell: at least the best peer of the
    cell; 32 B at C >= 16 at least 0.9x (C=16) or 0.8x (C=128) the pipelined
    floor instead; 64 KiB at least 1.1x the floor as well. A cell with failed
    calls meets nothing."""
    errors = errors or {}
    rows = [
        "| payload | C | calls/s | "
        + " | ".join(f"÷ {p}" for p in PEERS)
        + " | best peer | goal | met? |",
        "|---|---:|---:|" + "---:|" * len(PEERS) + "---|---|---|",
    ]
    for (name, payload, c), ours in sorted(medians.items(), key=lambda kv: kv[0][1:]):
        if name != system:
            continue
        calls = ours["calls_per_s"]
        peers = {
            p: medians[(p, payload, c)]["calls_per_s"] for p in PEERS if (p, payload, c) in medians
        }
        best = max(peers, key=peers.__getitem__)
        if payload == 32 and c >= 16:
            need = 0.9 if c == 16 else 0.8
            goal, ok = f"≥ {need}× {FLOOR}", calls >= need * peers[FLOOR]
        else:
            goal, ok = "≥ best peer", calls >= peers[best]
            if payload == 65536:
                goal, ok = goal + f", ≥ 1.1× {FLOOR}", ok and calls >= 1.1 * peers[FLOOR]
        failed = errors.get((name, payload, c), 0)
        if failed:
            goal, ok = f"{goal} ({failed} failed calls)", False
        rows.append(
            f"| {SIZES.get(payload, f'{payload} B')} | {c} | {calls:,.0f} | "
            + " | ".join(f"{calls / peers[p]:.2f}×" if p in peers else "-" for p in PEERS)
            + f" | {best} | {goal} | {'yes' if ok else 'no'} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the --out JSON of run_all.py")
    parser.add_argument("--system", default="twisted_rpc")
    args = parser.parse_args()
    with open(args.results) as f:
        run = json.load(f)
    medians = {(m["system"], m["payload"], m["concurrency"]): m for m in run["medians"]}
    errors: dict[tuple[str, int, int], int] = {}
    for r in run["runs"]:
        key = (r["system"], r["payload"], r["concurrency"])
        errors[key] = errors.get(key, 0) + (r.get("errors") or 0)
    print("\n".join(ratio_rows(medians, args.system, errors)))
    print()
    print("\n".join(target_rows(medians, args.system, errors)))
    print()
    print("\n".join(peer_rows(medians, args.system, errors)))


if __name__ == "__main__":
    main()
