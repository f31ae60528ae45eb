"""The protoc plugin: ``x_rpc.py`` generated for examples/protos/user.proto,
friend.proto (a server stream) and examples/chat/chat.proto (bidi), ruff-clean,
used against a MemoryProvider, and ``mypy --strict`` over a typed client and
services (typed_ok.py passes; each mistake in typed_bad.py is reported). The
asyncio stubs run in asyncio_stub_app.py, under the asyncio reactor in a
subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.compiler.plugin_pb2 import CodeGeneratorRequest
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from twisted.internet.defer import Deferred

from examples.chat import chat_pb2
from examples.protos import friend_pb2, user_pb2
from testbed.protos import echo_pb2
from twisted_rpc import DeadlineExceededError, Service, UnimplementedError
from twisted_rpc.protoc import generate, main
from twisted_rpc.testing import MemoryProvider

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).parent
PROTOS = [
    "examples/protos/common.proto",
    "examples/protos/user.proto",
    "examples/protos/friend.proto",
]
PROTOS += ["testbed/protos/echo.proto", "examples/chat/chat.proto"]
STUBS = [
    "examples/protos/user_rpc.py",
    "examples/protos/friend_rpc.py",
    "examples/chat/chat_rpc.py",
]
STUBS += ["testbed/protos/echo_rpc.py"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source tree in a temp dir: protoc's _pb2 modules and stubs, and ours."""
    out = tmp_path_factory.mktemp("stubs")
    flags = [f"--{kind}_out={out}" for kind in ("python", "pyi", "twisted_rpc")]
    assert main([f"-I{ROOT}", *flags, *(str(ROOT / p) for p in PROTOS)]) == 0
    return out


def load(generated: Path, path: str) -> ModuleType:
    """A generated module, imported from its file (its _pb2 imports are the repo's)."""
    name = "generated_" + path.replace("/", "_")[: -len(".py")]
    spec = importlib.util.spec_from_file_location(name, generated / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_rpc_module_per_file_with_services(generated):
    written = {str(p.relative_to(generated)) for p in generated.rglob("*_rpc.py")}
    assert written == set(STUBS)  # common.proto declares no service
    text = (generated / "examples/protos/friend_rpc.py").read_text()
    assert "import examples.protos.friend_pb2 as examples_dot_protos_dot_friend__pb2" in text
    assert "def WatchFriends(" in text and "ServerStream[_FriendEvent]" in text
    assert "AsyncioServerStream[_FriendEvent]" in text and "import asyncio\n" in text
    chat = (generated / "examples/chat/chat_rpc.py").read_text()
    assert "requests: RequestStream[_ChatMessage]" in chat
    assert "import asyncio" not in chat  # no unary RPC: no asyncio.Future to name


def test_generated_code_is_ruff_clean(generated):
    files = [str(generated / p) for p in STUBS]
    config = ["--config", str(ROOT / "pyproject.toml"), "--no-cache"]
    for command in (["check"], ["format", "--check"]):
        run = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *config, *files],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr


def test_typed_stub_calls_a_service_built_on_the_base(generated):
    users = load(generated, "examples/protos/user_rpc.py")

    class Users(users.UserServiceBase):
        def Login(self, request, context):
            return user_pb2.LoginResponse(success=context.metadata.get("k") == request.name)

    assert issubclass(Users, Service) and Users.descriptor is users.UserServiceBase.descriptor
    memory = MemoryProvider([Users()])
    stub = users.UserServiceStub(memory.client, metadata={"k": "zhang san"})
    reply = memory.run(stub.Login(user_pb2.LoginRequest(name="zhang san")))
    assert type(reply) is user_pb2.LoginResponse and reply.success
    # Register has no handler: UNIMPLEMENTED, as for any Service.
    with pytest.raises(UnimplementedError):
        memory.run(stub.Register(user_pb2.RegisterRequest(id=1)))
    # A wrong request type still fails at run time, before anything is sent.
    with pytest.raises(TypeError, match="takes example.LoginRequest"):
        memory.run(stub.Login(user_pb2.RegisterRequest()))


