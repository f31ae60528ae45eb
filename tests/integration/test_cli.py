"""Integration: the ``mprpc`` command against live providers, by endpoint and via ZooKeeper;
health during a drain; a reflection-only call from a process without the .proto modules."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testbed.processes import ROOT, Provider, environment
from tests.integration.test_zookeeper import ZooKeeperTestCase
from twisted_rpc import Client
from twisted_rpc.ops import NOT_SERVING, SERVING
from twisted_rpc.ops._protos import HEALTH, HealthWatchRequest

pytestmark = pytest.mark.integration

# The command as setup.cfg's console script runs it (tests/test_exports.py checks
# that the entry point names this function), from this checkout rather than
# from a script installed from another one.
MPRPC = [sys.executable, "-c", "from twisted_rpc.ops._cli import main; main()"]


def mprpc(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MPRPC, *args],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def provider():
    provider = Provider(Path(tempfile.mkdtemp()))
    yield provider
    provider.stop()


def test_list_by_endpoint(provider):
    done = mprpc("list", "--endpoint", provider.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "example.FriendService",
        "example.UserService",
        "mprpc.health.v1.Health",
        "mprpc.reflection.v1.Reflection",
        "mprpc.test.EchoService",
    ]


def test_describe_a_service_and_a_method(provider):
    done = mprpc("describe", "example.UserService", "--endpoint", provider.address)
    assert done.returncode == 0, done.stderr
    assert "rpc Login(example.LoginRequest) returns (example.LoginResponse);" in done.stdout
    assert "message example.ResultCode {\n  int32 errcode = 1;\n  string errmsg = 2;\n}" in (
        done.stdout
    )
    one = mprpc("describe", "mprpc.test.EchoService.Echo", "--endpoint", provider.address)
    assert "rpc AsyncEcho" not in one.stdout
    assert "map<string, string> metadata = 2;" in one.stdout


def test_call_with_a_json_body_and_headers(provider):
    done = mprpc(
        "call",
        "mprpc.test.EchoService.Echo",
        '{"payload": "aGk="}',
        "--endpoint",
        provider.address,
        "-H",
        "trace-id=abc",
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["payload"] == "aGk="  # b"hi", base64 in protobuf's JSON
    assert reply["metadata"] == {"trace-id": "abc"}
    assert int(reply["pid"]) == provider.pid


@pytest.mark.parametrize(
    "args, status, message",
    [
        (
            ("mprpc.test.EchoService.Echo", '{"fail_code": 5, "fail_message": "gone"}'),
            69,
            "mprpc: NOT_FOUND: gone",
        ),
        (("mprpc.test.EchoService.Echo", '{"fail_code": 7}'), 71, "mprpc: PERMISSION_DENIED"),
        (("mprpc.test.EchoService.NotImplemented", "{}"), 76, "mprpc: UNIMPLEMENTED"),
        (("mprpc.test.EchoService.Echo", '{"crash": true}'), 77, "mprpc: INTERNAL"),
        (("mprpc.test.EchoService.Echo", '{"nope": 1}'), 2, "mprpc: request is not a mprpc"),
        (
            ("mprpc.test.EchoService.Nope", "{}"),
            69,
            "mprpc: mprpc.test.EchoService has no method Nope",
        ),
        (("no.Such.Method", "{}"), 69, "mprpc: NOT_FOUND: no symbol 'no.Such'"),
    ],
)
def test_call_errors_exit_with_64_plus_the_code_and_one_line(provider, args, status, message):
    done = mprpc("call", *args, "--endpoint", provider.address)
    assert (done.returncode, done.stdout) == (status, "")
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1  # one line, no traceback


def test_usage_errors_are_clear():
    done = mprpc("call", "x.Y.Z")
    assert done.returncode == 2 and "give --zk HOSTS or --endpoint HOST:PORT" in done.stderr
    assert "Traceback" not in done.stderr
    for command in ("list", "describe", "call", "health"):
        helped = mprpc(command, "--help")
        assert helped.returncode == 0 and "--endpoint" in helped.stdout


def test_unreachable_endpoint_is_unavailable():
    done = mprpc("list", "--endpoint", "127.0.0.1:1", "--timeout", "2")
    assert done.returncode == 64 + 14 and done.stderr.startswith("mprpc: UNAVAILABLE")


def test_health_by_endpoint(provider):
    done = mprpc("health", "--endpoint", provider.address)
    assert (done.returncode, done.stdout.split()) == (
        0,
        [provider.address, "(provider)", "SERVING"],
    )
    unknown = mprpc("health", "no.Such", "--endpoint", provider.address)
    assert unknown.returncode == 1 and "SERVICE_UNKNOWN" in unknown.stdout


REFLECTION_ONLY = """
import sys
from twisted.internet import task
from twisted.internet.defer import Deferred
from google.protobuf import json_format
from twisted_rpc import Client
from twisted_rpc.ops import message_class, remote_service
from twisted_rpc import StaticRegistry

