"""A multi-host cluster on one machine, in Linux network namespaces.

Every host is a network namespace named ``<prefix>-<host>``, joined by a veth
pair (``eth0`` inside, ``v-<host>`` outside) to the bridge ``br0`` of a
namespace of its own (``<prefix>-br``). Addresses are private (``10.77.0.0/24``
by default), with no route out and no NAT; clusters with other prefixes may
run at the same time (their addresses live in their own namespaces).

Hosts: ``zk1..zk3`` (a 3-server ZooKeeper ensemble, data under a temp dir),
``p1..p3`` (``twistd mprpc`` providers of the example UserService and the test
suite's EchoService, registered in that ensemble) and ``c1`` (for consumers);
on demand ``c2``, a consumer host behind a link that delays every frame (a
user-space link: testbed/delay_link.py, for kernels without ``tc netem``).
Every process is started with ``ip netns exec`` and stopped by its PID.
``scripts/netns-cluster`` is the command line; the integration tests
(tests/integration/test_cluster.py) use :class:`Cluster` directly.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from testbed.zkserver import install
from twisted_rpc.testing import CLASSPATH_JARS, JAVA_DIR, LOG4J, MAIN

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TWISTD = str(Path(PYTHON).with_name("twistd"))
ZK_HOSTS = ("zk1", "zk2", "zk3")
PROVIDER_HOSTS = ("p1", "p2", "p3")
CONSUMER_HOSTS = ("c1",)
HOST_NUMBERS = {"zk1": 11, "zk2": 12, "zk3": 13, "p1": 21, "p2": 22, "p3": 23, "c1": 31, "c2": 32}
ZK_PORT = 2181
PROVIDER_PORT = 8000
SERVICES = "examples.user.callee:UserService testbed.echo_service:EchoService"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def unavailable_reason() -> str:
    """Why network namespaces cannot be made here ('' when they can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (iproute2)"
    probe = f"nsprobe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


_netem: list[bool] = []


def netem_available() -> bool:
    """Whether this kernel has ``tc netem`` (some builds leave sch_netem out)."""
    if not _netem:
        probe = f"nsnetem-{os.getpid()}"
        run("ip", "netns", "add", probe)
        try:
            made = run("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem",
                       "delay", "1ms", check=False)  # fmt: skip
            _netem.append(made.returncode == 0)
        finally:
            run("ip", "netns", "del", probe, check=False)
    return _netem[0]


def install_nft() -> None:
    """apt-get install nftables when ``nft`` is missing (packet loss without netem)."""
    if shutil.which("nft") is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "nftables"], check=True, env=env)  # fmt: skip
    if shutil.which("nft") is None:
        raise RuntimeError("apt-get ran but there is no nft command")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (``ip``, ``tc``) to completion; raise with its stderr on failure."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def in_namespace(namespace: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that has joined ``namespace`` (setns is per thread);
    sockets it makes stay in that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict[str, object] = {}

    def target() -> None:
        try:
            with open(f"/run/netns/{namespace}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {namespace}")
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def four_letter(address: str, command: str, timeout: float = 1.0) -> str:
    """A ZooKeeper four-letter command's answer, '' if none (run it in a namespace)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(command.encode())
            chunks = []
            while data := s.recv(4096):
                chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")
    except OSError:
        return ""


class Cluster:
    """The namespaces, links and processes of one cluster; ``up()`` then ``down()``."""

    def __init__(
        self,
        prefix: str,
        base_dir: str | None = None,
        subnet: str = "10.77.0",
        session_timeout: float = 4.0,
        tick_ms: int = 500,
    ) -> None:
        self.prefix = prefix
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.subnet = subnet
        self.session_timeout = session_timeout
        self.tick_ms = tick_ms
        self.hosts = [*ZK_HOSTS, *PROVIDER_HOSTS, *CONSUMER_HOSTS]
        self.pids: dict[str, int] = {}  # "zk1", "p2"... -> PID
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ names

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{HOST_NUMBERS[host]}"

    @property
    def zk_hosts(self) -> str:
        """The kazoo connect string of the ensemble."""
        return ",".join(f"{self.ip(h)}:{ZK_PORT}" for h in ZK_HOSTS)

    def provider_address(self, host: str) -> str:
        return f"{self.ip(host)}:{PROVIDER_PORT}"

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    # ---------------------------------------------------------------- network

    def create_network(self) -> None:
        br = self.bridge_ns
        run("ip", "netns", "add", br)
        run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", br, "link", "set", "br0", "up")
        for host in self.hosts:
            ns = self.ns(host)
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", "eth0", "netns", ns, "type", "veth",
                "peer", "name", f"v-{host}", "netns", br)  # fmt: skip
            run("ip", "-n", br, "link", "set", f"v-{host}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def add_delayed_host(self, host: str = "c2", delay: float = 0.05) -> None:
        """One more host whose link to the bridge delays every frame ``delay`` s each
        way: two TAP devices joined by testbed/delay_link.py (for kernels without
        netem; a user-space link costs CPU, so it is a host of its own)."""
        ns, br = self.ns(host), self.bridge_ns
        run("ip", "netns", "add", ns)
        self.hosts.append(host)
        run("ip", "-n", ns, "tuntap", "add", "dev", "eth0", "mode", "tap")
        run("ip", "-n", br, "tuntap", "add", "dev", f"v-{host}", "mode", "tap")
        name = f"link-{host}"
        with open(self.log(name), "ab") as out:
            process = subprocess.Popen(
                [PYTHON, "-m", "testbed.delay_link", "--ns-a", ns, "--dev-a", "eth0",
                 "--ns-b", br, "--dev-b", f"v-{host}", "--delay", str(delay)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self._processes[name], self.pids[name] = process, process.pid
        deadline = time.monotonic() + 15
        while "delay link up" not in self.tail(name):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"delay link for {host} did not start: {self.tail(name)}")
            time.sleep(0.05)
        run("ip", "-n", br, "link", "set", f"v-{host}", "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")

    def namespaces(self) -> list[str]:
        """This cluster's namespaces that exist now."""
        listed = run("ip", "netns", "list", check=False).stdout.split()
        mine = {self.bridge_ns, *(self.ns(h) for h in {*self.hosts, *HOST_NUMBERS})}
        return [name for name in listed if name in mine]

    def set_link(self, host: str, up: bool) -> None:
        """Cut ``host`` off from every other host (its bridge port down), or join it again."""
        run("ip", "-n", self.bridge_ns, "link", "set", f"v-{host}", "up" if up else "down")

    def netem(self, host: str, spec: str, bridge_side: bool = False) -> None:
        """``tc netem`` on the packets ``host`` sends (or, ``bridge_side``, receives)."""
        if not netem_available():
            raise RuntimeError("this kernel has no tc netem (sch_netem)")
        ns, dev = (self.bridge_ns, f"v-{host}") if bridge_side else (self.ns(host), "eth0")
        run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem", *spec.split())

    def loss(self, host: str, percent: float) -> None:
        """Drop ``percent`` % of the packets ``host`` sends (netem), or where the kernel
        has no netem, of those it receives (an nftables ``numgen random`` rule in its
        input hook: a drop on output would be retried by the local TCP at once, not
        lost).  On every host, both come to ``percent`` % each way."""
        if netem_available():
            self.netem(host, f"loss {percent:g}%")
            return
        install_nft()
        rules = (
            "table inet fault {\n chain in {\n  type filter hook input priority 0;\n"
            f"  numgen random mod 10000 < {round(percent * 100)} drop\n }}\n}}\n"
        )
        done = subprocess.run(["ip", "netns", "exec", self.ns(host), "nft", "-f", "-"],
                              input=rules, capture_output=True, text=True, timeout=30)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"nft in {host}: {done.stderr.strip()}")

    def clear_loss(self, host: str) -> None:
        if shutil.which("nft"):
            run("ip", "netns", "exec", self.ns(host), "nft", "delete", "table", "inet", "fault",
                check=False)  # fmt: skip

    def clear_netem(self, host: str, bridge_side: bool = False) -> None:
        ns, dev = (self.bridge_ns, f"v-{host}") if bridge_side else (self.ns(host), "eth0")
        run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)

    def blackhole(self, host: str, targets: list[str], on: bool) -> None:
        """Routes to ``targets`` inside ``host`` dropped (``on``) or back."""
        for target in targets:
            run("ip", "-n", self.ns(host), "route", "add" if on else "del",
                "blackhole", f"{self.ip(target)}/32", check=on)  # fmt: skip

    def heal(self) -> None:
        """Undo every fault: links up, no netem, no blackhole routes."""
        for host in self.hosts:
            self.set_link(host, up=True)
            self.clear_netem(host)
            self.clear_netem(host, bridge_side=True)
            self.clear_loss(host)
            self.blackhole(host, list(self.hosts), on=False)

    def tcp_counter(self, host: str, name: str = "RetransSegs") -> int:
        """A counter of ``host``'s TCP stack (``/proc/net/snmp`` of its namespace)."""
        text = run("ip", "netns", "exec", self.ns(host), "cat", "/proc/net/snmp").stdout
        rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
        return int(dict(zip(rows[0], rows[1], strict=True))[name])

    # -------------------------------------------------------------- processes

    def spawn(self, name: str, host: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``'s namespace, output to ``<dir>/<name>.log``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(self.log(name), "ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *argv],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._processes[name] = process
        self.pids[name] = process.pid
        return process

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """SIGTERM the process ``name`` by its PID, SIGKILL after ``timeout``; idempotent."""
        pid = self.pids.pop(name, None)
        process = self._processes.pop(name, None)
        if pid is None:
            return
        for sig, wait in ((signal.SIGCONT, 0.0), (signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if wait and _waited(pid, process, wait):
                break

    def start_zookeeper(self, timeout: float = 90.0) -> None:
        install()
        for number, host in enumerate(ZK_HOSTS, 1):
            conf = self._zk_config(number, host)
            classpath = ":".join([str(conf.parent)] + [str(JAVA_DIR / j) for j in CLASSPATH_JARS])
            self.spawn(host, host, ["java", "-Xmx192m", "-cp", classpath, MAIN, str(conf)])
        deadline = time.monotonic() + timeout
        for host in ZK_HOSTS:
            while self.zk_mode(host) is None:
                if time.monotonic() > deadline or self._processes[host].poll() is not None:
                    raise RuntimeError(f"zookeeper on {host} not serving: {self.tail(host)}")
                time.sleep(0.2)

    def _zk_config(self, number: int, host: str) -> Path:
        top = self.dir / host
        data, conf = top / "data", top / "conf"
        data.mkdir(parents=True, exist_ok=True)
        conf.mkdir(parents=True, exist_ok=True)
        (data / "myid").write_text(f"{number}\n")
        lines = [
            f"tickTime={self.tick_ms}",
            f"dataDir={data}",
            f"clientPort={ZK_PORT}",
            f"clientPortAddress={self.ip(host)}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=srvr,ruok,mntr,stat,cons",
            f"minSessionTimeout={2 * self.tick_ms}",
            "maxSessionTimeout=60000",
            "initLimit=10",
            "syncLimit=4",
        ]
        lines += [f"server.{n}={self.ip(h)}:2888:3888" for n, h in enumerate(ZK_HOSTS, 1)]
        (conf / "zoo.cfg").write_text("\n".join(lines) + "\n")
        (conf / "log4j.properties").write_text(LOG4J.format(log=top / "zookeeper.log"))
        return conf / "zoo.cfg"

    def zk_mode(self, host: str) -> str | None:
        """'leader' or 'follower' while ``host``'s server serves, else None (asked from c1)."""
        answer = in_namespace(
            self.ns("c1"), lambda: four_letter(f"{self.ip(host)}:{ZK_PORT}", "srvr")
        )
        for line in answer.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def zk_leader(self) -> str | None:
        return next((h for h in ZK_HOSTS if self.zk_mode(h) == "leader"), None)

    def start_providers(self, timeout: float = 60.0) -> None:
        for host in PROVIDER_HOSTS:
            config = self.dir / f"{host}.ini"
            config.write_text(
                "[provider]\n"
                f"listen = tcp:{PROVIDER_PORT}:interface={self.ip(host)}\n"
                f"advertise = {self.provider_address(host)}\n"
                f"services = {SERVICES}\n"
                "grace_period = 2\n\n"
                "[registry]\nkind = zookeeper\n"
                f"hosts = {self.zk_hosts}\n"
                f"session_timeout = {self.session_timeout:g}\n"
            )
            self.spawn(host, host, [TWISTD, "-n", "--pidfile=", "mprpc", "--config", str(config)])
        deadline = time.monotonic() + timeout
        for host in PROVIDER_HOSTS:
            while self.tail(host, 200).count("registered /") < 2:
                if time.monotonic() > deadline or self._processes[host].poll() is not None:
                    raise RuntimeError(f"provider on {host} did not register: {self.tail(host)}")
                time.sleep(0.2)

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log(name)
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def consumer_config(self, timeout: float = 5.0) -> Path:
        """An ini file for the example callers, run from c1."""
        path = self.dir / "consumer.ini"
        path.write_text(
            f"[consumer]\ntimeout = {timeout:g}\n\n[registry]\nkind = zookeeper\n"
            f"hosts = {self.zk_hosts}\nsession_timeout = {self.session_timeout:g}\n"
        )
        return path

    # ------------------------------------------------------------ whole cluster

    def up(self) -> Cluster:
        """Network, ensemble, providers; everything made is undone if a step fails."""
        try:
            self.create_network()
            self.start_zookeeper()
            self.start_providers()
            self.consumer_config()
            self.save()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every process by PID, delete every namespace (and so its links), the temp
        dir and the state file."""
        for name in [n for n in self.pids if n not in ZK_HOSTS] + [*ZK_HOSTS]:
            self.stop(name)
        for ns in self.namespaces():
            run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        state_file(self.prefix).unlink(missing_ok=True)

    # ---------------------------------------------------- state (for the script)

    def save(self) -> None:
        state = {"prefix": self.prefix, "dir": str(self.dir), "subnet": self.subnet,
                 "session_timeout": self.session_timeout, "pids": self.pids,
                 "hosts": self.hosts}  # fmt: skip
        state_file(self.prefix).write_text(json.dumps(state, indent=1) + "\n")

    @classmethod
    def load(cls, prefix: str) -> Cluster:
        """The cluster ``up`` made with ``prefix`` (its PIDs too), from its state file."""
        path = state_file(prefix)
        if not path.exists():
            cluster = cls(prefix, base_dir=tempfile.mkdtemp(prefix=f"{prefix}-"))
            return cluster  # only its namespaces, if any, are left to delete
        state = json.loads(path.read_text())
        cluster = cls(prefix, state["dir"], state["subnet"], state["session_timeout"])
        cluster.pids = {k: int(v) for k, v in state["pids"].items()}
        cluster.hosts = list(state.get("hosts", cluster.hosts))
        return cluster


def state_file(prefix: str) -> Path:
    return Path(tempfile.gettempdir()) / f"netns-cluster-{prefix}.json"


def _waited(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """Whether ``pid`` is gone within ``timeout`` (reaped when it is our child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return True
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.05)
    return False