def test_the_stubs_timeout_is_its_unary_calls_default(generated):
    users = load(generated, "examples/protos/user_rpc.py")

    class Slow(users.UserServiceBase):
        def Login(self, request, context):
            return Deferred()

    memory = MemoryProvider([Slow()])
    stub = users.UserServiceStub(memory.client, timeout=2.0)
    d = stub.Login(user_pb2.LoginRequest())
    memory.flush()
    memory.reactor.advance(2.0)
    memory.flush()
    with pytest.raises(DeadlineExceededError):
        memory.result(d)
    # A per-call timeout wins over the stub's.
    d = stub.Login(user_pb2.LoginRequest(), timeout=5.0)
    memory.flush()
    memory.reactor.advance(2.0)
    memory.flush()
    assert not d.called
    memory.reactor.advance(3.0)
    memory.flush()
    with pytest.raises(DeadlineExceededError):
        memory.result(d)


def test_a_server_stream_through_the_stub(generated):
    friends = load(generated, "examples/protos/friend_rpc.py")

    class Friends(friends.FriendServiceBase):
        async def WatchFriends(self, request, context):
            for name in ("li si", "wang wu")[: request.userid]:
                yield friend_pb2.FriendEvent(name=name)

    memory = MemoryProvider([Friends()])
    stub = friends.FriendServiceStub(memory.client)
    stream = stub.WatchFriends(friend_pb2.WatchFriendsRequest(userid=2))

    async def names():
        return [event.name async for event in stream]

    assert memory.run(names()) == ["li si", "wang wu"]


def test_a_client_stream_through_the_stub(generated):
    echo = load(generated, "testbed/protos/echo_rpc.py")

    class Streams(echo.StreamServiceBase):
        async def Sum(self, requests, context):
            total = b"".join([request.payload async for request in requests])
            return echo_pb2.EchoReply(payload=total)

    memory = MemoryProvider([Streams()])
    stub = echo.StreamServiceStub(memory.client)
    parts = [echo_pb2.EchoRequest(payload=p) for p in (b"ab", b"cd")]
    assert memory.run(stub.Sum(parts).response()).payload == b"abcd"
    stream = stub.Sum()  # no requests given: written by hand
    stream.write(echo_pb2.EchoRequest(payload=b"x"))
    stream.done_writing()
    assert memory.run(stream.response()).payload == b"x"
    # Count has no handler: UNIMPLEMENTED at the stream's end.
    with pytest.raises(UnimplementedError):
        memory.run(stub.Count(echo_pb2.CountRequest(count=1)).read())


def test_a_bidi_stream_through_the_stub(generated):
    chat = load(generated, "examples/chat/chat_rpc.py")

    class Room(chat.ChatServiceBase):
        async def Chat(self, requests, context):
            async for message in requests:
                yield chat_pb2.ChatMessage(user="room", text=message.text.upper())

    memory = MemoryProvider([Room()])
    stream = chat.ChatServiceStub(memory.client).Chat(
        [chat_pb2.ChatMessage(text="hi"), chat_pb2.ChatMessage(text="bye")]
    )

    async def texts():
        return [(m.user, m.text) async for m in stream]

    assert memory.run(texts()) == [("room", "HI"), ("room", "BYE")]


def test_the_asyncio_stub_refuses_a_client_that_hands_out_deferreds(generated):
    users = load(generated, "examples/protos/user_rpc.py")
    memory = MemoryProvider([])
    with pytest.raises(ValueError) as raised:
        users.UserServiceAsyncioStub(memory.client)
    assert str(raised.value) == (
        'UserServiceAsyncioStub needs a Client(..., awaitables="asyncio") (under '
        "Twisted's asyncio reactor); this one hands out Deferreds: use UserServiceStub"
    )
    assert not memory.client._routes  # refused before any proxy (or discovery watch)


def test_asyncio_stubs_under_the_asyncio_reactor(generated):
    """Services on the generated bases and asyncio tasks calling them through
    the asyncio stubs, in a process of their own (the asyncio reactor)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(generated)])}
    process = subprocess.Popen(
        [sys.executable, str(HERE / "asyncio_stub_app.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {
        "unary_is_future": True,
        "unary": ["hi", "stub"],
        "error": ["NotFoundError", "nope"],
        "stub_timeout": "DEADLINE_EXCEEDED",
        "server_stream": ["AsyncioServerStream", 0, 1, 2],
        "client_stream_type": "AsyncioClientStream",
        "handler_requests": "RequestStream",
        "client_stream": ["012", 3],
        "bidi_type": "AsyncioBidiStream",
        "bidi": ["ONE", "TWO"],
        "adapters": [True, True, True],
        "refused": (
            'EchoServiceAsyncioStub needs a Client(..., awaitables="asyncio") (under '
            "Twisted's asyncio reactor); this one hands out Deferreds: use EchoServiceStub"
        ),
        "plain_stub": "EchoServiceStub",
    }


MYPY_INI = """\
[mypy]
strict = True
explicit_package_bases = True
plugins = mypy_zope:plugin
cache_dir = {cache}

