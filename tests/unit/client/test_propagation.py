"""Deadline, cancellation and metadata propagation from a handler's inbound
call to the calls it makes (core/_propagation.py), in memory on a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred

from examples.protos import user_pb2
from testbed.echo_service import ECHO, EchoService
from testbed.protos import echo_pb2
from twisted_rpc import ClientOptions, DeadlineExceededError, Service, StatusCode
from twisted_rpc.testing import MemoryProvider

USERS = user_pb2.DESCRIPTOR.services_by_name["UserService"]


class Middle(Service, descriptor=USERS):
    """Login calls EchoService.AsyncEcho (delay from the password) and records
    what it saw; Register calls it from a plain (not async) handler."""

    def __init__(self) -> None:
        self.client: Any = None
        self.seen: list[Any] = []
        self.outcomes: list[Any] = []

    async def Login(self, request, context):
        echo = self.client.proxy(ECHO)
        try:
            reply = await echo.AsyncEcho(
                echo_pb2.EchoRequest(payload=b"x", delay=float(request.pwd or 0)),
                metadata={"own": "1"},
            )
        except Exception as e:
            self.outcomes.append(e)
            raise
        self.seen.append(reply)
        return user_pb2.LoginResponse(success=True)


class Recording(EchoService):
    """AsyncEcho, recording each call's remaining time when it starts and how it ended."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []
        self.ended: list[str] = []

    async def AsyncEcho(self, request, context):
        self.remaining.append(context.time_remaining())
        try:
            return await super().AsyncEcho(request, context)
        except BaseException as e:
            self.ended.append(type(e).__name__)
            raise


def _served(**options):
    middle, echo = Middle(), Recording()
    memory = MemoryProvider(
        [middle, echo], client_options=ClientOptions(**options) if options else None
    )
    middle.client = memory.client
    return memory, middle, echo


def _login(memory, pwd: str = "0", timeout: float | None = None, metadata=None) -> Deferred:
    proxy = memory.proxy(USERS)
    return proxy.Login(user_pb2.LoginRequest(name="a", pwd=pwd), timeout=timeout, metadata=metadata)


def test_a_call_from_a_handler_inherits_the_remaining_deadline_less_the_margin():
    memory, middle, echo = _served(deadline_margin=0.1)
    d = _login(memory, timeout=2.0)
    memory.flush()
    assert memory.result(d).success
    (remaining,) = echo.remaining
    assert remaining == pytest.approx(1.9, abs=0.01)


def test_the_sooner_deadline_wins_and_none_is_inherited_without_one():
    memory, middle, echo = _served(timeout=10.0)  # the client's own default: later
    d = _login(memory, timeout=0.5)
    memory.flush()
    memory.result(d)
    assert echo.remaining[-1] == pytest.approx(0.495, abs=0.001)  # less the 5 ms margin
    memory1, middle1, echo1 = _served(timeout=0.2)  # the client's own default: sooner
    d = _login(memory1, timeout=10.0)
    memory1.flush()
    memory1.result(d)
    assert echo1.remaining[-1] == pytest.approx(0.2, abs=0.001)
    memory2, middle2, echo2 = _served()
    d = _login(memory2)  # no deadline anywhere
    memory2.flush()
    memory2.result(d)
    assert echo2.remaining == [None]


def test_prefixed_metadata_is_carried_and_the_calls_own_wins():
    memory, middle, echo = _served(propagate_metadata=("x-trace-",))
    d = _login(memory, metadata={"x-trace-id": "t1", "other": "no", "own": "parent"})
    memory.flush()
    memory.result(d)
    (reply,) = middle.seen
    assert dict(reply.metadata) == {"x-trace-id": "t1", "own": "1"}


def test_the_inbound_deadline_passing_cancels_the_call_in_flight_downstream():
    memory, middle, echo = _served()
    d = _login(memory, pwd="5", timeout=1.0)  # the echo takes 5 s
    memory.flush()
    for _ in range(3):
        memory.advance(0.5)
    assert echo.ended == ["CancelledError"]  # the downstream handler was cancelled
    (outcome,) = middle.outcomes  # the handler's await was cancelled with it
    assert type(outcome).__name__ in ("CancelledError", "DeadlineExceededError")
    with pytest.raises(DeadlineExceededError):
        memory.result(d)


def test_the_inbound_caller_cancelling_cancels_the_call_downstream():
    memory, middle, echo = _served()
    d = _login(memory, pwd="5")
    memory.flush()
    assert len(echo.remaining) == 1
    d.cancel()
    memory.flush()
    assert echo.ended == ["CancelledError"]


def test_a_deadline_already_passed_fails_the_downstream_call_unsent():
    memory, middle, echo = _served(deadline_margin=5.0)  # more than the 2 s the caller gives
    d = _login(memory, timeout=2.0)
    memory.flush()
    assert echo.remaining == []  # never sent
    (error,) = middle.outcomes
    assert isinstance(error, DeadlineExceededError)
    assert "not sent" in error.message
    with pytest.raises(DeadlineExceededError) as caught:
        memory.result(d)  # the handler raised it on: the caller gets it typed
    assert caught.value.code == StatusCode.DEADLINE_EXCEEDED


def test_outside_a_handler_nothing_is_inherited():
    memory, middle, echo = _served(propagate_metadata=("x-",))
    proxy = memory.proxy(ECHO)
    d = ensureDeferred(proxy.AsyncEcho(echo_pb2.EchoRequest(payload=b"y")))
    memory.flush()
    assert memory.result(d).payload == b"y"
    assert echo.remaining == [None]


def test_client_options_check_the_propagation_settings():
    with pytest.raises(TypeError):
        ClientOptions(propagate_metadata="x-trace-")
    with pytest.raises(ValueError):
        ClientOptions(deadline_margin=-1)
    assert ClientOptions(propagate_metadata=["x-"]).propagate_metadata == ("x-",)
