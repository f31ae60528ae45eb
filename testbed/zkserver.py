"""Start and stop real ZooKeeper servers on 127.0.0.1 (Debian's ``zookeeper`` package).

Used by ``scripts/zookeeper`` (the command line) and by the test suite::

    scripts/zookeeper install                 # apt-get install zookeeper + a JRE, when missing
    scripts/zookeeper start [--port P] [--ensemble 3] [--dir D]
        -> prints one line per server: "server 1 pid 4242 port 2181 dir /tmp/zk-..."
    scripts/zookeeper stop PID [PID ...]      # SIGTERM, SIGKILL after 10 s

Each server gets its own temporary data dir, binds 127.0.0.1 only, and has the
admin HTTP server off. A server counts as ready when the ``srvr`` four-letter
command reports a ``Mode:`` (``ruok`` answers before the server serves). One
server is ``twisted_rpc.testing.ZooKeeperServer`` (shipped in the package for
users' tests: ``local_zookeeper()``); this module adds quorums, installing and
the command line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted_rpc.testing import (
    HOST,
    ZOOKEEPER_JAR,
    ZooKeeperServer,
    four_letter,
    free_ports,
    zookeeper_missing,
    zookeeper_mode,
)

__all__ = [
    "HOST",
    "ZooKeeperCluster",
    "ZooKeeperServer",
    "four_letter",
    "free_ports",
    "install",
    "installed",
    "mode",
]


def installed() -> bool:
    return zookeeper_missing() is None


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


mode = zookeeper_mode


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
