"""JSON log output: one flat JSON object per line, for log shippers.

Selected by ``[provider] log_format = json`` (twistd then writes these lines
instead of its text), or with ``twistd --logger twisted_rpc.ops.json_observer``.
Each line has ``time``, ``level``, ``namespace`` and ``text`` (the formatted
message), every field of the event (``call_id``, ``method``, ``service``,
``peer``, ``code``, ``duration_ms`` for failed and slow calls), and
``traceback`` when the event carries a failure.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any, cast

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

__all__ = ["json_lines_observer", "json_observer"]

_SKIP = {"format", "message", "time", "system", "isError", "why", "failure", "printed"}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def json_lines_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event to ``out`` as one line of JSON."""

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": event.get("log_time"),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace"),
            "text": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in _SKIP and key not in record:
                record[key] = _plain(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        out.write(json.dumps(record) + "\n")
        out.flush()

    return cast(ILogObserver, observe)  # @provider's result is not typed


def json_observer() -> ILogObserver:
    """For ``twistd --logger twisted_rpc.ops.json_observer``: JSON lines on stdout."""
    return json_lines_observer(sys.stdout)
