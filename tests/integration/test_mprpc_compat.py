"""Integration: the mprpc-compatible listener and CppClient, through a real ZooKeeper
in the C++ layout (``/<Service>/<Method>``), against real ``twistd`` providers."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from kazoo.security import make_acl
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from examples.mprpc_compat import user_pb2
from testbed.echo_service import ECHO
from testbed.processes import ROOT, Provider, environment
from testbed.protos import echo_pb2
from tests.unit.cpp.test_mprpc_wire import LOGIN, LOGIN_REPLY, REGISTER
from twisted_rpc import DeadlineExceededError, MethodInfo, UnavailableError
from twisted_rpc.cpp import CppClient, RequestReader
from twisted_rpc.cpp._client import DEFAULT_TIMEOUT

pytestmark = pytest.mark.integration

SERVICES = "testbed.echo_service:EchoService examples.mprpc_compat.callee:UserServiceRpc"
USER = user_pb2.DESCRIPTOR.services_by_name["UserServiceRpc"]


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_call(port: int, data: bytes, piece: int = 1) -> bytes:
    """What a C++ caller does, but writing ``piece`` bytes at a time; reads to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), piece):
            s.sendall(data[i : i + piece])
            time.sleep(0.002)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


class CppProvider:
    """A C++ mprpc provider (muduo) emulated on raw sockets, on 127.0.0.1.

    It answers the methods in ``replies`` with their bytes and shuts its side
    down, as RpcProvider::SendRpcResponse does; for any other method it only
    logs (``std::cout``), as RpcProvider::OnMessage does, and leaves the
    connection open: no reply, no close. ``requests`` holds the bytes of each
    request; ``closed_by_caller`` counts connections the caller closed.
    """

    def __init__(self, replies: dict[str, bytes], port: int = 0) -> None:
        self.replies = replies
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.closed_by_caller = 0
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        reader = RequestReader(1 << 20)
        received = b""
        with conn:
            while not self._stopping.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    data = b""  # an aborted connection: closed as well
                if not data:
                    self.closed_by_caller += 1
                    return
                received += data
                request = reader.feed(data)
                if request is None:
                    continue
                self.requests.append(received)
                reply = self.replies.get(request.method)
                if reply is not None:
                    conn.sendall(reply)
                    conn.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stopping.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


OPEN_NO_ADMIN = make_acl("world", "anyone", read=True, write=True, create=True, delete=True)


