"""UserServiceRpc as the C++ mprpc example's callee implements it, in Python.

Served to C++ callers by ``twistd -n mprpc --cpp-config test.conf --service
examples.mprpc_compat.callee:UserServiceRpc`` (and to Python consumers on the
native protocol too, when a ``[provider] listen`` is configured).
"""

from __future__ import annotations

from examples.mprpc_compat import user_pb2
from twisted_rpc import CallContext, Service


class UserServiceRpc(Service, descriptor=user_pb2.DESCRIPTOR.services_by_name["UserServiceRpc"]):
    """The original's local Login (always false) and Register (always true)."""

    def Login(self, request: user_pb2.LoginRequest, context: CallContext) -> user_pb2.LoginResponse:
        # The original logs the name and password and answers sucess=false.
        return user_pb2.LoginResponse(result=user_pb2.ResultCode(errcode=0), sucess=False)

    def Register(
        self, request: user_pb2.RegisterRequest, context: CallContext
    ) -> user_pb2.RegisterResponse:
        return user_pb2.RegisterResponse(result=user_pb2.ResultCode(errcode=0), sucess=True)
