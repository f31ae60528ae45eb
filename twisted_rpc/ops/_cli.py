"""``mprpc``: list, describe, call and health-check services from the shell.

Providers are found in ZooKeeper (``--zk HOSTS [--root /mprpc]``) or given
(``--endpoint HOST:PORT``); messages and methods come from the providers'
Reflection service, so no ``.proto`` is needed. Exit status: 0 on success,
64 + the status code when a call fails (``mprpc call`` exits 69 on NOT_FOUND),
1 when nothing could be reached, 2 on a usage error.

``mprpc call`` on a streaming method speaks JSON lines on stdout and stdin
(:mod:`twisted_rpc.ops._cli_streams`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    ServiceDescriptor,
)
from twisted.internet import fdesc
from twisted.internet.defer import Deferred

from twisted_rpc._version import __version__
from twisted_rpc.client._client import Client
from twisted_rpc.core._status import RpcError, code_name
from twisted_rpc.discovery._layout import provider_info, provider_path, providers_path
from twisted_rpc.discovery._static import StaticRegistry
from twisted_rpc.discovery._types import parse_address
from twisted_rpc.ops._cli_streams import (
    StdioLines,
    UserError,
    call_stream,
    parse_request,
    to_json,
)
from twisted_rpc.ops._health import SERVING, status_name
from twisted_rpc.ops._protos import HEALTH, HealthCheckRequest
from twisted_rpc.ops._reflection import RemoteDescriptors, message_class

if TYPE_CHECKING:  # (kazoo is imported only by the commands that use ZooKeeper)
    from twisted.internet.interfaces import IReactorTCP

    from twisted_rpc.discovery._kazoo import IZooKeeperReactor

    class ICommandReactor(IZooKeeperReactor, IReactorTCP):
        """What the commands use of the reactor: its clock, threads and TCP."""


__all__ = ["main"]

EXIT_UNREACHABLE = 1
EXIT_CALL_FAILED = 64  # + the status code


# ---------------------------------------------------------------- finding providers


async def zookeeper_layout(
    reactor: ICommandReactor, hosts: str, root: str, timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """``{service: [node data, ...]}`` read from the native layout under ``root``
    (see :mod:`twisted_rpc.discovery._layout`)."""
    from twisted_rpc.discovery._kazoo import CONNECTED, NoNodeError, ZooKeeperClient

    zk = ZooKeeperClient(reactor, hosts, session_timeout=max(timeout, 4.0))
    connected: Deferred[None] = Deferred()

    def state_changed(state: str, new_session: bool) -> None:
        if state == CONNECTED and not connected.called:
            connected.callback(None)

    zk.add_state_listener(state_changed)
    zk.start()
    connected.addTimeout(timeout, reactor)
    try:
        try:
            await connected
        except Exception:
            raise UserError(f"cannot reach ZooKeeper at {hosts} within {timeout:g} s") from None
        layout: dict[str, list[dict[str, Any]]] = {}
        try:
            services = await zk.get_children(root)
        except NoNodeError:
            return layout
        for service in sorted(services):
            try:
                names = await zk.get_children(providers_path(root, service))
            except NoNodeError:
                names = []
            nodes = []
            for name in sorted(names):
                try:
                    data, _ = await zk.get(provider_path(root, service, name))
                except NoNodeError:
                    continue
                nodes.append(provider_info(name, data))
            layout[service] = nodes
        return layout
    finally:
        await zk.close()


async def endpoints_for(
    reactor: ICommandReactor, args: argparse.Namespace, service: str
) -> list[str]:
    """Where ``service`` is served: the ``--endpoint``, or its providers in ZooKeeper."""
    if args.endpoint:
        return [args.endpoint]
    layout = await zookeeper_layout(reactor, args.zk, args.root, args.timeout)
    nodes = layout.get(service, [])
    if not nodes:
        known = ", ".join(layout) or "none"
        raise UserError(
            f"no provider of {service} in ZooKeeper {args.zk}{args.root} (known: {known})"
        )
    return [node["address"] for node in nodes]


def client_for(reactor: ICommandReactor, endpoint: str, args: argparse.Namespace) -> Client:
    try:
        address = parse_address(endpoint)
    except ValueError as e:
        raise UserError(str(e), 2) from None
    return Client(
        reactor,
        discovery=StaticRegistry(default=[address]),
        timeout=args.timeout,
        connect_timeout=min(args.timeout, 5.0),
    )


def split_symbol(symbol: str) -> tuple[str, str | None]:
    """``pkg.Service.Method`` (or ``pkg.Service/Method``) → (``pkg.Service``, ``Method``);
    a service alone → (it, None). Packages are lower case, services and methods not."""
    if "/" in symbol:
        service, _, method = symbol.rpartition("/")
        return service, method
    head, _, tail = symbol.rpartition(".")
    if head and tail[:1].isupper() and head.rpartition(".")[2][:1].isupper():
        return head, tail
    return symbol, None


async def reflected(
    reactor: ICommandReactor, args: argparse.Namespace, service: str
) -> tuple[Client, ServiceDescriptor]:
    endpoint = (await endpoints_for(reactor, args, service))[0]
    client = client_for(reactor, endpoint, args)
    try:
        descriptor = await RemoteDescriptors(client, args.timeout).service(service)
    except BaseException:
        await client.close()
        raise
    return client, descriptor


# ---------------------------------------------------------------- commands


async def cmd_list(reactor: ICommandReactor, args: argparse.Namespace) -> int:
    if args.endpoint:
        client = client_for(reactor, args.endpoint, args)
        try:
            for name in await RemoteDescriptors(client, args.timeout).list_services():
                print(name)
        finally:
            await client.close()
        return 0
    layout = await zookeeper_layout(reactor, args.zk, args.root, args.timeout)
    now = time.time()
    for service, nodes in layout.items():
        print(service)
        for node in nodes:
            started = node.get("started_at")
            uptime = f"{now - started:.0f}s" if isinstance(started, int | float) else "?"
            print(
                f"  {node['address']}  weight={node.get('weight', '?')}  "
                f"version={node.get('version', '?')}  uptime={uptime}  pid={node.get('pid', '?')}"
            )
        if not nodes:
            print("  (no providers)")
    return 0


_TYPES = {
    getattr(FieldDescriptor, name): name[len("TYPE_") :].lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_")
}


def _field_type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        if field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields
            return f"map<{_field_type(key)}, {_field_type(value)}>"
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return _TYPES.get(field.type, "?")


def describe_message(message: Descriptor) -> list[str]:
    lines = [f"message {message.full_name} {{"]
    for field in message.fields:
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        repeated = "repeated " if field.is_repeated and not is_map else ""
        lines.append(f"  {repeated}{_field_type(field)} {field.name} = {field.number};")
    lines.append("}")
    return lines


def describe_enum(enum: EnumDescriptor) -> list[str]:
    lines = [f"enum {enum.full_name} {{"]
    lines += [f"  {value.name} = {value.number};" for value in enum.values]
    lines.append("}")
    return lines


def _messages_used(
    descriptor: ServiceDescriptor, method: str | None
) -> tuple[list[Descriptor], list[EnumDescriptor]]:
    """The messages and enums the methods' requests and responses use."""
    seen: dict[str, Descriptor] = {}
    enums: dict[str, EnumDescriptor] = {}

    def visit(message: Descriptor) -> None:
        if message.full_name in seen:
            return
        if not message.GetOptions().map_entry:
            seen[message.full_name] = message
        for field in message.fields:
            if field.message_type is not None:
                visit(field.message_type)
            elif field.enum_type is not None:
                enums.setdefault(field.enum_type.full_name, field.enum_type)

    for m in descriptor.methods:
        if method is None or m.name == method:
            visit(m.input_type)
            visit(m.output_type)
    return list(seen.values()), list(enums.values())


