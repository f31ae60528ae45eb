"""What the ZooKeeper scripts share: a server, providers, the reactor, and cleanup by PID."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

from twisted.internet import task
from twisted.internet.defer import Deferred

from testbed.processes import Provider
from testbed.zkserver import ZooKeeperCluster


def run_with_zookeeper(
    run: Callable[[ZooKeeperCluster, list[Provider]], Awaitable[dict]],
) -> dict:
    """Start a ZooKeeper, run ``run(zk, started)`` on the reactor, then stop every
    provider it appended to ``started`` and the ZooKeeper by PID, whatever happened."""
    zk = ZooKeeperCluster(1).start()
    started: list[Provider] = []
    result: dict = {}
    try:

        async def go(_reactor) -> None:
            result.update(await run(zk, started))

        task.react(lambda _reactor: Deferred.fromCoroutine(go(_reactor)))
    except SystemExit:
        pass  # react() always exits; the result is what matters
    finally:
        for provider in started:
            provider.signal(signal.SIGCONT)  # a frozen one could not stop
            provider.stop()
        zk.cleanup()
    return result
