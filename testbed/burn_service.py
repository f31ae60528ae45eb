"""A CPU-bound EchoService for the overload run (scripts/overload.py).

``Echo`` burns ``BURN_MS`` milliseconds of CPU (default 2, read once at start
from the provider's environment) in a later reactor turn, so calls admitted
together wait for one another on the provider's one thread, as the work of a
real provider does; the call answers through a Deferred, so the adaptive limiter
counts it in flight and samples its latency. A call cancelled before its turn
(its deadline passed) burns nothing. With ``BURN_INLINE=1`` in the
environment it burns and answers inline instead (no Deferred), as a plain
synchronous handler does; with ``BURN_INLINE=thread`` it burns in the
reactor's thread pool (``deferToThread``).
"""

from __future__ import annotations

import os
import time

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from twisted_rpc import CallContext, Service


def burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU time (a bounded busy loop)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class BurnEchoService(Service, descriptor=ECHO):
    """Echo burns ``BURN_MS`` of CPU per call, then echoes the payload."""

    def __init__(self) -> None:
        self.seconds = float(os.environ.get("BURN_MS", "2")) / 1000.0
        if not 0.0 <= self.seconds <= 1.0:
            raise ValueError(f"BURN_MS must be within 0 and 1000, got {self.seconds * 1000}")
        self.inline = os.environ.get("BURN_INLINE", "") == "1"
        self.threaded = os.environ.get("BURN_INLINE", "") == "thread"

    def _answer(self, request: echo_pb2.EchoRequest) -> echo_pb2.EchoReply:
        burn(self.seconds)
        return echo_pb2.EchoReply(payload=request.payload, pid=os.getpid())

    def Echo(
        self, request: echo_pb2.EchoRequest, context: CallContext
    ) -> Deferred[echo_pb2.EchoReply] | echo_pb2.EchoReply:
        if self.inline:
            return self._answer(request)
        if self.threaded:
            return deferToThread(self._answer, request)
        if context.connection is None:
            raise RuntimeError("BurnEchoService needs a connection's clock")
        return deferLater(context.connection.clock, 0, self._answer, request)
