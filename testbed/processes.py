"""Real ``twistd -n mprpc`` processes for integration tests, always stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
SERVICES = (
    "testbed.echo_service:EchoService examples.user.callee:UserService "
    "examples.friend.callee:FriendService"
)
_LISTENING = re.compile(r"provider listening on 127\.0\.0\.1:(\d+)")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_twistd(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    """Run twistd to completion (for configs that must fail at start)."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", *args],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Provider:
    """A ``twistd -n mprpc`` subprocess on a free 127.0.0.1 port."""

    def __init__(
        self,
        config_dir: Path,
        extra: str = "",
        services: str = SERVICES,
        args: list[str] | None = None,
        ready: str = "provider listening on",
    ) -> None:
        """``args`` replace ``--config provider.ini`` (written from ``extra`` and ``services``);
        the provider is up when a line contains ``ready``."""
        self.config = Path(config_dir) / "provider.ini"
        self.config.write_text(
            f"[provider]\nlisten = tcp:0:interface=127.0.0.1\nservices = {services}\n{extra}\n"
        )
        self.ready_text = ready
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "mprpc", *(args or ["--config", str(self.config)])],
            cwd=ROOT,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.pid = self.process.pid
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(30) or self.ready_text not in self.output:
            self.stop()
            raise RuntimeError("provider did not start:\n" + self.output)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
            if self.ready_text in line:
                self._ready.set()
        self._ready.set()

    def wait_for_output(self, pattern: str, timeout: float = 15) -> re.Match:
        """The first match of ``pattern`` in the output, waiting for it up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match or time.monotonic() > deadline or self.process.poll() is not None:
                break
            time.sleep(0.02)
        if match is None:
            raise AssertionError(f"no {pattern!r} in the provider's output:\n{self.output}")
        return match

    @property
    def mprpc_port(self) -> int:
        """The port of the mprpc-compatible listener (``[mprpc] listen``)."""
        return int(self.wait_for_output(r"mprpc-compatible listener on 127\.0\.0\.1:(\d+)")[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: the process is gone when this returns."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            if self.wait(10) is None:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(10)
