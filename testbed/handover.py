"""Socket activation without systemd: hold a listening socket, hand it to
``twistd -n mprpc`` processes one after another as systemd would.

``HeldSocket`` binds 127.0.0.1:0 and listens (like a ``.socket`` unit);
``ActivatedProvider`` starts ``twistd`` through this module run as a
program, which puts the descriptor at 3, sets ``LISTEN_FDS=1``,
``LISTEN_PID`` to its own pid and ``LISTEN_FDNAMES`` (systemd names an
unnamed socket after its unit; Twisted ignores ``LISTEN_FDS`` without
names), then execs twistd, keeping that pid::

    python -m testbed.handover FD NAME -- twistd -n --pidfile= mprpc --config p.ini

``systemd-socket-activate`` (Debian's systemd package) also speaks the
protocol, but it execs its child in place on the first connection, so the
socket does not outlive the child: it cannot show a restart. Given the held
socket (``launcher``), it passes it on as systemd does (``--fdname``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from testbed.processes import ROOT, TWISTD, environment

SD_LISTEN_FDS_START = 3


class HeldSocket:
    """A listening socket on a free 127.0.0.1 port, held open by the test."""

    def __init__(self, backlog: int = 1024) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


class ActivatedProvider:
    """``twistd -n mprpc --config <config>`` serving on ``held`` (``systemd:``
    endpoints in the config), up once its output says ``ready``."""

    def __init__(
        self,
        held: HeldSocket,
        config: Path,
        name: str = "mprpc-provider.socket",
        ready: str = "provider listening on",
        launcher: tuple[str, ...] = (),
    ) -> None:
        """``launcher``: a program (and its arguments) run with the socket,
        that runs twistd in turn (``systemd-socket-activate --fdname=rpc``)."""
        fd = held.sock.fileno()
        argv = [sys.executable, "-m", "testbed.handover", str(fd), name, "--", *launcher]
        argv += [TWISTD, "-n", "--pidfile=", "mprpc", "--config", str(config)]
        self.lines: list[str] = []
        self.ready_text = ready
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=environment(),
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.pid = self.process.pid
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if self.ready_text in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until it serves; stop it and raise if it does not."""
        if not self._ready.wait(timeout) or self.ready_text not in self.output:
            self.stop()
            raise RuntimeError("provider did not start:\n" + self.output)

    @property
    def output(self) -> str:
        return "".join(self.lines)

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


def main(argv: list[str]) -> None:
    """``FD NAME -- PROGRAM ARGS...``: descriptor FD at 3, systemd's variables
    for this pid, then exec PROGRAM (the pid stays the same)."""
    fd, name, dashes, *program = argv
    if dashes != "--" or not program:
        raise SystemExit("usage: python -m testbed.handover FD NAME -- PROGRAM ARGS...")
    held = int(fd)
    if held != SD_LISTEN_FDS_START:
        os.dup2(held, SD_LISTEN_FDS_START)  # (dup2's copy is inheritable)
        os.close(held)
    else:
        os.set_inheritable(held, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDNAMES"] = name
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
