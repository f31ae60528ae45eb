"""The C++ mprpc example's caller, in Python: Login and Register over the mprpc protocol.

    python -m examples.mprpc_compat.caller --cpp-config examples/mprpc_compat/test.conf
    python -m examples.mprpc_compat.caller --provider 127.0.0.1:8000   # no ZooKeeper

It would call a C++ mprpc provider the same way.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import task
from twisted.internet.defer import Deferred

from examples.mprpc_compat import user_pb2
from twisted_rpc import RpcError
from twisted_rpc.cpp import CppClient


async def run(reactor, args: argparse.Namespace) -> None:
    if args.cpp_config:
        client = CppClient.from_cpp_config(args.cpp_config, reactor, timeout=5)
    else:
        client = CppClient(reactor, providers={"UserServiceRpc": args.provider}, timeout=5)
    proxy = client.proxy(user_pb2.DESCRIPTOR.services_by_name["UserServiceRpc"])
    try:
        login = await proxy.Login(user_pb2.LoginRequest(name=b"zhang san", pwd=b"123456"))
        print(f"rpc login response success: {login.sucess}")
        register = await proxy.Register(
            user_pb2.RegisterRequest(id=2000, name=b"mprpc", pwd=b"666666")
        )
        print(f"rpc register response success: {register.sucess}")
    except RpcError as e:
        print(f"rpc call failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--cpp-config",
        "--mprpc-config",
        help="C++ mprpc key=value config (uses its ZooKeeper); --mprpc-config is its old name",
    )
    where.add_argument("--provider", help="host:port of an mprpc provider, without ZooKeeper")
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