async def cmd_describe(reactor: ICommandReactor, args: argparse.Namespace) -> int:
    service, method = split_symbol(args.symbol)
    client, descriptor = await reflected(reactor, args, service)
    await client.close()
    methods = [m for m in descriptor.methods if method is None or m.name == method]
    if not methods:
        raise _no_method(service, method)
    lines = [f"service {descriptor.full_name} {{"]
    for m in methods:
        takes = "stream " if m.client_streaming else ""
        gives = "stream " if m.server_streaming else ""
        lines.append(
            f"  rpc {m.name}({takes}{m.input_type.full_name})"
            f" returns ({gives}{m.output_type.full_name});"
        )
    lines.append("}")
    messages, enums = _messages_used(descriptor, method)
    for message in messages:
        lines.append("")
        lines.extend(describe_message(message))
    for enum in enums:
        lines.append("")
        lines.extend(describe_enum(enum))
    print("\n".join(lines))
    return 0


def _no_method(service: str, method: str | None) -> UserError:
    """NOT_FOUND, as a provider would answer it (and its exit status)."""
    return UserError(f"NOT_FOUND: {service} has no method {method}", EXIT_CALL_FAILED + 5)


def parse_headers(headers: Sequence[str]) -> dict[str, str]:
    metadata = {}
    for header in headers:
        key, sep, value = header.partition("=")
        if not sep or not key.strip():
            raise UserError(f"-H {header!r}: expected key=value", 2)
        metadata[key.strip()] = value
    return metadata


