"""A closed client is closed: calls through any proxy fail at once, nothing
is dialled again, and no new proxy is built."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from testbed.echo_service import ECHO, STREAMS, EchoService, StreamService
from testbed.protos import echo_pb2
from tests.helpers import failure_of, result
from twisted_rpc import Client, ServiceProxy, UnavailableError
from twisted_rpc.core import describe
from twisted_rpc.testing import MemoryProvider


def closed_memory(**kw: Any) -> tuple[MemoryProvider, ServiceProxy, ServiceProxy]:
    memory = MemoryProvider([EchoService(), StreamService()], **kw)
    echo, streams = memory.proxy(ECHO), memory.proxy(STREAMS)
    assert memory.run(echo.Echo(echo_pb2.EchoRequest(payload=b"x"))).payload == b"x"
    closing = memory.client.close()
    memory.flush()
    assert result(closing) is None
    return memory, echo, streams


def test_unary_calls_through_an_old_proxy_fail_at_once_without_a_dial():
    memory, echo, _ = closed_memory()
    dials = len(memory.reactor.tcpClients)
    d = echo.Echo(echo_pb2.EchoRequest())
    error = failure_of(d)
    assert isinstance(error, UnavailableError) and error.message == "client closed"
    memory.flush()
    memory.advance(60)
    assert len(memory.reactor.tcpClients) == dials
    assert memory.client.channels == {}


def test_a_service_never_called_before_close_fails_the_same_way():
    memory, _, streams = closed_memory()
    stream = streams.Count(echo_pb2.CountRequest(count=2))
    error = failure_of(stream.read())
    assert isinstance(error, UnavailableError) and error.message == "client closed"
    assert memory.client.channels == {}


class Passing:
    def intercept(self, call: Any, request: Any, proceed: Any) -> Any:
        return proceed(call, request)


def test_calls_with_interceptors_or_retries_fail_too():
    memory, _, _ = closed_memory(client_interceptors=[Passing()])
    method = describe(ECHO).methods["Echo"]
    d = memory.client.call(method, echo_pb2.EchoRequest(), idempotent=True)
    assert failure_of(d).message == "client closed"
    assert memory.client.channels == {}


def test_a_new_proxy_from_a_closed_client_raises():
    memory, _, _ = closed_memory()
    with pytest.raises(
        UnavailableError, match="client closed: no new proxy of mprpc.test.EchoService"
    ):
        memory.client.proxy(ECHO)


def test_callers_waiting_for_a_first_list_fail_at_close():
    reactor = MemoryReactorClock()
    never: dict[str, list[str]] = {}
    client = Client(reactor, providers=never)
    client.discovery.subscribe = lambda service, callback: lambda: None  # type: ignore[method-assign]
    d = client.proxy(ECHO).Echo(echo_pb2.EchoRequest(), timeout=30)
    assert not d.called
    client.close()
    assert failure_of(d).message == "client closed"
    assert reactor.getDelayedCalls() == []
