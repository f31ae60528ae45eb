"""What a client's resilience policies tell observers (metrics), off the hot path.

:class:`Events` is a list of observers; each event is a method an observer
may have (looked up with ``getattr``, so an observer implements only those it
counts), called with the arguments below. Observers are held weakly (a
client's outlier peers outlive nothing through them: the metrics object is
kept by whoever scrapes it). Events happen only when a policy
acts (a retry, a hedge, an ejection, a shed answer), never for a plain call
that succeeds. An observer that raises is logged and the call goes on.

- ``retried(method, code)``: a retry is sent (``method`` is
  ``"package.Service/Method"``, ``code`` the status that caused it;
  RESOURCE_EXHAUSTED for a call a provider shed unrun);
- ``retry_refused(method)``: the retry budget refused a retry or a hedge;
- ``hedged(method)``: a hedge (an attempt after the first) is sent;
- ``hedge_won(method)``: a hedged call's answer came from a later attempt;
- ``hedges_cancelled(method, count)``: ``count`` losers cancelled;
- ``ejected(provider)``, ``returned(provider)``: a provider (``host:port``)
  left the rotation (again, after a failed Health check) or came back;
- ``call_shed(provider)``: a provider answered a call "not run" (shed).
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.logger import Logger

__all__ = ["Events"]

log = Logger(namespace="twisted_rpc.client")


class Events:
    """A client's resilience observers: see the module docstring."""

    __slots__ = ("observers",)

    def __init__(self) -> None:
        self.observers: list[weakref.ref[Any]] = []

    def add(self, observer: Any) -> None:
        self.observers = [r for r in self.observers if r() is not None and r() is not observer]
        self.observers.append(weakref.ref(observer))

    def __call__(self, event: str, *args: Any) -> None:
        for ref in self.observers:
            observer = ref()
            handler = getattr(observer, event, None) if observer is not None else None
            if handler is None:
                continue
            try:
                handler(*args)
            except Exception:
                log.failure(
                    "resilience observer {observer!r} failed on {event}",
                    observer=observer,
                    event=event,
                )
