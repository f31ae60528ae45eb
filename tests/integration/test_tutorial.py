"""docs/tutorial.md, done as a new user would: the package installed from a
built wheel into a fresh virtualenv, the tutorial's files (its code blocks,
taken from the page, so the page cannot rot) written into a temporary
directory outside this checkout, protoc run, the provider started with
twistd and stopped by PID, the client run, the user's MemoryProvider test run
with pytest, and mypy --strict over the user's code; then the same client
finding the provider through the page's ZooKeeper (``local_zookeeper()``).

The wheel is built once per state of the sources and the dependencies' wheels
once per state of the project's venv, both kept under
``$TWISTED_RPC_TEST_CACHE`` (default: the temp directory's
``twisted_rpc-tutorial``): the first run fetches the dependencies' wheels with
pip (the versions installed here); later runs are offline.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from twisted_rpc.testing import free_ports, zookeeper_missing

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "tutorial.md"
CACHE = Path(
    os.environ.get("TWISTED_RPC_TEST_CACHE", Path(tempfile.gettempdir()) / "twisted_rpc-tutorial")
)
# What the wheel is built from (setup.cfg's packages and package_data).
WHEEL_SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "twisted_rpc", "twisted/plugins")
# What the tutorial installs beside the package (step 1), and the extra.
USER_PACKAGES = ("pytest", "types-protobuf")
_BLOCK = re.compile(r"^```(\w*)(?: (\S+))?\n(.*?)^```\n", re.M | re.S)
_LISTENING = re.compile(r"provider listening on 127\.0\.0\.1:(\d+)")


def _blocks() -> list[tuple[str, str, str]]:
    """(language, file name or "", text) of each fenced block of the tutorial."""
    return [(m[1], m[2] or "", m[3]) for m in _BLOCK.finditer(DOC.read_text())]


def _command(prefix: str) -> list[str]:
    """The tutorial's shell command that starts with ``prefix``, split as sh would."""
    for language, _, text in _blocks():
        for line in text.splitlines() if language == "sh" else ():
            if line.startswith(prefix):
                return shlex.split(line)
    raise AssertionError(f"docs/tutorial.md has no command starting {prefix!r}")


def _hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _source_files() -> list[Path]:
    files: list[Path] = []
    for name in WHEEL_SOURCES:
        path = ROOT / name
        found = [path] if path.is_file() else path.rglob("*")
        files += [p for p in found if p.is_file() and "__pycache__" not in p.parts]
    return files


def _pip(*args: str) -> None:
    # Without this checkout on the path: pip would take its metadata
    # (twisted_rpc.egg-info, left by `pip install .`) as the package installed.
    subprocess.run(
        [sys.executable, "-m", "pip", *args], check=True, timeout=600, env=_environment()
    )


def _wheel() -> Path:
    """twisted_rpc's wheel, built from a copy of the sources (no build/ or
    egg-info left in the checkout), reused while they are unchanged."""
    files = _source_files()
    out = CACHE / f"wheel-{_hash(files)}"
    if not out.is_dir():
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            source = Path(work) / "src"
            for path in files:
                target = source / path.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            built = Path(work) / "wheel"
            _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(built), str(source))
            built.rename(out)  # whole or not at all: a run cut short builds again
    (wheel,) = out.glob("twisted_rpc-*.whl")
    return wheel


def _wheelhouse(wheel: Path) -> Path:
    """The dependencies' wheels, at the versions this venv has installed."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pins = "".join(line + "\n" for line in frozen.splitlines() if "==" in line)
    pins = "".join(line + "\n" for line in pins.splitlines() if not line.startswith("twisted"))
    pins += "".join(line + "\n" for line in frozen.splitlines() if line.startswith("Twisted=="))
    house = CACHE / f"wheelhouse-{hashlib.sha256(pins.encode()).hexdigest()[:16]}"
    if not (house / "complete").exists():
        house.mkdir(parents=True, exist_ok=True)
        (house / "constraints.txt").write_text(pins)
        _pip(
            "wheel", "-q", "-w", str(house), "--find-links", str(house),
            "-c", str(house / "constraints.txt"), f"{wheel}[protoc]", *USER_PACKAGES,
        )  # fmt: skip
        for own in house.glob("twisted_rpc-*.whl"):
            own.unlink()  # the package comes from _wheel(), always
        (house / "complete").write_text("")
    return house


def _environment() -> dict[str, str]:
    """The user's environment: nothing of this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the built wheel and the tutorial's packages,
    installed from the local wheels only."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wheel = _wheel()
    house = _wheelhouse(wheel)
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    _pip(
        "--isolated", "--python", str(env / "bin" / "python"), "install", "-q", "--no-index",
        "--find-links", str(house), f"{wheel}[protoc]", *USER_PACKAGES,
    )  # fmt: skip
    return env