[mypy-twisted_rpc.*]
follow_imports = silent

[mypy-kazoo.*]
ignore_missing_imports = True

# protoc's --pyi_out stubs are not strict-clean (a bare Mapping: type-arg).
[mypy-{pb2}]
ignore_errors = True
"""


def test_mypy_strict_passes_on_typed_code_and_reports_each_mistake(generated, tmp_path):
    for name in ("typed_ok.py", "typed_bad.py"):
        shutil.copy(HERE / name, generated / name)
    if not (generated / "twisted_rpc").exists():
        (generated / "twisted_rpc").symlink_to(ROOT / "twisted_rpc")
    pb2 = ",".join(p[: -len(".proto")].replace("/", ".") + "_pb2" for p in PROTOS)
    (generated / "mypy.ini").write_text(MYPY_INI.format(cache=tmp_path / "cache", pb2=pb2))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", *STUBS]
        + ["typed_ok.py", "typed_bad.py"],
        cwd=generated,
        capture_output=True,
        text=True,
        timeout=300,
    )
    reported = re.findall(r"^(\S+\.py):(\d+): error: .*\[([\w-]+)\]$", run.stdout, re.M)
    expected = [
        ("typed_bad.py", str(n), code)
        for n, line in enumerate((HERE / "typed_bad.py").read_text().splitlines(), 1)
        for code in re.findall(r"# E: ([\w-]+)", line)
    ]
    assert sorted(reported) == sorted(expected), run.stdout + run.stderr


def test_a_name_python_cannot_take_is_protocs_error():
    request = CodeGeneratorRequest(file_to_generate=["bad.proto", "plain.proto"])
    bad = FileDescriptorProto(name="bad.proto", package="p")
    bad.message_type.add(name="M")
    method = bad.service.add(name="S").method.add(name="import")
    method.input_type = method.output_type = ".p.M"
    request.proto_file.extend([bad, FileDescriptorProto(name="plain.proto")])
    response = generate(request)
    assert "'import' cannot be a Python method or class name" in response.error
    assert not response.file
    request.file_to_generate.remove("bad.proto")
    response = generate(request)
    assert not response.error and not response.file  # no service, no module


def test_service_attributes_and_the_modules_own_names_are_not_taken():
    proto = FileDescriptorProto(name="a/b-c.proto", package="p")
    for name in ("T", "Reply", "S"):
        proto.message_type.add(name=name)
    proto.message_type[0].nested_type.add(name="Inner")
    service = proto.service.add(name="S")
    for name, request, reply in [("Get", "T", "Reply"), ("Put", "T.Inner", "S")]:
        service.method.add(name=name, input_type=f".p.{request}", output_type=f".p.{reply}")
    request = CodeGeneratorRequest(file_to_generate=["a/b-c.proto"], proto_file=[proto])
    (out,) = generate(request).file
    assert out.name == "a/b_c_rpc.py"
    compile(out.content, out.name, "exec")  # valid Python
    for line in ("_T_ = a_dot_b__c__pb2.T", "_Reply_ = a_dot_b__c__pb2.Reply"):
        assert line in out.content
    assert "_T_Inner = a_dot_b__c__pb2.T.Inner" in out.content
    assert "_S_ = a_dot_b__c__pb2.S" in out.content  # _S is the service's descriptor
    request.proto_file[0].service[0].method.add(
        name="descriptor", input_type=".p.T", output_type=".p.T"
    )
    error = generate(request).error
    assert error == "a/b-c.proto: S.descriptor would hide twisted_rpc.Service.descriptor"


def test_the_wrapper_without_grpcio_tools_says_which_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "grpc_tools", None)
    assert main(["--version"]) == 2
    assert "pip install 'twisted_rpc[protoc]'" in capsys.readouterr().err