class MprpcCompatTests(TestCase):
    timeout = 120

    @pytest.fixture(autouse=True)
    def _zookeeper(self, zookeeper_server):
        self.zk = zookeeper_server

    def setUp(self) -> Deferred:
        # Each test gets its own chroot: the C++ layout has no root of its own.
        self.chroot = f"/mprpc-compat-{uuid.uuid4().hex[:8]}"
        self.hosts = f"{self.zk.hosts}{self.chroot}"
        return Deferred.fromCoroutine(self._make_chroot())

    async def _make_chroot(self) -> None:
        kz = KazooClient(hosts=self.zk.hosts)
        await deferToThread(kz.start, 30)
        await deferToThread(kz.ensure_path, self.chroot)
        self.kz = KazooClient(hosts=self.hosts)
        await deferToThread(self.kz.start, 30)
        for client in (kz, self.kz):
            self.addCleanup(deferToThread, lambda c=client: (c.stop(), c.close()))

    def provider(self, cpp_listen: str = "tcp:0:interface=127.0.0.1", session=2) -> Provider:
        extra = (
            f"[registry]\nkind = static\nhosts = {self.hosts}\nsession_timeout = {session}\n"
            f"[mprpc]\nlisten = {cpp_listen}\nzookeeper = yes\n"
        )
        provider = Provider(Path(tempfile.mkdtemp()), extra, services=SERVICES)
        self.addCleanup(provider.stop)
        return provider

    def client(self, **kw) -> CppClient:
        client = CppClient(reactor, zookeeper=self.hosts, session_timeout=2, **kw)
        self.addCleanup(client.close)
        return client

    async def node(self, path: str, timeout: float = 15, data: bytes | None = None):
        """``(data, stat)`` of ``path`` once it exists (with ``data``, if given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value, stat = await deferToThread(self.kz.get, path)
            except NoNodeError:  # not yet, or deleted and not created again yet
                pass
            else:
                if data is None or value == data:
                    return value, stat
            await sleep(0.05)
        self.fail(f"{path} {'= ' + repr(data) if data else ''} not there within {timeout}s")

    async def replaced(self, path: str, data: bytes, old_owner: int, timeout: float):
        """The stat of ``path`` once a session other than ``old_owner`` holds it."""
        deadline = time.monotonic() + timeout
        _, stat = await self.node(path, timeout=timeout, data=data)
        while stat.ephemeralOwner == old_owner and time.monotonic() < deadline:
            await sleep(0.1)
            _, stat = await self.node(path, data=data)
        self.assertNotEqual(stat.ephemeralOwner, old_owner, f"{path} was not re-created")
        return stat

    async def registered(self, **kw) -> tuple[Provider, int]:
        provider = self.provider(**kw)
        port = await deferToThread(lambda: provider.mprpc_port)
        await self.node("/EchoService/Echo", data=f"127.0.0.1:{port}".encode())
        return provider, port

    # ------------------------------------------------------------------ tests

    async def test_python_consumer_calls_python_compat_listener_through_zookeeper(self) -> None:
        provider, port = await self.registered()
        address = f"127.0.0.1:{port}".encode()
        for method in ("Login", "Register"):
            data, stat = await self.node(f"/UserServiceRpc/{method}", data=address)
            self.assertNotEqual(stat.ephemeralOwner, 0)
            acl, _ = await deferToThread(self.kz.get_acls, f"/UserServiceRpc/{method}")
            # Open as the C++ side expects, but nobody may change the ACL (no ADMIN).
            self.assertEqual(list(acl), [OPEN_NO_ADMIN])
        data, stat = await deferToThread(self.kz.get, "/UserServiceRpc")
        self.assertEqual((data, stat.ephemeralOwner), (b"", 0))  # persistent and empty
        top = await deferToThread(self.kz.get_children, "/")
        self.assertEqual(sorted(top), ["EchoService", "UserServiceRpc"])  # no built-ins
        user = self.client(timeout=10).proxy(USER)
        login = await user.Login(user_pb2.LoginRequest(name=b"zhang san", pwd=b"123456"))
        self.assertEqual(login.SerializeToString(), bytes.fromhex("0a00"))
        register = await user.Register(
            user_pb2.RegisterRequest(id=2000, name=b"mprpc", pwd=b"666666")
        )
        self.assertTrue(register.sucess)
        self.assertEqual(register.SerializeToString(), bytes.fromhex("0a001001"))
        # The original's request bytes, arriving one byte per write, get the original's reply.
        reply = await deferToThread(raw_call, port, LOGIN, 1)
        self.assertEqual(reply, LOGIN_REPLY)

    async def test_unknown_method_is_a_typed_failure_not_a_hang(self) -> None:
        """A Python provider closes at once; a C++ one stays silent (see _cpp_silent)."""
        provider, port = await self.registered()
        unknown = MethodInfo(
            "mprpc.test.EchoService", "Nope", b"", echo_pb2.EchoRequest, echo_pb2.EchoReply
        )
        request = echo_pb2.EchoRequest(payload=b"?")
        started = time.monotonic()
        with self.assertRaises(UnavailableError) as through_zk:
            await self.client(timeout=10).call(unknown, request)
        self.assertIn("/EchoService/Nope", str(through_zk.exception))
        # Straight to the listener (no ZooKeeper node to miss): closed without a reply.
        direct = CppClient(reactor, providers={"EchoService": f"127.0.0.1:{port}"}, timeout=10)
        with self.assertRaises(UnavailableError) as closed:
            await direct.call(unknown, request)
        self.assertIn("without a reply", str(closed.exception))
        self.assertLess(time.monotonic() - started, 5)  # typed failures, not the deadline
        line = await deferToThread(provider.wait_for_output, "unknown method 'Nope'")
        self.assertIsNotNone(line)

    async def test_provider_killed_mid_call(self) -> None:
        provider, _ = await self.registered()
        echo = self.client(timeout=30).proxy(ECHO)
        self.assertEqual((await echo.Echo(echo_pb2.EchoRequest(payload=b"up"))).pid, provider.pid)
        call = echo.AsyncEcho(echo_pb2.EchoRequest(delay=60))
        await sleep(0.5)
        started = time.monotonic()
        provider.signal(signal.SIGKILL)
        with self.assertRaises(UnavailableError):
            await call
        self.assertLess(time.monotonic() - started, 5)

    async def test_reply_over_1024_bytes_works_and_is_logged(self) -> None:
        provider, _ = await self.registered()
        echo = self.client(timeout=10).proxy(ECHO)
        reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"z" * 5000))
        self.assertEqual(reply.payload, b"z" * 5000)
        warning = await deferToThread(provider.wait_for_output, r"reply of \d+ bytes.*1024")
        self.assertIn("EchoService/Echo", warning.string[warning.start() - 200 : warning.end()])

    async def test_stale_node_of_a_dead_session_is_replaced(self) -> None:
        number = free_port()
        listen = f"tcp:{number}:interface=127.0.0.1"
        first = self.provider(cpp_listen=listen, session=10)
        address = f"127.0.0.1:{number}".encode()
        _, stale = await self.node("/EchoService/Echo", data=address)
        first.signal(signal.SIGKILL)
        await deferToThread(first.wait, 10)
        second = self.provider(cpp_listen=listen, session=10)
        self.assertEqual(await deferToThread(lambda: second.mprpc_port), number)
        # The dead session's node would stay for 10 s; it is replaced at once.
        await self.replaced("/EchoService/Echo", address, stale.ephemeralOwner, timeout=6)
        reply = await self.client(timeout=10).proxy(ECHO).Echo(echo_pb2.EchoRequest())
        self.assertEqual(reply.pid, second.pid)

    async def test_standby_provider_takes_over_the_node(self) -> None:
        first, first_port = await self.registered()
        second = self.provider()
        second_port = await deferToThread(lambda: second.mprpc_port)
        await deferToThread(second.wait_for_output, "/EchoService/Echo is held by")
        echo = self.client(timeout=10).proxy(ECHO)
        self.assertEqual((await echo.Echo(echo_pb2.EchoRequest())).pid, first.pid)
        await deferToThread(first.stop)  # graceful: its nodes are deleted first
        await self.node("/EchoService/Echo", data=f"127.0.0.1:{second_port}".encode())
        deadline = time.monotonic() + 5
        pids = set()
        while second.pid not in pids and time.monotonic() < deadline:
            try:
                pids.add((await echo.Echo(echo_pb2.EchoRequest())).pid)
            except UnavailableError:
                await sleep(0.05)
        self.assertIn(second.pid, pids)  # the consumer's watch saw the new address
        self.assertNotEqual(first_port, second_port)

    async def test_reregistered_after_session_expiry(self) -> None:
        provider, port = await self.registered()
        _, before = await self.node("/EchoService/Echo")
        provider.signal(signal.SIGSTOP)
        try:
            await sleep(5)  # more than the 2 s session: ZooKeeper expires it
        finally:
            provider.signal(signal.SIGCONT)
        address = f"127.0.0.1:{port}".encode()
        await self.replaced("/EchoService/Echo", address, before.ephemeralOwner, timeout=15)
        reply = await self.client(timeout=10).proxy(ECHO).Echo(echo_pb2.EchoRequest())
        self.assertEqual(reply.pid, provider.pid)

    async def test_provider_and_caller_from_one_cpp_config_file(self) -> None:
        """Provider and caller both from one C++ key=value file, through ZooKeeper's root."""
        port = free_port()
        zk_host, zk_port = self.zk.hosts.split(",")[0].rsplit(":", 1)
        directory = Path(tempfile.mkdtemp())
        conf = directory / "test.conf"
        conf.write_text(
            f"rpcserverip=127.0.0.1\nrpcserverport={port}\n"
            f"zookeeperip={zk_host}\nzookeeperport={zk_port}\n"
        )
        provider = Provider(
            directory,
            args=[
                "--mprpc-config",
                str(conf),
                "--service",
                "examples.mprpc_compat.callee:UserServiceRpc",
            ],
            ready="mprpc-compatible listener on",
        )
        self.addCleanup(provider.stop)
        root = KazooClient(hosts=self.zk.hosts)
        await deferToThread(root.start, 30)
        self.addCleanup(deferToThread, lambda: (root.stop(), root.close()))
        deadline = time.monotonic() + 15
        data = None
        while time.monotonic() < deadline:
            if await deferToThread(root.exists, "/UserServiceRpc/Register"):
                data, _ = await deferToThread(root.get, "/UserServiceRpc/Register")
                if data == f"127.0.0.1:{port}".encode():
                    break
            await sleep(0.05)
        self.assertEqual(data, f"127.0.0.1:{port}".encode())
        caller = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "examples.mprpc_compat.caller", "--mprpc-config", str(conf)],
            cwd=ROOT,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(caller.returncode, 0, caller.stderr)
        self.assertEqual(
            caller.stdout.splitlines(),
            ["rpc login response success: False", "rpc register response success: True"],
        )
        await deferToThread(provider.stop)  # graceful: its nodes go at once
        self.assertIsNone(await deferToThread(root.exists, "/UserServiceRpc/Login"))

    async def test_cpp_config_with_a_chroot_in_the_port_and_a_duplicate_key(self) -> None:
        """A C++ config file with the chroot in zookeeperport and a key given twice,
        read as the C++ code reads it, by a Python provider and CppClient."""
        port = free_port()
        zk_host, zk_port = self.zk.hosts.split(",")[0].rsplit(":", 1)
        directory = Path(tempfile.mkdtemp())
        conf = directory / "test.conf"
        conf.write_text(
            f"rpcserverip=127.0.0.1\nrpcserverport={port}\n"
            f"zookeeperip={zk_host}\nzookeeperport={zk_port}{self.chroot}\n"
            f"# the C++ reader keeps a key's first value\nzookeeperport={free_port()}\n"
        )
        provider = Provider(
            directory,
            args=[
                "--mprpc-config",
                str(conf),
                "--service",
                "examples.mprpc_compat.callee:UserServiceRpc",
            ],
            ready="mprpc-compatible listener on",
        )
        self.addCleanup(provider.stop)
        # Where a C++ provider and caller given this file register and look:
        # zookeeper_init("ip:port/chroot") works under the chroot.
        address = f"127.0.0.1:{port}".encode()
        await self.node("/UserServiceRpc/Login", data=address)
        warning = await deferToThread(provider.wait_for_output, "zookeeperport given again")
        self.assertIsNotNone(warning)
        client = CppClient.from_cpp_config(str(conf), reactor, session_timeout=2)
        self.addCleanup(client.close)
        login = await client.proxy(USER).Login(user_pb2.LoginRequest(name=b"zhang san"))
        self.assertEqual(login.SerializeToString(), LOGIN_REPLY)

    def cpp_provider(self, replies: dict[str, bytes], port: int = 0) -> CppProvider:
        cpp = CppProvider(replies, port)
        self.addCleanup(deferToThread, cpp.stop)
        return cpp

    async def cpp_node(self, path: str, port: int) -> None:
        """``path`` held as a C++ provider holds it: ephemeral, ``ip:port``, open ACL."""
        if await deferToThread(self.kz.exists, path):
            await deferToThread(self.kz.delete, path)
        data = f"127.0.0.1:{port}".encode()
        await deferToThread(self.kz.create, path, data, ephemeral=True, makepath=True)

    async def test_cpp_provider_silent_on_an_unknown_method_ends_at_the_default_deadline(
        self,
    ) -> None:
        # The C++ provider serves Login; Register's node leads to it too (an older
        # build now runs at the address the node names), and it does not know Register.
        cpp = self.cpp_provider({"Login": LOGIN_REPLY})
        for method in ("Login", "Register"):
            await self.cpp_node(f"/UserServiceRpc/{method}", cpp.port)
        user = self.client().proxy(USER)  # no timeout given: the default applies
        login = await user.Login(user_pb2.LoginRequest(name=b"zhang san", pwd=b"123456"))
        self.assertEqual(login.SerializeToString(), LOGIN_REPLY)
        started = time.monotonic()
        with self.assertRaises(DeadlineExceededError):
            await user.Register(user_pb2.RegisterRequest(id=2000, name=b"mprpc", pwd=b"666666"))
        elapsed = time.monotonic() - started
        self.assertGreater(elapsed, DEFAULT_TIMEOUT - 0.5)
        self.assertLess(elapsed, DEFAULT_TIMEOUT + 5)
        self.assertEqual(cpp.requests, [LOGIN, REGISTER])
        deadline = time.monotonic() + 5
        while cpp.closed_by_caller < 1 and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertEqual(cpp.closed_by_caller, 1)  # the caller closed the silent connection

    async def test_calls_to_a_crashed_cpp_providers_lingering_node_fail_fast(self) -> None:
        # A crashed C++ provider's node lingers for its session (30 s): a closed port.
        port = free_port()
        await self.cpp_node("/UserServiceRpc/Login", port)
        login = self.client().proxy(USER).Login
        request = user_pb2.LoginRequest(name=b"zhang san", pwd=b"123456")
        calls = 20
        started = time.monotonic()
        for _ in range(calls):
            with self.assertRaises(UnavailableError):
                await login(request)
        elapsed = time.monotonic() - started
        # Each used to wait HostnameEndpoint's 0.3 s attempt delay: 6 s for 20.
        self.assertLess(elapsed, 2.0, f"{calls} refused calls took {elapsed:.2f} s")
        # Restarted at the same address, it re-creates its node: calls reach it at
        # once (the refused address is forgotten when the node changes).
        cpp = self.cpp_provider({"Login": LOGIN_REPLY}, port=port)
        await self.cpp_node("/UserServiceRpc/Login", port)
        deadline = time.monotonic() + 10
        reply = None
        while reply is None and time.monotonic() < deadline:
            try:
                reply = await login(request)
            except UnavailableError:
                await sleep(0.02)
        self.assertIsNotNone(reply, "no reply from the restarted provider")
        self.assertEqual(reply.SerializeToString(), LOGIN_REPLY)
        self.assertEqual(cpp.requests, [LOGIN])


def test_example_from_a_cpp_config_file(tmp_path):
    """The README's commands: a provider from a C++ key=value file, the example caller."""
    port = free_port()
    conf = tmp_path / "test.conf"
    conf.write_text(f"# no ZooKeeper here\nrpcserverip=127.0.0.1\nrpcserverport={port}\n")
    provider = Provider(
        tmp_path,
        args=[
            "--mprpc-config",
            str(conf),
            "--service",
            "examples.mprpc_compat.callee:UserServiceRpc",
        ],
        ready="mprpc-compatible listener on",
    )
    try:
        caller = subprocess.run(
            [
                sys.executable,
                "-m",
                "examples.mprpc_compat.caller",
                "--provider",
                f"127.0.0.1:{port}",
            ],
            cwd=ROOT,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        provider.stop()
    assert caller.returncode == 0, caller.stderr
    assert caller.stdout.splitlines() == [
        "rpc login response success: False",
        "rpc register response success: True",
    ]
    assert f"listener on 127.0.0.1:{port}" in provider.output
