"""Start and stop real ZooKeeper servers on 127.0.0.1 (Debian's ``zookeeper`` package).

Used by ``scripts/zookeeper`` (the command line) and by the test suite::

    scripts/zookeeper install                 # apt-get install zookeeper + a JRE, when missing
    scripts/zookeeper start [--port P] [--ensemble 3] [--dir D]
        -> prints one line per server: "server 1 pid 4242 port 2181 dir /tmp/zk-..."
    scripts/zookeeper stop PID [PID ...]      # SIGTERM, SIGKILL after 10 s

Each server gets its own temporary data dir, binds 127.0.0.1 only, and has the
admin HTTP server off. A server counts as ready when the ``srvr`` four-letter
command reports a ``Mode:`` (``ruok`` answers before the server serves).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

JAVA_DIR = Path("/usr/share/java")
ZOOKEEPER_JAR = JAVA_DIR / "zookeeper.jar"
CLASSPATH_JARS = ["zookeeper.jar", "slf4j-log4j12.jar", "log4j-1.2.jar"]
MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
HOST = "127.0.0.1"

LOG4J = """\
log4j.rootLogger=INFO, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File={log}
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=%d{{ISO8601}} %-5p [%t:%C{{1}}@%L] %m%n
"""


def installed() -> bool:
    return ZOOKEEPER_JAR.exists() and shutil.which("java") is not None


def install() -> None:
    """apt-get install zookeeper (it brings a Java runtime) when it is missing."""
    if installed():
        return
    if os.geteuid() != 0:
        raise SystemExit(
            "zookeeper is not installed and this is not root: apt-get install zookeeper"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "zookeeper",
            "default-jre-headless",
        ],
        check=True,
        env=env,
    )
    if not installed():
        raise SystemExit("apt-get ran but /usr/share/java/zookeeper.jar or java is missing")


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def four_letter(port: int, command: str, timeout: float = 1.0) -> str:
    """Send a four-letter command; '' if the server does not answer."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(command.encode())
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")
    except OSError:
        return ""


def mode(port: int) -> str | None:
    """'standalone', 'leader' or 'follower' once serving, else None."""
    for line in four_letter(port, "srvr").splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


@dataclass
class ZooKeeperServer:
    """One ZooKeeper JVM; ``start()`` returns once it serves (or raises)."""

    myid: int
    port: int
    dir: Path
    tick_ms: int = 500
    peers: list[tuple[int, int, int]] = field(default_factory=list)  # (myid, quorum, election)
    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def write_config(self) -> Path:
        data = self.dir / "data"
        conf = self.dir / "conf"
        data.mkdir(parents=True, exist_ok=True)
        conf.mkdir(parents=True, exist_ok=True)
        lines = [
            f"tickTime={self.tick_ms}",
            f"dataDir={data}",
            f"clientPort={self.port}",
            f"clientPortAddress={HOST}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=srvr,ruok,mntr,stat,cons",
            "minSessionTimeout=" + str(2 * self.tick_ms),
            "maxSessionTimeout=60000",
            "maxClientCnxns=0",
        ]
        if self.peers:
            lines += ["initLimit=10", "syncLimit=5", "quorumListenOnAllIPs=false"]
            for myid, quorum, election in self.peers:
                lines.append(f"server.{myid}={HOST}:{quorum}:{election}")
            (data / "myid").write_text(f"{self.myid}\n")
        cfg = conf / "zoo.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        (conf / "log4j.properties").write_text(LOG4J.format(log=self.dir / "zookeeper.log"))
        return cfg

    def launch(self) -> None:
        cfg = self.write_config()
        classpath = ":".join([str(cfg.parent)] + [str(JAVA_DIR / j) for j in CLASSPATH_JARS])
        out = open(self.dir / "stdout.log", "ab")
        self.process = subprocess.Popen(
            [
                "java",
                "-Xmx256m",
                "-Dzookeeper.admin.enableServer=false",
                "-cp",
                classpath,
                MAIN,
                str(cfg),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()

    def wait_ready(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"zookeeper {self.myid} exited: {self.log_tail()}")
            m = mode(self.port)
            if m:
                return m
            time.sleep(0.1)
        raise RuntimeError(f"zookeeper {self.myid} not serving after {timeout}s: {self.log_tail()}")

    def start(self, timeout: float = 60.0) -> str:
        self.launch()
        return self.wait_ready(timeout)

    def log_tail(self) -> str:
        for name in ("zookeeper.log", "stdout.log"):
            path = self.dir / name
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        return "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the JVM by its PID (SIGKILL after 10 s); idempotent."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, sig)
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            except ProcessLookupError:
                pass
        self.process = None


class ZooKeeperCluster:
    """A standalone server or a quorum of ``size`` servers on loopback."""

    def __init__(self, size: int = 1, base_dir: str | None = None, tick_ms: int = 500) -> None:
        install()
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="zk-"))
        ports = free_ports(3 * size)
        peers = (
            [(i + 1, ports[size + 2 * i], ports[size + 2 * i + 1]) for i in range(size)]
            if size > 1
            else []
        )
        self.servers = [
            ZooKeeperServer(i + 1, ports[i], self.dir / f"server{i + 1}", tick_ms, peers)
            for i in range(size)
        ]

    @property
    def hosts(self) -> str:
        """The kazoo connect string of every server."""
        return ",".join(s.address for s in self.servers)

    def start(self, timeout: float = 60.0) -> ZooKeeperCluster:
        try:
            for server in self.servers:
                server.launch()
            for server in self.servers:
                server.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/zookeeper", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install zookeeper when missing")
    start = sub.add_parser("start", help="start servers in the background, print PIDs and ports")
    start.add_argument("--port", type=int, default=0, help="client port (standalone; 0: free)")
    start.add_argument("--ensemble", type=int, default=1, help="number of servers (1 or 3, 5...)")
    start.add_argument("--dir", help="base directory (default: a new temp dir)")
    start.add_argument("--tick-ms", type=int, default=500)
    stop = sub.add_parser("stop", help="stop servers by PID")
    stop.add_argument("pids", type=int, nargs="+")
    args = parser.parse_args(argv)

    if args.command == "install":
        install()
        print("zookeeper installed:", ZOOKEEPER_JAR)
        return 0
    if args.command == "stop":
        for pid in args.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
            print(f"stopped {pid}")
        return 0
    cluster = ZooKeeperCluster(args.ensemble, args.dir, args.tick_ms)
    if args.port and args.ensemble == 1:
        cluster.servers[0].port = args.port
    cluster.start()
    for s in cluster.servers:
        print(f"server {s.myid} pid {s.pid} port {s.port} dir {s.dir}", flush=True)
    print(f"hosts {cluster.hosts}")
    # The servers run on in their own sessions; this command returns.
    for s in cluster.servers:
        s.process = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
