"""What every example caller shares: ``--config`` and running ``main`` on the reactor."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react


def run(main: Callable[[Any, str], Coroutine[Any, Any, None]], description: str | None) -> None:
    """Parse ``--config`` (default etc/consumer.ini) and run ``main(reactor, config)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="etc/consumer.ini", help="consumer config (ini)")
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, args.config)))
