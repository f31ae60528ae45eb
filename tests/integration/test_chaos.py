"""The chaos script, short form: success rate with hedging, attempt ratio when all fail.

Only the counts are checked, never timings (the machine may be shared)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed.processes import ROOT, environment

pytestmark = pytest.mark.integration


def chaos(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "scripts.chaos", "--calls", "2000", "--max-seconds", "60", *args],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout + done.stderr[-3000:]
    result = json.loads(lines[-1])
    assert done.returncode == 0, (result, done.stderr.splitlines()[-15:])
    assert result["calls"] == 2000
    return result


@pytest.mark.parametrize("ejection", [[], ["--no-ejection"]], ids=["ejection", "no-ejection"])
def test_hedging_rides_out_a_flaky_and_a_slow_provider(ejection):
    result = chaos("--mode", "hedging", *ejection)
    assert result["success_rate"] >= 0.999, result
    # every provider was reached and counted what it received
    assert len(result["attempts_by_provider"]) == 3
    assert result["attempts"] >= result["ok"]


def test_retries_stay_within_the_budget_when_every_provider_fails():
    result = chaos("--mode", "failing")
    assert result["ok"] == 0
    assert result["attempts"] >= result["calls"]
    assert result["attempts_per_call"] <= 1.2, result