async def cmd_call(reactor: ICommandReactor, args: argparse.Namespace) -> int:
    service, method = split_symbol(args.method)
    if method is None:
        raise UserError(f"{args.method!r}: expected package.Service.Method", 2)
    metadata = parse_headers(args.header)
    client, descriptor = await reflected(reactor, args, service)
    try:
        proxy = client.proxy(descriptor, metadata=metadata)
        stub = getattr(proxy, method, None)
        if stub is None:
            raise _no_method(service, method)
        method_descriptor = descriptor.methods_by_name[method]
        if method_descriptor.client_streaming or method_descriptor.server_streaming:
            return await _call_stream(reactor, stub, method_descriptor, args)
        text = "{}" if args.request is None else args.request
        request = parse_request(text, message_class(method_descriptor.input_type))
        response = await stub(request)
        print(to_json(response, indent=2))
        return 0
    finally:
        await client.close()


async def _call_stream(
    reactor: ICommandReactor, stub: Any, method: Any, args: argparse.Namespace
) -> int:
    """A streaming call with stdin and stdout on the reactor (``_cli_streams``)."""
    from twisted.internet.stdio import StandardIO

    lines = StdioLines()
    stdio = StandardIO(lines, reactor=reactor)  # type: ignore[no-untyped-call]
    try:
        return await call_stream(stub, method, args.request, lines, args.stream_timeout)
    finally:
        await lines.finish()  # what was printed is out, whatever the call's end
        stdio.loseConnection()  # type: ignore[no-untyped-call]
        for fd in (0, 1):  # StandardIO made them non-blocking; the shell expects otherwise
            with contextlib.suppress(OSError):
                fdesc.setBlocking(fd)  # type: ignore[no-untyped-call]