async def main(reactor):
    # One provider for every service, Reflection included.
    client = Client(reactor, discovery=StaticRegistry(default=[sys.argv[1]]), timeout=5)
    descriptor = await remote_service(client, "example.UserService", timeout=5)
    login = descriptor.methods_by_name["Login"]
    request = json_format.Parse('{"name": "zhang san", "pwd": "123456"}',
                                message_class(login.input_type)())
    reply = await client.proxy(descriptor).Login(request)
    assert not [m for m in sys.modules if m.startswith(("protos", "examples"))], "imported"
    print(json_format.MessageToJson(reply, indent=None))
    await client.close()

task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
"""


def test_reflection_only_call_without_the_proto_modules(provider):
    done = subprocess.run(
        [sys.executable, "-c", REFLECTION_ONLY, provider.address],
        cwd=tempfile.mkdtemp(),  # nothing of the checkout's on the path but the package
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"result": {}, "success": True}


class DrainTests(TestCase):
    timeout = 60

    async def test_health_turns_not_serving_when_draining(self) -> None:
        provider = Provider(Path(tempfile.mkdtemp()), "grace_period = 5\n")
        self.addCleanup(provider.stop)
        client = Client(reactor, providers={HEALTH.full_name: [provider.address]}, timeout=20)
        self.addCleanup(client.close)
        health = client.proxy(HEALTH)
        watch = health.Watch(HealthWatchRequest(last_status=SERVING, max_wait=15))
        await deferToThread(provider.wait_for_output, "Health/Watch|listening", 5)
        await Deferred.fromCoroutine(_sleep(0.3))
        self.assertFalse(watch.called)
        provider.signal(signal.SIGTERM)
        reply = await watch
        self.assertEqual(reply.status, NOT_SERVING)


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


class ZooKeeperCliTests(ZooKeeperTestCase):
    async def test_list_describe_call_health_through_zookeeper(self) -> None:
        provider = await self.registered(extra="weight = 7\n")
        hosts = ["--zk", self.zk.hosts, "--root", self.root]
        listed = await deferToThread(mprpc, "list", *hosts)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        lines = listed.stdout.splitlines()
        self.assertIn("mprpc.test.EchoService", lines)
        self.assertNotIn("mprpc.health.v1.Health", lines)  # built-ins are not announced
        row = lines[lines.index("mprpc.test.EchoService") + 1].split()
        self.assertEqual(row[0], f"127.0.0.1:{provider.port}")
        self.assertEqual(row[1:3], ["weight=7", "version=0.1.0"])
        self.assertRegex(row[3], r"uptime=\d+s")
        described = await deferToThread(mprpc, "describe", "example.UserService.Login", *hosts)
        self.assertIn("rpc Login(example.LoginRequest)", described.stdout)
        called = await deferToThread(
            mprpc, "call", "example.UserService.Login", '{"name": "zhang san", "pwd": "x"}', *hosts
        )
        self.assertEqual(called.returncode, 0, called.stderr)
        self.assertEqual(json.loads(called.stdout)["result"]["errmsg"], "bad name or pwd")
        failed = await deferToThread(
            mprpc, "call", "example.FriendService.GetFriendsList", '{"userid": 5}', *hosts
        )
        self.assertEqual((failed.returncode, failed.stderr.split(":")[1]), (69, " NOT_FOUND"))
        missing = await deferToThread(mprpc, "call", "no.Such.Method", "{}", *hosts)
        self.assertEqual(missing.returncode, 1)
        self.assertIn("no provider of no.Such", missing.stderr)
        healthy = await deferToThread(mprpc, "health", "example.UserService", *hosts)
        self.assertEqual(healthy.returncode, 0, healthy.stdout + healthy.stderr)
        self.assertIn("example.UserService  SERVING", healthy.stdout)


def test_provider_without_reflection_says_so(tmp_path):
    provider = Provider(tmp_path, "reflection = no\n")
    try:
        done = mprpc("describe", "example.UserService", "--endpoint", provider.address)
    finally:
        provider.stop()
    assert done.returncode == 64 + 5
    assert done.stderr.startswith("mprpc: NOT_FOUND: unknown service")
    assert "(the provider runs with [provider] reflection = no)" in done.stderr
