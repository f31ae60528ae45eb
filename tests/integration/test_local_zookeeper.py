"""``twisted_rpc.testing.local_zookeeper()`` and the pytest plugin's
fixture: a real ZooKeeper started, used by kazoo, stopped by its PID."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from twisted_rpc import testing
from twisted_rpc.testing import ZooKeeperNotInstalled, local_zookeeper

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _zookeepers_on(port: int) -> list[int]:
    """PIDs of the ZooKeeper JVMs local_zookeeper started whose config says ``port``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cfgs = [a.decode() for a in argv if b"twisted_rpc-zk-" in a and a.endswith(b"zoo.cfg")]
        for cfg in cfgs:
            try:
                if f"clientPort={port}\n" in Path(cfg).read_text():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_local_zookeeper_serves_kazoo_and_is_stopped_by_pid_even_after_an_error():
    with pytest.raises(RuntimeError, match="the test failed"):
        with local_zookeeper() as hosts:
            host, _, port = hosts.partition(":")
            assert host == "127.0.0.1" and port.isdigit()
            (pid,) = _zookeepers_on(int(port))
            zk = KazooClient(hosts=hosts, timeout=10)
            zk.start(timeout=30)
            try:
                zk.create("/twisted_rpc/probe", b"here", makepath=True)
                assert zk.get("/twisted_rpc/probe")[0] == b"here"
            finally:
                zk.stop()
                zk.close()
            raise RuntimeError("the test failed")
    assert _gone(pid)
    assert testing.four_letter(int(port), "ruok") == ""


def test_without_zookeeper_installed_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(testing, "ZOOKEEPER_JAR", tmp_path / "zookeeper.jar")
    with pytest.raises(ZooKeeperNotInstalled, match="apt-get install zookeeper"):
        with local_zookeeper():
            pass  # pragma: no cover
    monkeypatch.setattr(testing, "ZOOKEEPER_JAR", Path(__file__))
    monkeypatch.setattr(testing.shutil, "which", lambda name: None)
    with pytest.raises(ZooKeeperNotInstalled, match="no java is on PATH"):
        with local_zookeeper():
            pass  # pragma: no cover


def test_the_pytest_plugin_gives_a_session_zookeeper(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["twisted_rpc.pytest_plugin"]\n')
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            from kazoo.client import KazooClient

            from tests.integration.test_local_zookeeper import _zookeepers_on

            def test_one(local_zookeeper):
                zk = KazooClient(hosts=local_zookeeper, timeout=10)
                zk.start(timeout=30)
                try:
                    zk.ensure_path("/mine")
                    assert zk.exists("/mine")
                finally:
                    zk.stop()
                    zk.close()
                port = int(local_zookeeper.rsplit(":", 1)[1])
                print("SERVER", port, *_zookeepers_on(port))

            def test_two_shares_it(local_zookeeper):
                assert local_zookeeper.startswith("127.0.0.1:")
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("SERVER")]
    _, port, pid = line.split()  # one JVM for the session
    assert _gone(int(pid))  # stopped by its PID at the session's end
    assert testing.four_letter(int(port), "ruok") == ""
