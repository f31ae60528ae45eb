"""The fault script, short form: every call accounted for through kills, freezes and outages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed.processes import ROOT, environment

pytestmark = pytest.mark.integration


def test_fault_run_loses_no_call_silently():
    done = subprocess.run(
        [sys.executable, "-m", "scripts.faults", "--seconds-per-phase", "1.5"],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout + done.stderr[-3000:]
    result = json.loads(lines[-1])
    assert done.returncode == 0, (result, done.stderr.splitlines()[-15:])
    assert result["accounted"] == result["issued"] > 1000
    assert result["failed_unattributed"] == 0
    assert result["registered_at_end"] == result["live_providers"]
    assert result["per_phase"]["4 ZooKeeper down"]["ok"] > 0
