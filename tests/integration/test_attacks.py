"""The attack script, short form: it runs a provider and a consumer attack end to end,
measures every phase, and leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from testbed.processes import ROOT, environment

pytestmark = pytest.mark.integration


def test_attacks_run_measure_and_clean_up(tmp_path):
    out = tmp_path / "attacks.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.attacks",
            "--only",
            "huge-route",
            "--only",
            "redial-close",
            "--seconds",
            "1",
            "--before",
            "0.5",
            "--after",
            "0.5",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = {r["attack"]: r for r in json.loads(out.read_text())}
    assert sorted(results) == ["huge-route", "redial-close"]
    for result in results.values():
        assert "error" not in result and "attack_error" not in result, result
        assert result["target_alive"] and result["provider_alive"]
        before = result["phases"]["before"]
        assert before["good_client"]["ok"] > 0
        assert before["rss_end_mib"] > 10 and before["cpu_s"] is not None
        for pid in result["pids"]:  # every process it started is gone
            assert not os.path.exists(f"/proc/{pid}"), pid
    assert results["huge-route"]["details"]["calls"] > 0
    assert results["huge-route"]["phases"]["during"]["new_connections"]["tried"] > 0
    assert results["redial-close"]["details"]["connections_accepted"] > 0
    assert "| `huge-route` | #12 | provider |" in done.stdout
