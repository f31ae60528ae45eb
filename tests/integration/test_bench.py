"""The benchmark programs run and report under the harness contract (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed.processes import ROOT, environment

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


def run_cell(*client_args: str, workload: str = "unary") -> dict:
    """Start the bench server, run one client against it, stop the server by
    its PID; the client's one JSON line."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.peer",
            "server",
            "--stdin-watch",
            "--max-seconds",
            "60",
            "--workload",
            workload,
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
                "benchmarks.peer",
                "client",
                "--port",
                port,
                "--warmup",
                "0.2",
                "--duration",
                "0.5",
                "--server-pid",
                str(server.pid),
                "--workload",
                workload,
                *client_args,
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
        assert report["workload"] == workload
        assert report["server_cpu_s"] is not None
        return report
    finally:
        server.stdin.close()  # --stdin-watch: exits on EOF
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def test_bench_server_and_client_report_one_json_line():
    report = run_cell("-c", "4", "-n", "100", "--metadata")
    assert (report["concurrency"], report["payload"]) == (4, 100)
    assert report["calls"] > 0 and report["errors"] == 0


@pytest.mark.parametrize("reader", ["async", "callback"])
def test_bench_stream_workload_counts_messages(reader):
    """C server streams of bench.UserService.Watch: every message counts, no
    stream ends before the run does (an early end would be an error)."""
    report = run_cell("-c", "3", "-n", "1000", "--reader", reader, workload="stream")
    assert (report["concurrency"], report["payload"]) == (3, 1000)
    assert report["errors"] == 0
    # Gaps between messages, not round trips: far more messages than 3 streams
    # could make round trips in 0.5 s if each message waited for an answer.
    assert report["calls"] > 1000
    assert report["p50_us"] is not None


def test_ratio_tables_compare_within_one_run():
    from benchmarks.ratios import ratio_rows, target_rows

    def cell(calls: float, p99: float, cpu: float) -> dict:
        return {"calls_per_s": calls, "p99_us": p99, "cpu_us_per_call": cpu}

    medians = {}
    for c in (1, 16, 128):
        medians[("twisted-pipeline", 32, c)] = cell(100_000, 200, 8.0)
        medians[("grpc-aio", 32, c)] = cell(8_000, 4000, 200.0)
    medians[("twisted_rpc", 32, 1)] = cell(100_000, 210, 8.5)
    medians[("twisted_rpc", 32, 16)] = cell(90_000, 270, 11.0)  # p99 1.35×, +3.0 µs
    medians[("twisted_rpc", 32, 128)] = cell(70_000, 220, 9.0)
    rows = ratio_rows(medians, "twisted_rpc", {("twisted_rpc", 32, 16): 7})
    assert rows[3] == "| 32 B | 16 | 90,000 | 0.90× | 11.2× | 270 / 200 | 11.0 / 8.0 | +3.0 | 7 |"
    targets = target_rows(medians, "twisted_rpc", {("twisted_rpc", 32, 1): 1})[2:]
    met = {row.split(" | ")[0][2:]: row.endswith("yes |") for row in targets}
    assert met == {
        "32 B, C=16: ≥ 0.85× floor": True,
        "32 B, C=128: ≥ 0.70× floor": True,
        "32 B, C=1: ≥ 1.0× floor": False,  # a failed call in that cell
        "32 B, C=16: p99 ≤ 1.3× floor's": False,
        "32 B, C=16: added CPU ≤ 2.5 µs/call": False,
        "32 B, C=128: added CPU ≤ 2.5 µs/call": True,
        "32 B, C=16: ≥ 10× grpc-aio": True,
    }


def test_peer_rows_judge_each_cell_against_its_best_peer():
    from benchmarks.ratios import peer_rows

    def cell(calls: float) -> dict:
        return {"calls_per_s": calls, "p99_us": 1.0, "cpu_us_per_call": 1.0}

    medians = {}
    peers = {"grpc-sync": 500, "grpc-aio": 300, "twisted-conns": 550, "twisted-pipeline": 200}
    for name, calls in peers.items():
        medians[(name, 1048576, 16)] = cell(calls)
        medians[(name, 65536, 16)] = cell(calls * 20)  # floor 4,000, best 11,000
        medians[(name, 32, 16)] = cell(calls * 100)  # floor 20,000
    medians[("twisted_rpc", 1048576, 16)] = cell(600)
    medians[("twisted_rpc", 65536, 16)] = cell(10_000)
    medians[("twisted_rpc", 32, 16)] = cell(18_000)
    rows = peer_rows(medians, "twisted_rpc", {("twisted_rpc", 1048576, 16): 1})[2:]
    by_size = {row.split(" | ")[0][2:]: row for row in rows}
    assert by_size["32 B"].endswith("| twisted-conns | ≥ 0.9× twisted-pipeline | yes |")
    assert "| 0.91× |" in by_size["64 KiB"] and by_size["64 KiB"].endswith("| no |")
    assert "| 1.09× |" in by_size["1 MiB"]  # ÷ twisted-conns: ahead, but a call failed
    assert by_size["1 MiB"].endswith("(1 failed calls) | no |")


def test_hotpath_bench_runs_both_sides_end_to_end():
    from benchmarks.hotpath import consumer_us_per_call, provider_us_per_call

    # Each answer's callback makes the next call; the consumer side checks that
    # every call was answered, so a broken path fails here rather than measures.
    assert provider_us_per_call(4, 40) > 0
    assert consumer_us_per_call(4, 40) > 0


def test_streams_on_one_connection_share_turns_round_robin(monkeypatch):
    """16 server streams of 4 messages of 64 KiB on one connection (in memory):
    the streams take turns (as the provider's handlers yield: the consumer
    hands out each read's messages stream by stream), and a turn does not wake
    streams that cannot send in it."""
    from testbed.protos import bench_pb2
    from twisted_rpc import Service
    from twisted_rpc.server import _streams
    from twisted_rpc.testing import MemoryProvider

    yielded: list[int] = []

    class Bench(Service, descriptor=bench_pb2.DESCRIPTOR.services_by_name["UserService"]):
        async def Watch(self, request, context):
            for _ in range(4):
                yielded.append(context.call_id)
                yield bench_pb2.LoginResponse(errmsg="x" * request.payload_bytes)

    waits = []
    next_turn = _streams.StreamRunner._next_turn

    def counting(self):
        waits.append(1)
        return next_turn(self)

    monkeypatch.setattr(_streams.StreamRunner, "_next_turn", counting)
    memory = MemoryProvider([Bench()])
    watch = memory.proxy(Bench).Watch
    order: list[int] = []
    ends = []
    for i in range(16):
        stream = watch(bench_pb2.WatchRequest(payload_bytes=65536))
        ends.append(stream.on_message(lambda _, i=i: order.append(i)))
    for _ in range(100):  # bounded: each round is one reactor turn
        memory.reactor.advance(0)
        memory.flush()
        if all(end.called for end in ends):
            break
    assert sorted(order) == sorted(list(range(16)) * 4)  # every message arrived
    assert len(waits) <= 2 * len(order), f"{len(waits)} waits for {len(order)} messages"
    first = yielded[:16]
    assert len(set(first)) == 16, f"first 16 messages from streams {first}"
