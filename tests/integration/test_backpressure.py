"""A consumer that reads nothing: the provider stops reading it, stays small, and recovers."""

from __future__ import annotations

import select
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest

from testbed.processes import Provider
from testbed.protos import echo_pb2
from twisted_rpc.core._codec import encode_request

pytestmark = pytest.mark.integration

ROUTE = b"mprpc.test.EchoService/Echo"
PAYLOAD = echo_pb2.EchoRequest(payload=b"p" * 65536).SerializeToString()
MAX_FRAMES = 2000  # 128 MiB of requests, far more than any buffer on the way


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def count_frames(buffer: bytearray) -> int:
    """Remove the complete frames at the front of buffer; return how many."""
    count = 0
    while len(buffer) >= 4:
        (length,) = struct.unpack_from("!I", buffer)
        if len(buffer) < 4 + length:
            break
        del buffer[: 4 + length]
        count += 1
    return count


def test_unread_answers_pause_the_consumer_and_memory_stays_bounded():
    provider = Provider(Path(tempfile.mkdtemp()))
    try:
        base = rss_kib(provider.pid)
        frames = [encode_request(i + 1, ROUTE, len(PAYLOAD)) + PAYLOAD for i in range(MAX_FRAMES)]
        sock = socket.create_connection(("127.0.0.1", provider.port), timeout=5)
        sock.setblocking(False)
        stream = memoryview(b"".join(frames))
        sent = 0
        last_progress = time.monotonic()
        deadline = time.monotonic() + 30
        # Phase 1: write only, until nothing more is taken for 2 s.
        while sent < len(stream) and time.monotonic() < deadline:
            _, writable, _ = select.select([], [sock], [], 0.2)
            if writable:
                try:
                    n = sock.send(stream[sent : sent + 1 << 20])
                except BlockingIOError:
                    n = 0
                if n:
                    sent += n
                    last_progress = time.monotonic()
            if time.monotonic() - last_progress > 2:
                break
        frame_size = len(frames[0])
        started = -(-sent // frame_size)  # frames begun
        assert started < MAX_FRAMES, "the provider kept reading although nobody read its answers"
        grown_mib = (rss_kib(provider.pid) - base) / 1024
        print(f"frames taken before the stall: {started}, provider RSS growth {grown_mib:.1f} MiB")
        assert grown_mib < 64, f"provider grew by {grown_mib:.0f} MiB"
        assert "is not reading its answers" in provider.output
        # Phase 2: read everything; finish the frame that was cut short.
        end = started * frame_size
        received = bytearray()
        answers = 0
        deadline = time.monotonic() + 60
        while answers < started and time.monotonic() < deadline:
            want_write = [sock] if sent < end else []
            readable, writable, _ = select.select([sock], want_write, [], 1)
            if writable:
                try:
                    sent += sock.send(stream[sent:end])
                except BlockingIOError:
                    pass
            if readable:
                data = sock.recv(1 << 20)
                assert data, "provider closed the connection"
                received += data
                answers += count_frames(received)
        assert answers == started
        sock.close()
        # Still serving others.
        with socket.create_connection(("127.0.0.1", provider.port), timeout=5) as other:
            other.sendall(frames[0])
            buffer = bytearray()
            while not count_frames(buffer):
                buffer += other.recv(1 << 20)
    finally:
        provider.stop()
