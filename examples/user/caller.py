"""UserService consumer (the caller): python -m examples.user.caller [--config etc/consumer.ini]."""

from __future__ import annotations

from examples.cli import run
from examples.protos import user_pb2
from twisted_rpc import Client, RpcError


async def main(reactor, config: str) -> None:
    client = Client.from_config(config, reactor)
    users = client.proxy(user_pb2.DESCRIPTOR.services_by_name["UserService"])
    try:
        login = await users.Login(user_pb2.LoginRequest(name="zhang san", pwd="123456"))
        print(f"Login(zhang san) -> success={login.success} errcode={login.result.errcode}")
        reg = await users.Register(user_pb2.RegisterRequest(id=2000, name="mprpc", pwd="666666"))
        print(f"Register(mprpc) -> success={reg.success} errcode={reg.result.errcode}")
        login = await users.Login(user_pb2.LoginRequest(name="mprpc", pwd="wrong"))
        print(f"Login(mprpc, wrong pwd) -> success={login.success} errmsg={login.result.errmsg!r}")
    except RpcError as e:
        print(f"UserService call failed: {e}")
        raise SystemExit(1) from None
    finally:
        await client.close()


if __name__ == "__main__":
    run(main, __doc__)