class _Provider:
    """``twistd`` from the user's venv in the user's project, stopped by PID."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match:
                self.port = int(match[1])
                self._ready.set()
        self._ready.set()

    def wait_listening(self, timeout: float) -> int:
        self._ready.wait(timeout)
        assert self.port is not None, "provider did not start:\n" + "".join(self.lines)
        return self.port

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def _run(command: list[str], cwd: Path, timeout: float = 120) -> str:
    run = subprocess.run(
        command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, f"{shlex.join(command)}: {run.returncode}\n{run.stdout}{run.stderr}"
    return run.stdout


def _write_project(project: Path) -> None:
    (setup,) = [t for lang, _, t in _blocks() if lang == "sh" and "touch myshop/" in t]
    lines = [line for line in setup.splitlines() if line.startswith("mkdir -p myshop")]
    subprocess.run(["sh", "-c", lines[0]], cwd=project, check=True)
    for _, name, text in _blocks():
        if name:
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            (project / name).write_text(text)


def _expected_client_output() -> str:
    """The block right after the client's command: what it prints."""
    blocks = _blocks()
    for i, (language, _, text) in enumerate(blocks):
        if language == "sh" and text.startswith("python -m myshop.client consumer.ini"):
            return blocks[i + 1][2]
    raise AssertionError("docs/tutorial.md shows no output of the client")


def test_the_tutorial_from_a_built_wheel(venv: Path, tmp_path: Path) -> None:
    bin_ = venv / "bin"
    project = tmp_path / "shop"
    project.mkdir()
    _write_project(project)

    protoc = _command("python -m twisted_rpc.protoc")
    _run([str(bin_ / "python"), *protoc[1:]], project)
    assert (project / "myshop" / "protos" / "shop_rpc.py").exists()
    assert not (project / "myshop" / "protos" / "money_rpc.py").exists()

    # The tutorial's port, 7100, may be taken here: port 0, the one it got.
    ini = project / "provider.ini"
    ini.write_text(ini.read_text().replace("tcp:7100:", "tcp:0:"))
    twistd = _command("twistd -n --pidfile= mprpc")
    assert twistd[-2:] == ["--config", "provider.ini"]
    provider = _Provider([str(bin_ / "twistd"), *twistd[1:]], project)
    try:
        port = provider.wait_listening(60)
        consumer = project / "consumer.ini"
        consumer.write_text(consumer.read_text().replace(":7100", f":{port}"))
        client = _command("python -m myshop.client")
        printed = _run([str(bin_ / "python"), *client[1:]], project, timeout=60)
    finally:
        provider.stop()
    assert printed == _expected_client_output()
    assert "Traceback" not in "".join(provider.lines), "".join(provider.lines)

    pytest_command = _command("python -m pytest")
    tests = _run(
        [str(bin_ / "python"), *pytest_command[1:], "-q", "-p", "no:cacheprovider"], project
    )
    assert re.search(r"\b3 passed\b", tests), tests

    # mypy from this venv, over the user's venv's packages (mypy.ini: --strict).
    mypy = _command("mypy ")
    checked = _run(
        [sys.executable, "-m", "mypy", "--python-executable", str(bin_ / "python"), *mypy[1:]]
        + ["--cache-dir", str(tmp_path / "mypy-cache")],
        project,
        timeout=300,
    )
    assert "Success: no issues found" in checked, checked


def test_the_tutorial_with_zookeeper(venv: Path, tmp_path: Path) -> None:
    """Step 7: the page's zookeeper.py (local_zookeeper() until Ctrl-C), a
    provider that registers in it, the client finding it there."""
    missing = zookeeper_missing()
    if missing is not None:
        pytest.skip(missing)
    bin_ = venv / "bin"
    project = tmp_path / "shop"
    project.mkdir()
    _write_project(project)
    _run([str(bin_ / "python"), *_command("python -m twisted_rpc.protoc")[1:]], project)
    zookeeper = subprocess.Popen(
        [str(bin_ / "python"), *_command("python zookeeper.py")[1:]],
        cwd=project,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    provider = None
    try:
        assert zookeeper.stdout is not None
        first = zookeeper.stdout.readline()  # blocks until the server serves (or the script ends)
        hosts = re.search(r"ZooKeeper serving on (127\.0\.0\.1:\d+)", first)
        assert hosts, first + zookeeper.stdout.read()
        (port,) = free_ports(1)
        for name in ("provider-zk.ini", "consumer-zk.ini"):
            ini = project / name
            text = ini.read_text().replace("127.0.0.1:2181", hosts[1])
            ini.write_text(text.replace("7100", str(port)))
        twistd = _command("twistd -n --pidfile= mprpc --config provider-zk.ini")
        provider = _Provider([str(bin_ / "twistd"), *twistd[1:]], project)
        provider.wait_listening(60)
        client = _command("python -m myshop.client consumer-zk.ini")
        printed = _run([str(bin_ / "python"), *client[1:]], project, timeout=60)
        assert printed == _expected_client_output()
    finally:
        if provider is not None:
            provider.stop()
        if zookeeper.poll() is None:
            os.kill(zookeeper.pid, signal.SIGINT)  # Ctrl-C: the JVM is stopped by its PID
            try:
                zookeeper.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(zookeeper.pid, signal.SIGKILL)
                zookeeper.wait(10)
    assert zookeeper.returncode == 0
