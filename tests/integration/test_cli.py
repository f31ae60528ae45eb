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

from testbed.processes import ROOT, SERVICES, Provider, environment
from tests.integration.test_zookeeper import ZooKeeperTestCase
from twisted_rpc import Client, RpcError, StatusCode
from twisted_rpc.ops import NOT_SERVING, SERVING
from twisted_rpc.ops._protos import HEALTH, HealthCheckRequest, HealthWatchRequest

pytestmark = pytest.mark.integration

# The command as setup.cfg's console script runs it (tests/test_exports.py checks
# that the entry point names this function), from this checkout rather than
# from a script installed from another one.
MPRPC = [sys.executable, "-c", "from twisted_rpc.ops._cli import main; main()"]
STREAM_SERVICE = "testbed.echo_service:StreamService"


def mprpc(*args: str, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MPRPC, *args],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


@pytest.fixture(scope="module")
def provider():
    provider = Provider(Path(tempfile.mkdtemp()), services=f"{SERVICES} {STREAM_SERVICE}")
    yield provider
    provider.stop()


def test_list_by_endpoint(provider):
    done = mprpc("list", "--endpoint", provider.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "example.FriendService",
        "example.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "mprpc.health.v1.Health",
        "mprpc.reflection.v1.Reflection",
        "mprpc.test.EchoService",
        "mprpc.test.StreamService",
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
    watch = mprpc("describe", "example.FriendService.WatchFriends", "--endpoint", provider.address)
    assert "enum example.FriendEvent.Kind {\n  ADDED = 0;\n  SYNCED = 1;\n}" in watch.stdout


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
        (("mprpc.test.EchoService.Echo", "[]"), 2, "mprpc: request is not a mprpc"),
        (
            ("mprpc.test.EchoService.Nope", "{}"),
            69,
            "mprpc: NOT_FOUND: mprpc.test.EchoService has no method Nope",
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
    version = mprpc("--version")
    assert version.returncode == 0 and version.stdout.startswith("mprpc ")
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


def test_describe_shows_stream_kinds(provider):
    done = mprpc("describe", "mprpc.test.StreamService", "--endpoint", provider.address)
    assert done.returncode == 0, done.stderr
    for line in (
        "rpc Count(mprpc.test.CountRequest) returns (stream mprpc.test.EchoReply);",
        "rpc Sum(stream mprpc.test.EchoRequest) returns (mprpc.test.EchoReply);",
        "rpc Chat(stream mprpc.test.EchoRequest) returns (stream mprpc.test.EchoReply);",
    ):
        assert line in done.stdout
    health = mprpc("describe", "mprpc.health.v1.Health", "--endpoint", provider.address)
    assert "rpc Watch(mprpc.health.v1.HealthWatchRequest) returns (mprpc" in health.stdout
    assert (
        "rpc WatchStream(mprpc.health.v1.HealthCheckRequest)"
        " returns (stream mprpc.health.v1.HealthCheckResponse);"
    ) in health.stdout


def test_server_stream_prints_one_json_line_per_message_in_order(provider):
    done = mprpc(
        "call", "mprpc.test.StreamService.Count", '{"count": 20000}', "--endpoint", provider.address
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 20000
    assert [json.loads(line).get("call_id", 0) for line in lines] == list(range(20000))


def test_server_stream_error_after_its_messages_keeps_the_exit_convention(provider):
    done = mprpc(
        "call",
        "mprpc.test.StreamService.Count",
        '{"count": 3, "fail_code": 5, "fail_message": "gone"}',
        "--endpoint",
        provider.address,
    )
    assert done.returncode == 69
    assert len(done.stdout.splitlines()) == 3  # printed before the error
    assert done.stderr == "mprpc: NOT_FOUND: gone\n"


def test_client_stream_reads_json_lines_from_stdin(provider):
    requests = '{"payload": "YWI="}\n\n{"payload": "YWJj"}\n' * 500
    done = mprpc(
        "call", "mprpc.test.StreamService.Sum", "--endpoint", provider.address, stdin=requests
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    zero = {"metadata": {}, "pid": 0}  # fields at their zero value are printed too
    assert json.loads(done.stdout) == {"payload": "MjUwMA==", "call_id": 1000, **zero}  # "2500"
    empty = mprpc("call", "mprpc.test.StreamService.Sum", "--endpoint", provider.address)
    assert json.loads(empty.stdout) == {"payload": "MA==", "call_id": 0, **zero}  # no requests


def test_bidi_reads_stdin_and_prints_the_replies(provider):
    done = mprpc(
        "call",
        "mprpc.test.StreamService.Chat",
        "--endpoint",
        provider.address,
        "-H",
        "hello=there",
        stdin="".join(f'{{"payload": "{n:04d}"}}\n' for n in range(1000)),
    )
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["payload"] for r in replies] == [f"{n:04d}" for n in range(1000)]
    assert replies[0]["metadata"] == {"hello": "there"}


@pytest.mark.parametrize(
    "args, stdin, status, message",
    [
        (
            ("mprpc.test.StreamService.Chat",),
            '{"payload": "YWI="}\n{"nope": 1}\n',
            2,
            "mprpc: line 2 of stdin is not a mprpc.test.EchoRequest",
        ),
        (
            ("mprpc.test.StreamService.Sum", "{}"),
            "",
            2,
            "mprpc: mprpc.test.StreamService.Sum is a client stream: its requests are read",
        ),
        (
            ("mprpc.test.StreamService.Chat",),
            '{"fail_code": 9, "fail_message": "stop"}\n',
            64 + 9,
            "mprpc: FAILED_PRECONDITION: stop",
        ),
        (
            ("mprpc.health.v1.Health.WatchStream", "{}", "--stream-timeout", "0.5"),
            None,
            64 + 4,
            "mprpc: DEADLINE_EXCEEDED",
        ),
    ],
)
def test_stream_errors_exit_with_one_line(provider, args, stdin, status, message):
    done = mprpc("call", *args, "--endpoint", provider.address, stdin=stdin)
    assert done.returncode == status, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1
    if "WatchStream" in args[0]:
        assert json.loads(done.stdout) == {"status": "SERVING"}  # at once, before the deadline


def test_server_stream_ends_when_its_reader_goes_away(provider):
    process = subprocess.Popen(
        [
            *MPRPC,
            "call",
            "mprpc.test.StreamService.Count",
            '{"forever": true}',
            "--endpoint",
            provider.address,
        ],
        cwd=ROOT,
        env=environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        zero = {"payload": "", "metadata": {}, "pid": 0}  # zero values printed too
        assert json.loads(process.stdout.readline()) == {"call_id": 0, **zero}
        assert json.loads(process.stdout.readline()) == {"call_id": 1, **zero}
        process.stdout.close()  # as `| head -2` does
        status = process.wait(20)
        assert status == 0, process.stderr.read() if process.stderr else status
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


REFLECTION_ONLY = """
import sys
from twisted.internet import task
from twisted.internet.defer import Deferred
from google.protobuf import json_format
from twisted_rpc import Client, RpcError, StatusCode
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
    assert not [m for m in sys.modules if m.startswith(("testbed", "examples"))], "imported"
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

    async def test_watch_stream_sees_the_drain_then_ends_within_the_grace_period(self) -> None:
        provider = Provider(Path(tempfile.mkdtemp()), "grace_period = 2\n")
        self.addCleanup(provider.stop)
        client = Client(reactor, providers={HEALTH.full_name: [provider.address]})
        self.addCleanup(client.close)
        stream = client.proxy(HEALTH).WatchStream(HealthCheckRequest())
        self.assertEqual((await stream.read()).status, SERVING)
        provider.signal(signal.SIGTERM)
        self.assertEqual((await stream.read()).status, NOT_SERVING)
        started = reactor.seconds()
        with self.assertRaises(RpcError):
            await stream.read()
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(stream.code, StatusCode.UNAVAILABLE)
        # twistd ends as the signal that stopped it did (-15), once drained.
        self.assertEqual(await deferToThread(provider.wait, 20), -signal.SIGTERM)


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
