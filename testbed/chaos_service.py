"""A misbehaving EchoService for the chaos run (scripts/chaos.py).

Its behaviour is set from the provider's environment, read once at start:

- ``CHAOS_FAIL``: share of Echo calls answered UNAVAILABLE (0 to 1, default 0);
- ``CHAOS_SLOW``: share of Echo calls answered ``CHAOS_DELAY`` seconds late
  (default 0; delay default 0.5);
- ``CHAOS_SEED``: seed of its random choices (default: the process id).

Every Echo call received is counted; ``AsyncEcho`` answers at once with that
count in ``call_id`` (and is not counted), so a run reads each provider's
attempts at the end.
"""

from __future__ import annotations

import os
import random

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from twisted_rpc import CallContext, RpcError, Service, StatusCode


def _share(name: str, default: float = 0.0) -> float:
    value = float(os.environ.get(name, default))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within 0 and 1, got {value}")
    return value


class ChaosEchoService(Service, descriptor=ECHO):
    """Echo fails or is slow at the configured rates; AsyncEcho reports the count."""

    def __init__(self) -> None:
        self.fail = _share("CHAOS_FAIL")
        self.slow = _share("CHAOS_SLOW")
        self.delay = float(os.environ.get("CHAOS_DELAY", "0.5"))
        self.random = random.Random(int(os.environ.get("CHAOS_SEED", os.getpid())))
        self.received = 0

    def Echo(
        self, request: echo_pb2.EchoRequest, context: CallContext
    ) -> echo_pb2.EchoReply | Deferred[echo_pb2.EchoReply]:
        self.received += 1
        draw = self.random.random()
        if draw < self.fail:
            raise RpcError(StatusCode.UNAVAILABLE, "chaos: failing on purpose")
        reply = echo_pb2.EchoReply(payload=request.payload, pid=os.getpid())
        if draw < self.fail + self.slow and context.connection is not None:
            return deferLater(context.connection.clock, self.delay, lambda: reply)
        return reply

    def AsyncEcho(self, request: echo_pb2.EchoRequest, context: CallContext) -> echo_pb2.EchoReply:
        return echo_pb2.EchoReply(call_id=self.received, pid=os.getpid())
