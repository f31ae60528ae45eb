"""The test suite's service: one method with knobs for every outcome."""

from __future__ import annotations

import os

from twisted.internet.task import deferLater

from protos import echo_pb2
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
