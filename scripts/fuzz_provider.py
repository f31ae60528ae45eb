"""Live fuzzing of a running ``twistd mprpc`` provider (loopback only, bounded).

    PYTHONPATH=. .venv/bin/python -m scripts.fuzz_provider [--frames 10000] [--seconds 120]

Starts a provider, then over many short connections sends random bytes and
valid frames with random mutations (flipped bytes, bad lengths, truncations,
garbage payloads, unknown kinds and routes), reading whatever comes back. At
the end a well-behaved client must still get correct answers, the provider
must still run, and its RSS must not have grown past a bound. Prints one JSON
line; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

from testbed.processes import Provider
from testbed.protos import echo_pb2
from twisted_rpc.core import _codec as wire

ROUTES = [
    b"mprpc.test.EchoService/Echo",
    b"mprpc.test.EchoService/AsyncEcho",
    b"mprpc.test.EchoService/NotImplemented",
    b"example.UserService/Login",
    b"no.Such/Thing",
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def valid_frame(rng: random.Random) -> bytes:
    kind = rng.random()
    call_id = rng.randrange(1, 1 << 32)
    if kind < 0.7:
        request = echo_pb2.EchoRequest(
            payload=rng.randbytes(rng.randrange(0, 2000)),
            fail_code=rng.choice([0, 0, 0, 3, 5, 13, 999]),
            crash=rng.random() < 0.05,
        )
        payload = request.SerializeToString()
        metadata = {"k": "v" * rng.randrange(0, 50)} if rng.random() < 0.3 else None
        header = wire.encode_request(
            call_id, rng.choice(ROUTES), len(payload), rng.randrange(0, 3000), metadata
        )
        return header + payload
    if kind < 0.8:
        return wire.encode_cancel(call_id)
    if kind < 0.9:
        return wire.encode_ping(call_id, rng.randbytes(8))
    return wire.encode_header(rng.randrange(0, 256), call_id, 0)


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    choice = rng.random()
    if choice < 0.4 and data:
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice < 0.55:
        data[0:4] = rng.randrange(1 << 32).to_bytes(4, "big")  # any length at all
    elif choice < 0.7 and len(data) > 1:
        del data[rng.randrange(1, len(data)) :]  # truncated
    elif choice < 0.85:
        data += rng.randbytes(rng.randrange(1, 100))  # trailing garbage
    return bytes(data)


def one_connection(port: int, frames: list[bytes], rng: random.Random) -> tuple[int, str]:
    """Send frames (in random splits), read for a moment; (bytes read, how it ended)."""
    received = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            blob = b"".join(frames)
            pos = 0
            while pos < len(blob):
                step = rng.randrange(1, 4096)
                s.sendall(blob[pos : pos + step])
                pos += step
            s.settimeout(0.2)
            try:
                while data := s.recv(65536):
                    received += len(data)
                return received, "closed by provider"
            except TimeoutError:
                return received, "left open"
    except (ConnectionResetError, BrokenPipeError):
        return received, "reset by provider"


def check_client(port: int) -> None:
    """A well-behaved client gets correct answers (raw socket, to stay reactor-free)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        expected = {}
        out = []
        for i in range(1, 101):
            body = b"ok %d" % i
            payload = echo_pb2.EchoRequest(payload=body).SerializeToString()
            out.append(wire.encode_request(i, ROUTES[0], len(payload), 5000) + payload)
            expected[i] = body
        s.sendall(b"".join(out))
        got: dict[int, bytes] = {}

        def frame(f: wire.Frame) -> None:
            assert f.status == 0, (f.call_id, f.status, f.message)
            got[f.call_id] = echo_pb2.EchoReply.FromString(f.payload).payload

        decoder = wire.FrameDecoder(frame)
        while len(got) < len(expected):
            data = s.recv(65536)
            if not data:
                raise AssertionError("provider closed a good connection")
            decoder.feed(data)
        assert got == expected, "wrong answers"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--per-connection", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    provider = Provider(Path(tempfile.mkdtemp()), "max_frame_size = 1048576\n")
    try:
        check_client(provider.port)
        rss_start = rss_kib(provider.pid)
        deadline = time.monotonic() + args.seconds
        sent = connections = 0
        endings: dict[str, int] = {}
        while sent < args.frames and time.monotonic() < deadline:
            frames = []
            for _ in range(min(args.per_connection, args.frames - sent)):
                r = rng.random()
                if r < 0.15:
                    frames.append(rng.randbytes(rng.randrange(1, 200)))
                elif r < 0.6:
                    frames.append(mutate(valid_frame(rng), rng))
                else:
                    frames.append(valid_frame(rng))
            sent += len(frames)
            connections += 1
            _, how = one_connection(provider.port, frames, rng)
            endings[how] = endings.get(how, 0) + 1
        alive = provider.process.poll() is None
        check_client(provider.port)
        rss_end = rss_kib(provider.pid)
        result = {
            "frames": sent,
            "connections": connections,
            "endings": endings,
            "provider_alive": alive,
            "good_client_ok": True,
            "rss_start_mib": round(rss_start / 1024, 1),
            "rss_end_mib": round(rss_end / 1024, 1),
            "protocol_errors_logged": provider.output.count("closing connection from"),
            "failed_calls_logged": provider.output.count(" failed: "),
            "handler_crashes_logged": provider.output.count("ValueError: secret detail"),
            "unexpected_errors_logged": provider.output.count("error handling a frame"),
        }
        print(json.dumps(result))
        ok = (
            alive
            and rss_end - rss_start < 64 * 1024
            and result["unexpected_errors_logged"] == 0
            and sent > 0
        )
        return 0 if ok else 1
    finally:
        provider.stop()


if __name__ == "__main__":
    sys.exit(main())
