"""The benchmark programs run and report under the harness contract (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.processes import ROOT, environment

pytestmark = pytest.mark.integration

KEYS = [
    "system",
    "concurrency",
    "payload",
    "calls_per_s",
    "p50_us",
    "p99_us",
    "server_cpu_s",
    "client_cpu_s",
]


def test_bench_server_and_client_report_one_json_line():
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twisted_rpc.bench",
            "server",
            "--stdin-watch",
            "--max-seconds",
            "60",
        ],
        cwd=ROOT,
        env=environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("READY "), line
        port = line.split()[1]
        client = subprocess.run(
            [
                sys.executable,
                "-m",
                "twisted_rpc.bench",
                "client",
                "--port",
                port,
                "-c",
                "4",
                "-n",
                "100",
                "--warmup",
                "0.2",
                "--duration",
                "0.5",
                "--server-pid",
                str(server.pid),
                "--metadata",
            ],
            cwd=ROOT,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        (line,) = client.stdout.splitlines()
        report = json.loads(line)
        assert list(report)[:8] == KEYS
        assert report["system"] == "twisted_rpc"
        assert (report["concurrency"], report["payload"]) == (4, 100)
        assert report["calls"] > 0 and report["errors"] == 0
        assert report["server_cpu_s"] is not None
    finally:
        server.stdin.close()  # --stdin-watch: exits on EOF
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
