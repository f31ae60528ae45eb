"""The provider's admin HTTP endpoint (``[admin] listen``), served by twisted.web.

- ``/metrics``: Prometheus exposition (``prometheus_client``'s own resource);
- ``/status``: one server-rendered HTML page (reloads itself every few seconds;
  ``?refresh=0`` turns that off, at most :data:`MAX_REFRESH` seconds, anything
  but a number of seconds is a 400): services, methods (their kind), calls/s,
  p50/p99, errors by code, open streams and stream messages per method,
  connections with peers, calls and streams in flight, registry state, and
  with ``[provider] workers`` > 1 a row per worker;
- ``/status.json``: the same data as JSON.

At most ``max_connections`` connections are open at once (``[admin]
max_connections``); further ones are closed at once, with a log line at most
every :data:`REFUSAL_LOG_INTERVAL` seconds. A connection idle for
``idle_timeout`` seconds is closed.
"""

from __future__ import annotations

import json
import math
import os
from html import escape
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from twisted_rpc._version import __version__
from twisted_rpc.core._connection import RefusedConnection
from twisted_rpc.core._log_throttle import LogThrottle
from twisted_rpc.ops._health import status_name
from twisted_rpc.ops._metrics import (
    ProviderMetrics,
    listener_factories,
    named_listeners,
    open_streams,
    quantile,
)

__all__ = [
    "DEFAULT_ADMIN_IDLE_TIMEOUT",
    "DEFAULT_ADMIN_MAX_CONNECTIONS",
    "MAX_REFRESH",
    "admin_site",
    "status_data",
]

log = Logger(namespace="twisted_rpc.ops")

DEFAULT_ADMIN_MAX_CONNECTIONS = 64
"""Open admin connections at once (``[admin] max_connections``)."""
DEFAULT_ADMIN_IDLE_TIMEOUT = 30.0
"""Seconds an admin connection may stay silent before it is closed."""
MAX_REFRESH = 3600.0
"""The status page's longest reload interval; a larger ``?refresh=`` is cut to it."""
REFUSAL_LOG_INTERVAL = 10.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def status_data(provider: Any, metrics: ProviderMetrics, workers: Any = None) -> dict[str, Any]:
    """What the status page shows, as plain data; with ``workers`` (a
    supervisor's ``WorkersMetrics``), its ``supervisor`` and ``workers`` too,
    the calls and streams in flight being the workers'."""
    now = provider.reactor.seconds()
    latency = metrics.latency_buckets()
    factories = listener_factories(provider)
    streams_by_method: dict[str, int] = {}
    for stream in open_streams(factories):
        key = stream.method.info.full_name
        streams_by_method[key] = streams_by_method.get(key, 0) + 1
    messages = metrics.messages()
    services = []
    for name, service in sorted(provider.dispatcher.services.items()):
        methods = []
        for method in type(service).service_info().methods.values():
            key = method.full_name
            by_code = dict(sorted(metrics.totals.get(key, {}).items()))
            buckets = latency.get(key, [])
            received, sent = messages.get(key, (0, 0))
            methods.append(
                {
                    "name": method.name,
                    "kind": _kind(method),
                    "calls": sum(by_code.values()),
                    "calls_per_second": round(metrics.rate(key), 2),
                    "p50_ms": _ms(quantile(0.5, buckets)),
                    "p99_ms": _ms(quantile(0.99, buckets)),
                    "errors": {code: n for code, n in by_code.items() if code != "OK"},
                    "open_streams": streams_by_method.get(key, 0),
                    "messages_received": received,
                    "messages_sent": sent,
                }
            )
        services.append(
            {
                "name": name,
                "builtin": service.builtin,
                "health": status_name(provider.health.check(name)),
                "methods": methods,
            }
        )
    connections = [
        {
            "peer": connection.peer,
            "protocol": factory.name,
            "calls_in_flight": len(connection.pending),
            "streams": len(getattr(connection, "streams", ())),
            "idle_seconds": round(now - getattr(connection, "last_active", now), 1),
        }
        for factory in factories
        for connection in sorted(factory.connections, key=lambda c: c.peer)
    ]
    adaptive = {
        name: {
            "limit": limiter.limit,
            "shed": limiter.shed,
            "no_load_ms": _ms(limiter.no_load),
            "current_ms": _ms(limiter.current),
            "cpu_bound": limiter.cpu_bound,
            "busy": round(limiter.busy, 2),
        }
        for name, factory in named_listeners(provider)
        if (limiter := getattr(factory, "limiter", None)) is not None
    }
    registry = provider.registry
    zk = getattr(registry, "zk", None)
    data: dict[str, Any] = {
        "provider": {
            "pid": os.getpid(),
            "version": __version__,
            "uptime_seconds": round(now - (provider.started_at or now), 1),
            "listening": str(provider.advertise) if provider.advertise else None,
            "mprpc_listening": str(provider.cpp_advertise) if provider.cpp_advertise else None,
            "health": status_name(provider.health.check("")),
            "calls_in_flight": provider.calls_in_flight,
            "streams_in_flight": sum(f.streams_in_flight for f in factories),
        },
        "services": services,
        "unknown_route_calls": sum(metrics.totals.get("?/?", {}).values()),
        "connections": connections,
        "adaptive_limit": adaptive,
        "registry": {
            "kind": "zookeeper" if zk is not None else "static",
            "hosts": getattr(zk, "hosts", None),
            "connected": None if zk is None else zk.connected,
            "session": f"0x{zk.session_id:x}" if zk is not None and zk.session_id else None,
            "nodes": [str(r.address) + " " + r.service for r in registry.registrations],
            "reregistrations": getattr(registry, "reregistrations", 0),
        },
    }
    if workers is not None:
        data.update(workers.status())
        data["provider"]["calls_in_flight"] = sum(w["calls_in_flight"] for w in data["workers"])
        data["provider"]["streams_in_flight"] = sum(w["streams_in_flight"] for w in data["workers"])
    return data


