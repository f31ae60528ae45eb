"""UserService provider (the callee): Login answered synchronously, Register async."""

from __future__ import annotations

from examples.protos import common_pb2, user_pb2
from twisted_rpc import CallContext, Service


class UserService(Service, descriptor=user_pb2.DESCRIPTOR.services_by_name["UserService"]):
    """Local business logic published as an RPC service."""

    def __init__(self) -> None:
        self.users: dict[str, str] = {"zhang san": "123456"}

    def Login(self, request: user_pb2.LoginRequest, context: CallContext) -> user_pb2.LoginResponse:
        ok = self.users.get(request.name) == request.pwd
        result = common_pb2.ResultCode(
            errcode=0 if ok else 1, errmsg="" if ok else "bad name or pwd"
        )
        return user_pb2.LoginResponse(result=result, success=ok)

    async def Register(
        self, request: user_pb2.RegisterRequest, context: CallContext
    ) -> user_pb2.RegisterResponse:
        if not request.name:
            result = common_pb2.ResultCode(errcode=1, errmsg="name is empty")
            return user_pb2.RegisterResponse(result=result, success=False)
        self.users[request.name] = request.pwd
        return user_pb2.RegisterResponse(result=common_pb2.ResultCode(errcode=0), success=True)
