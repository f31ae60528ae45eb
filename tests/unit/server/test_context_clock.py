"""A handler reaches the provider's clock as ``context.clock``."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import deferLater

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from twisted_rpc import CallContext, Service
from twisted_rpc.testing import MemoryProvider


class Later(Service, descriptor=ECHO):
    clocks: list[Any] = []

    def Echo(self, request: Any, context: CallContext) -> Any:
        self.clocks.append(context.clock)
        return deferLater(context.clock, 2.0, lambda: echo_pb2.EchoReply(payload=request.payload))


def test_a_handler_waits_on_the_providers_clock():
    memory = MemoryProvider([Later()])
    d = memory.proxy(ECHO).Echo(echo_pb2.EchoRequest(payload=b"z"))
    memory.flush()
    assert Later.clocks == [memory.reactor] and not d.called
    memory.advance(2.0)
    assert memory.result(d).payload == b"z"


def test_a_context_built_by_hand_has_the_global_reactor():
    from twisted.internet import reactor

    from twisted_rpc.core import describe

    context = CallContext(1, describe(ECHO).methods["Echo"], None, None, None)
    assert context.clock is reactor
