"""The test suite's service: one method with knobs for every outcome."""

from __future__ import annotations

import os

from twisted.internet.task import deferLater

from testbed.protos import echo_pb2
from twisted_rpc import CallContext, RpcError, Service

ECHO = echo_pb2.DESCRIPTOR.services_by_name["EchoService"]


def _answer(request: echo_pb2.EchoRequest, context: CallContext) -> echo_pb2.EchoReply:
    if request.crash:
        raise ValueError("secret detail in /srv/app/handler.py")
    if request.fail_code:
        raise RpcError(request.fail_code, request.fail_message)
    return echo_pb2.EchoReply(
        payload=request.payload,
        metadata=dict(context.metadata),
        call_id=context.call_id,
        pid=os.getpid(),
    )


class EchoService(Service, descriptor=ECHO):
    """Echo answers at once; AsyncEcho after ``delay`` seconds; NotImplemented is left out."""

    def Echo(self, request: echo_pb2.EchoRequest, context: CallContext) -> echo_pb2.EchoReply:
        return _answer(request, context)

    async def AsyncEcho(
        self, request: echo_pb2.EchoRequest, context: CallContext
    ) -> echo_pb2.EchoReply:
        if request.delay:
            await deferLater(context.connection.clock, request.delay, lambda: None)
        return _answer(request, context)


STREAMS = echo_pb2.DESCRIPTOR.services_by_name["StreamService"]


class StreamService(Service, descriptor=STREAMS):
    """One streaming method of each kind. ``ends`` records how each Count
    stream's generator ended, by tag (``"done"``, ``"closed"``: its
    ``finally`` ran before its end), so tests see a closed generator."""

    def __init__(self) -> None:
        self.ends: dict[str, str] = {}

    async def Count(self, request: echo_pb2.CountRequest, context: CallContext):  # type: ignore[no-untyped-def]
        clock = context.connection.clock if context.connection is not None else None
        payload = b"x" * request.payload_size
        finished = False
        try:
            n = 0
            while request.forever or n < request.count:
                if request.delay and clock is not None:
                    await deferLater(clock, request.delay, lambda: None)
                yield echo_pb2.EchoReply(payload=payload, call_id=n)
                n += 1
            if request.fail_code:
                raise RpcError(request.fail_code, request.fail_message)
            finished = True
        finally:
            if request.tag:
                self.ends[request.tag] = "done" if finished else "closed"

    async def Sum(self, requests, context: CallContext) -> echo_pb2.EchoReply:  # type: ignore[no-untyped-def]
        total = 0
        count = 0
        async for request in requests:
            if request.fail_code:
                raise RpcError(request.fail_code, request.fail_message)
            total += len(request.payload)
            count += 1
        context.set_trailing_metadata({"count": str(count)})
        return echo_pb2.EchoReply(payload=str(total).encode(), call_id=count)

    async def Chat(self, requests, context: CallContext):  # type: ignore[no-untyped-def]
        if "hello" in context.metadata:
            context.send_initial_metadata({"hello": context.metadata["hello"]})
        async for request in requests:
            if request.fail_code:
                raise RpcError(request.fail_code, request.fail_message)
            yield echo_pb2.EchoReply(payload=request.payload, metadata=dict(context.metadata))

    def Ends(self, request: echo_pb2.CountRequest, context: CallContext) -> echo_pb2.EchoReply:
        """The provider's record of ends (:attr:`ends`), for tests in another process."""
        return echo_pb2.EchoReply(metadata=self.ends, pid=os.getpid())
