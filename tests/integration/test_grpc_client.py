"""Integration: our consumer (``Client(protocol="grpc")``) calling gRPC
servers no one here wrote: a ``grpc.aio`` server and a sync ``grpc.server``,
each in a subprocess on 127.0.0.1 (this module, run as a script, serves
EchoService/StreamService with grpcio's generic handlers), stopped by PID
whatever happens. Every call kind, deadlines, typed errors, metadata both
ways (``-bin`` too) and a cancelled stream seen by the server.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from testbed.processes import ROOT, environment
from testbed.protos import echo_pb2
from twisted_rpc import (
    Client,
    DeadlineExceededError,
    NotFoundError,
    StatusCode,
    UnimplementedError,
)

pytestmark = pytest.mark.integration

ECHO = echo_pb2.DESCRIPTOR.services_by_name["EchoService"]
STREAMS = echo_pb2.DESCRIPTOR.services_by_name["StreamService"]


# ----------------------------------------------------------------- the server (a subprocess)


def _seen(context: Any) -> dict[str, str]:
    return {
        k: v if isinstance(v, str) else "bin:" + v.hex()
        for k, v in context.invocation_metadata()
        if not k.startswith(("grpc-", "user-agent", ":"))
    }


def _code(number: int) -> Any:
    import grpc

    return next(c for c in grpc.StatusCode if c.value[0] == number)


def _handlers(aio: bool) -> list[Any]:
    import grpc

    reply = echo_pb2.EchoReply

    def kinds(kind: Any, request: Any) -> Any:
        return lambda f: kind(
            f, request_deserializer=request.FromString, response_serializer=reply.SerializeToString
        )

    if aio:

        async def echo(req: Any, ctx: Any) -> Any:
            if req.delay:
                await asyncio.sleep(req.delay)
            if req.fail_code:
                await ctx.abort(_code(req.fail_code), req.fail_message)
            return reply(payload=req.payload, metadata=_seen(ctx))

        async def count(req: Any, ctx: Any) -> Any:
            await ctx.send_initial_metadata((("first", "yes"), ("first-bin", b"\x00\x01")))
            ctx.set_trailing_metadata((("last-bin", b"\xff"),))
            try:
                n = 0
                while req.forever or n < req.count:
                    yield reply(payload=b"c" * req.payload_size, call_id=n)
                    n += 1
                    await asyncio.sleep(req.delay)
            except asyncio.CancelledError:
                print(f"cancelled Count {req.tag}", flush=True)
                raise

        async def total(requests: Any, ctx: Any) -> Any:
            return reply(call_id=sum([len(r.payload) async for r in requests]))

        async def chat(requests: Any, ctx: Any) -> Any:
            async for r in requests:
                yield reply(payload=r.payload)

    else:

        def echo(req: Any, ctx: Any) -> Any:  # type: ignore[misc]
            time.sleep(req.delay)
            if req.fail_code:
                ctx.abort(_code(req.fail_code), req.fail_message)
            return reply(payload=req.payload, metadata=_seen(ctx))

        def count(req: Any, ctx: Any) -> Any:  # type: ignore[misc]
            ctx.send_initial_metadata((("first", "yes"), ("first-bin", b"\x00\x01")))
            ctx.set_trailing_metadata((("last-bin", b"\xff"),))
            if req.forever:  # it ends only when the caller goes away
                ctx.add_callback(lambda: print(f"cancelled Count {req.tag}", flush=True))
            n = 0
            while req.forever or n < req.count:
                yield reply(payload=b"c" * req.payload_size, call_id=n)
                n += 1
                time.sleep(req.delay or (0.01 if req.forever else 0))

        def total(requests: Any, ctx: Any) -> Any:  # type: ignore[misc]
            return reply(call_id=sum(len(r.payload) for r in requests))

        def chat(requests: Any, ctx: Any) -> Any:  # type: ignore[misc]
            for r in requests:
                yield reply(payload=r.payload)

    request = echo_pb2.EchoRequest
    return [
        grpc.method_handlers_generic_handler(
            "mprpc.test.EchoService",
            {"Echo": kinds(grpc.unary_unary_rpc_method_handler, request)(echo)},
        ),
        grpc.method_handlers_generic_handler(
            "mprpc.test.StreamService",
            {
                "Count": kinds(grpc.unary_stream_rpc_method_handler, echo_pb2.CountRequest)(count),
                "Sum": kinds(grpc.stream_unary_rpc_method_handler, request)(total),
                "Chat": kinds(grpc.stream_stream_rpc_method_handler, request)(chat),
            },
        ),
    ]


def serve(kind: str) -> None:
    import grpc

    if kind == "aio":

        async def main() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers(_handlers(True))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(f"listening on {port}", flush=True)
            await server.wait_for_termination()

        asyncio.run(main())
    else:
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(16))
        server.add_generic_rpc_handlers(_handlers(False))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(f"listening on {port}", flush=True)
        server.wait_for_termination()


class GrpcServer:
    """This module serving as a gRPC server in a subprocess."""

    def __init__(self, kind: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.test_grpc_client", kind],
            cwd=ROOT,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.pid = self.process.pid
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(30) or self.port is None:
            self.stop()
            raise RuntimeError("the gRPC server did not start:\n" + self.output)

    port: int | None = None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            match = re.match(r"listening on (\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(10)


# ----------------------------------------------------------------- the tests


class _Calls:
    kind = ""

    def setUp(self) -> None:
        self.server = GrpcServer(self.kind)
        self.addCleanup(self.server.stop)
        address = f"127.0.0.1:{self.server.port}"
        self.client = Client(
            reactor,
            providers={"mprpc.test.EchoService": [address], "mprpc.test.StreamService": [address]},
            protocol="grpc",
            timeout=10,
        )
        self.addCleanup(self.client.close)
        self.echo = self.client.proxy(ECHO)
        self.streams = self.client.proxy(STREAMS)

    async def test_unary_with_metadata_both_kinds(self) -> None:
        reply = await self.echo.Echo(
            echo_pb2.EchoRequest(payload=b"hi"), metadata={"x-text": "t", "x-bin": "\x00\x02"}
        )
        assert reply.payload == b"hi"
        assert reply.metadata["x-text"] == "t" and reply.metadata["x-bin"] == "bin:0002"

    async def test_errors_are_typed_with_their_message(self) -> None:
        with pytest.raises(NotFoundError) as caught:
            await self.echo.Echo(echo_pb2.EchoRequest(fail_code=5, fail_message="no \u5f20 here"))
        assert caught.value.message == "no \u5f20 here"
        with pytest.raises(UnimplementedError):
            await self.echo.NotImplemented(echo_pb2.EchoRequest())

    async def test_a_deadline_ends_the_call_deadline_exceeded(self) -> None:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await self.echo.Echo(echo_pb2.EchoRequest(delay=3), timeout=0.3)
        assert time.monotonic() - started < 2
        assert (await self.echo.Echo(echo_pb2.EchoRequest(payload=b"after"))).payload == b"after"

    async def test_a_server_stream_with_metadata_both_ways(self) -> None:
        stream = self.streams.Count(echo_pb2.CountRequest(count=200, payload_size=1000))
        got = [reply.call_id async for reply in stream]
        assert got == list(range(200))
        assert stream.code == StatusCode.OK
        assert (await stream.initial_metadata)["first-bin"] == "\x00\x01"
        assert stream.trailing_metadata["last-bin"] == "\xff"  # not UTF-8: latin-1

    async def test_client_stream_and_bidi(self) -> None:
        requests = [echo_pb2.EchoRequest(payload=b"x" * n) for n in range(1, 101)]
        assert (await self.streams.Sum(requests)).call_id == 5050
        chat = self.streams.Chat([echo_pb2.EchoRequest(payload=b"%d" % n) for n in range(50)])
        assert [r.payload async for r in chat] == [b"%d" % n for n in range(50)]

    async def test_a_cancelled_stream_is_seen_by_the_server(self) -> None:
        stream = self.streams.Count(echo_pb2.CountRequest(forever=True, delay=0.01, tag="t1"))
        first = await stream.read()
        assert first is not None
        stream.cancel()
        for _ in range(400):  # bounded: 20 s at most (a busy host is slow to tell)
            if "cancelled Count t1" in self.server.output:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert "cancelled Count t1" in self.server.output
        assert stream.code == StatusCode.CANCELLED


class AioServerTests(_Calls, TestCase):
    kind = "aio"


class SyncServerTests(_Calls, TestCase):
    kind = "sync"


if __name__ == "__main__":
    serve(sys.argv[1])
