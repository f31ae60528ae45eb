"""The live fuzz script, short form: a running provider survives garbage and still answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed.processes import ROOT, environment

pytestmark = pytest.mark.integration


def test_provider_survives_a_thousand_bad_frames():
    done = subprocess.run(
        [sys.executable, "-m", "scripts.fuzz_provider", "--frames", "1000", "--seconds", "60"],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["frames"] == 1000
    assert result["provider_alive"] and result["good_client_ok"]
    assert result["unexpected_errors_logged"] == 0
    assert result["protocol_errors_logged"] > 0  # the garbage was noticed, not ignored