def _kind(method: Any) -> str:
    if method.client_streaming and method.server_streaming:
        return "bidi"
    if method.client_streaming:
        return "client stream"
    if method.server_streaming:
        return "server stream"
    return "unary"


def _cell(value: Any) -> str:
    return "–" if value is None else escape(str(value))


def render_status(data: dict[str, Any], refresh: float) -> str:
    """The status page, server-rendered; ``refresh`` seconds between reloads (0: never)."""
    p = data["provider"]
    rows = []
    for service in data["services"]:
        for m in service["methods"]:
            key = f"{service['name']}/{m['name']}"
            errors = ", ".join(f"{code} {n}" for code, n in m["errors"].items()) or "–"
            messages = (
                "–" if m["kind"] == "unary" else f"{m['messages_received']} / {m['messages_sent']}"
            )
            rows.append(
                f'<tr data-method="{escape(key)}"'
                f"{' class=builtin' if service['builtin'] else ''}>"
                f"<td>{escape(service['name'])}</td><td>{escape(m['name'])}</td>"
                f'<td class="kind">{escape(m["kind"])}</td>'
                f'<td class="calls">{m["calls"]}</td>'
                f'<td class="rate">{m["calls_per_second"]:.2f}</td>'
                f'<td class="p50">{_cell(m["p50_ms"])}</td>'
                f'<td class="p99">{_cell(m["p99_ms"])}</td>'
                f'<td class="errors">{escape(errors)}</td>'
                f'<td class="streams">{m["open_streams"] if m["kind"] != "unary" else "–"}</td>'
                f'<td class="messages">{messages}</td>'
                f'<td class="health">{escape(service["health"])}</td></tr>'
            )
    peers = (
        "".join(
            f'<tr class="connection"><td class="peer">{escape(c["peer"])}</td>'
            f'<td class="calls">{c["calls_in_flight"]}</td>'
            f'<td class="streams">{c["streams"]}</td><td>{c["idle_seconds"]}</td></tr>'
            for c in data["connections"]
        )
        or '<tr><td colspan="4">none</td></tr>'
    )
    adaptive = "".join(
        f'<p class="adaptive">{escape(name)}: adaptive limit <b>{a["limit"]}</b>, '
        f"calls shed <b>{a['shed']}</b>, latency now <b>{a['current_ms']}</b> ms "
        f"(no load <b>{a['no_load_ms']}</b> ms), CPU busy <b>{a['busy']:.0%}</b>, "
        f"bound <b>{a['cpu_bound']}</b></p>"
        for name, a in data.get("adaptive_limit", {}).items()
    )
    workers = "".join(
        f'<tr class="worker"><td class="pid">{w["pid"]}</td><td class="slot">{w["slot"]}</td>'
        f'<td>{w["uptime_seconds"]:.0f}</td><td class="ready">{"yes" if w["ready"] else "no"}'
        f"{' (retiring)' if w['retiring'] else ''}</td>"
        f'<td class="restarts">{w["restarts"]}</td><td class="calls">{w["calls_in_flight"]}</td>'
        f'<td class="served">{w["calls_served"]}</td>'
        f'<td class="connections">{w["connections"]}</td></tr>'
        for w in data.get("workers", [])
    )
    if workers:
        workers = (
            f'<h2>Workers (<span id="workers-ready">{data["supervisor"]["ready"]}</span> of '
            f"{data['supervisor']['workers']} ready; supervisor pid "
            f"{data['supervisor']['pid']})</h2>\n"
            '<table id="workers"><tr><th>pid</th><th>slot</th><th>up s</th><th>ready</th>'
            "<th>restarts</th><th>calls in flight</th><th>calls served</th>"
            f"<th>connections</th></tr>\n{workers}</table>"
        )
    r = data["registry"]
    nodes = "".join(f"<li>{escape(n)}</li>" for n in r["nodes"]) or "<li>none</li>"
    script = (
        f"<script>setTimeout(function () {{ location.reload(); }}, {int(refresh * 1000)});</script>"
        if refresh > 0
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mprpc provider {p["pid"]}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f0f0f0; }} tr.builtin {{ color: #777; }}
td.calls, td.rate, td.p50, td.p99, td.streams, td.messages {{
  text-align: right; font-variant-numeric: tabular-nums; }}
.summary span {{ margin-right: 1.5em; }}
</style></head>
<body>
<h1>mprpc provider</h1>
<p class="summary">
<span>pid <b id="pid">{p["pid"]}</b></span>
<span>version <b>{escape(p["version"])}</b></span>
<span>uptime <b id="uptime">{p["uptime_seconds"]:.0f} s</b></span>
<span>listening <b id="listening">{_cell(p["listening"])}</b></span>
<span>health <b id="health">{escape(p["health"])}</b></span>
<span>calls in flight <b id="in-flight">{p["calls_in_flight"]}</b></span>
<span>of which streams <b id="streams-in-flight">{p["streams_in_flight"]}</b></span>
</p>
<h2>Methods</h2>
<table id="methods">
<tr><th>service</th><th>method</th><th>kind</th><th>calls</th><th>calls/s (10 s)</th>
<th>p50 ms</th><th>p99 ms</th><th>errors by code</th><th>open streams</th>
<th>messages in / out</th><th>health</th></tr>
{"".join(rows)}
</table>
<p>Calls to unknown services or methods: <b id="unknown">{data["unknown_route_calls"]}</b></p>
{adaptive}
{workers}
<h2>Connections (<span id="connection-count">{len(data["connections"])}</span>)</h2>
<table id="connections">
<tr><th>peer</th><th>calls in flight</th><th>streams</th><th>idle s</th></tr>
{peers}</table>
<h2>Registry</h2>
<p>kind <b id="registry-kind">{escape(r["kind"])}</b>,
connected <b id="registry-connected">{_cell(r["connected"])}</b>,
session <b>{_cell(r["session"])}</b>, re-registrations <b>{r["reregistrations"]}</b></p>
<ul id="registry-nodes">{nodes}</ul>
<p><a href="status.json">JSON</a> · <a href="metrics">Prometheus metrics</a></p>
{script}
</body></html>
"""


class StatusPage(Resource):
    isLeaf = True

    def __init__(
        self, provider: Any, metrics: ProviderMetrics, as_json: bool, workers: Any = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (twisted.web: not annotated)
        self.provider = provider
        self.metrics = metrics
        self.as_json = as_json
        self.workers = workers

    def render_GET(self, request: Request) -> bytes:
        data = status_data(self.provider, self.metrics, self.workers)
        if self.as_json:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(data, indent=2).encode()
        refresh = _refresh(request.args.get(b"refresh", [b"5"])[0])
        if refresh is None:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"refresh must be a number of seconds, 0 (never) or more\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return render_status(data, refresh).encode()


def _refresh(raw: bytes) -> float | None:
    """``?refresh=``: seconds between reloads, at most MAX_REFRESH; None if invalid."""
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, MAX_REFRESH)


class _Root(Resource):
    def render_GET(self, request: Request) -> bytes:
        request.redirect(b"/status")
        return b""


def admin_site(
    provider: Any,
    metrics: ProviderMetrics,
    *,
    max_connections: int = DEFAULT_ADMIN_MAX_CONNECTIONS,
    idle_timeout: float = DEFAULT_ADMIN_IDLE_TIMEOUT,
    workers: Any = None,
) -> AdminFactory:
    """The admin endpoint's factory for ``provider`` and its ``metrics``: a
    twisted.web site, at most ``max_connections`` connections at once, each
    closed after ``idle_timeout`` silent seconds. ``workers``: a supervisor's
    ``WorkersMetrics`` (the status page's rows per worker)."""
    # Imported here: prometheus_client.twisted imports the global reactor.
    from prometheus_client.twisted import MetricsResource

    # twisted.web's and prometheus_client's constructors are not annotated.
    root = _Root()  # type: ignore[no-untyped-call]
    root.putChild(b"", root)
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))  # type: ignore[no-untyped-call]
    root.putChild(b"status", StatusPage(provider, metrics, False, workers))
    root.putChild(b"status.json", StatusPage(provider, metrics, True, workers))
    site = _QuietSite(root, timeout=idle_timeout, reactor=provider.reactor)  # type: ignore[no-untyped-call]
    site.noisy = False
    return AdminFactory(site, provider.reactor, max_connections)


class _QuietSite(Site):
    """No access log: a scrape every few seconds is not news."""

    def log(self, request: http.Request) -> None:
        pass


class AdminFactory(WrappingFactory):
    """The admin site behind a cap on open connections."""

    noisy = False

    def __init__(self, site: Site, clock: IReactorTime, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections!r}")
        super().__init__(site)  # type: ignore[no-untyped-call]  # (not annotated)
        self.site = site
        self.clock = clock
        self.max_connections = max_connections
        self.refused = 0
        """Connections closed because ``max_connections`` were open."""
        self._refusals = LogThrottle(REFUSAL_LOG_INTERVAL)

    @property
    def open_connections(self) -> int:
        return len(self.protocols)

    # WrappingFactory promises a ProtocolWrapper; a refused connection gets a
    # plain protocol that closes it at once.
    def buildProtocol(self, addr: IAddress | None) -> Protocol:  # type: ignore[override]
        if len(self.protocols) < self.max_connections:
            return super().buildProtocol(addr)
        self.refused += 1
        count = self._refusals.due(self.clock.seconds())
        if count:
            log.warn(
                "admin endpoint: {max_connections} connections open (max_connections);"
                " refused {count} connection(s), the last from {peer}",
                max_connections=self.max_connections,
                count=count,
                peer=str(addr),
            )
        return RefusedConnection()  # closed at once, under TLS too