async def cmd_health(reactor: ICommandReactor, args: argparse.Namespace) -> int:
    if args.endpoint:
        targets = [(args.endpoint, args.service)]
    else:
        layout = await zookeeper_layout(reactor, args.zk, args.root, args.timeout)
        services = [args.service] if args.service else list(layout)
        targets = [(node["address"], s) for s in services for node in layout.get(s, [])]
        if not targets:
            raise UserError(f"no providers of {args.service or 'any service'} in ZooKeeper")
    healthy = True
    for endpoint, service in targets:
        client = client_for(reactor, endpoint, args)
        try:
            health = client.proxy(HEALTH)
            reply = await health.Check(HealthCheckRequest(service=service))
            status = status_name(reply.status)
            healthy = healthy and reply.status == SERVING
        except RpcError as e:
            status, healthy = f"unreachable ({e})", False
        finally:
            await client.close()
        print(f"{endpoint}  {service or '(provider)'}  {status}")
    return 0 if healthy else EXIT_UNREACHABLE


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--zk", metavar="HOSTS", help="ZooKeeper connect string (h1:2181,h2:2181)")
    group.add_argument("--endpoint", metavar="HOST:PORT", help="a provider's address")
    where.add_argument("--root", default="/mprpc", help="registry root in ZooKeeper (/mprpc)")
    where.add_argument("--timeout", type=float, default=5.0, help="seconds per call (5)")

    parser = argparse.ArgumentParser(
        prog="mprpc", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--version", action="version", version=f"mprpc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "list",
        parents=[where],
        help="services and their providers",
        description="List services: from ZooKeeper with their providers (address, weight, "
        "version, uptime), or those one --endpoint serves.",
    )
    describe = commands.add_parser(
        "describe",
        parents=[where],
        help="a service's methods and messages",
        description="Print a service (or one method) and its messages, from reflection.",
    )
    describe.add_argument("symbol", help="package.Service or package.Service.Method")
    call = commands.add_parser(
        "call",
        parents=[where],
        help="call a method with a JSON request",
        description="Call a method; the request is JSON (protobuf's JSON mapping), the "
        "response is printed as JSON. A server stream prints one JSON object a line; a "
        "client stream or bidi reads its requests from stdin, one JSON object a line "
        "(EOF ends them), and prints the replies as JSON lines. Exit status 64 + the "
        "code on an RPC error.",
    )
    call.add_argument("method", help="package.Service.Method")
    call.add_argument(
        "request",
        nargs="?",
        default=None,
        help="the request as JSON ({}); none for a client stream or bidi (stdin)",
    )
    call.add_argument(
        "--stream-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deadline of a streaming call (none: until it ends, or Ctrl-C)",
    )
    call.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="call metadata (repeatable)",
    )
    health = commands.add_parser(
        "health",
        parents=[where],
        help="the Health service's answer",
        description="Check providers' health (all providers of SERVICE with --zk). "
        "Exit 0 only when every answer is SERVING.",
    )
    health.add_argument("service", nargs="?", default="", help="package.Service ('' = provider)")
    return parser


COMMANDS = {"list": cmd_list, "describe": cmd_describe, "call": cmd_call, "health": cmd_health}


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.zk and not args.endpoint:
        parser.error(f"{args.command}: give --zk HOSTS or --endpoint HOST:PORT")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    stream_timeout = getattr(args, "stream_timeout", None)
    if stream_timeout is not None and not stream_timeout > 0:
        parser.error("--stream-timeout must be positive")
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)  # its retries are not news here
    from twisted.internet import reactor

    status: list[int] = []

    def done(result: Any) -> None:
        status.append(result if isinstance(result, int) else report(result.value))
        reactor.stop()

    # Every real reactor provides IReactorFromThreads too; Twisted's type of the
    # global reactor names only the interfaces common to all of them.
    commands_reactor = cast("ICommandReactor", reactor)

    def start() -> None:
        Deferred.fromCoroutine(COMMANDS[args.command](commands_reactor, args)).addBoth(done)

    reactor.callWhenRunning(start)
    reactor.run()
    sys.stdout.flush()
    raise SystemExit(status[0] if status else EXIT_UNREACHABLE)


def report(error: BaseException) -> int:
    """Print one line for ``error`` and return the exit status."""
    if isinstance(error, UserError):
        line, status = str(error), error.status
    elif isinstance(error, RpcError):
        line = f"{code_name(error.code)}: {error.message}"
        if "mprpc.reflection.v1.Reflection" in error.message:
            line += " (the provider runs with [provider] reflection = no)"
        elif "mprpc.health.v1.Health" in error.message:
            line += " (the provider runs with [provider] health = no)"
        status = EXIT_CALL_FAILED + int(error.code)
    else:
        line, status = f"{type(error).__name__}: {error}", EXIT_UNREACHABLE
    print("mprpc: " + " ".join(line.split()), file=sys.stderr)
    return status


if __name__ == "__main__":
    main()
