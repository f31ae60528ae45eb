"""The C++ mprpc wire format: the original example's bytes, encoded and decoded exactly."""

from __future__ import annotations

import struct

import pytest

from examples.mprpc_compat import user_pb2
from twisted_rpc.cpp import CppProtocolError, CppRequest, RequestReader, encode_request
from twisted_rpc.cpp._wire import RpcHeader

# Observed on the wire from the C++ example (see the issue and docs/mprpc-compat.md).
LOGIN = (
    bytes.fromhex("19000000")
    + b"\x0a\x0eUserServiceRpc\x12\x05Login\x18\x13"
    + b"\x0a\x09zhang san\x12\x06123456"
)
REGISTER = (
    bytes.fromhex("1c000000")
    + b"\x0a\x0eUserServiceRpc\x12\x08Register\x18\x12"
    + b"\x08\xd0\x0f\x12\x05mprpc\x1a\x06666666"
)
LOGIN_REPLY = bytes.fromhex("0a00")
REGISTER_REPLY = bytes.fromhex("0a001001")


def test_golden_requests_have_the_observed_lengths():
    assert (len(LOGIN), len(REGISTER)) == (48, 50)


def test_login_request_encodes_byte_for_byte():
    args = user_pb2.LoginRequest(name=b"zhang san", pwd=b"123456").SerializeToString()
    assert encode_request("UserServiceRpc", "Login", args) == LOGIN


def test_register_request_encodes_byte_for_byte():
    args = user_pb2.RegisterRequest(id=2000, name=b"mprpc", pwd=b"666666").SerializeToString()
    assert encode_request("UserServiceRpc", "Register", args) == REGISTER


def test_replies_encode_and_decode_byte_for_byte():
    login = user_pb2.LoginResponse(result=user_pb2.ResultCode(errcode=0), sucess=False)
    register = user_pb2.RegisterResponse(result=user_pb2.ResultCode(errcode=0), sucess=True)
    assert login.SerializeToString() == LOGIN_REPLY
    assert register.SerializeToString() == REGISTER_REPLY
    decoded = user_pb2.RegisterResponse.FromString(REGISTER_REPLY)
    assert decoded.HasField("result") and decoded.sucess and decoded.result.errcode == 0
    assert not user_pb2.LoginResponse.FromString(LOGIN_REPLY).sucess


@pytest.mark.parametrize("chunk", [1, 3, 7, 48])
def test_reader_reassembles_a_request_split_anywhere(chunk):
    reader = RequestReader(1 << 20)
    results = [reader.feed(LOGIN[i : i + chunk]) for i in range(0, len(LOGIN), chunk)]
    assert results[:-1] == [None] * (len(results) - 1)
    request = results[-1]
    assert request == CppRequest("UserServiceRpc", "Login", b"\x0a\x09zhang san\x12\x06123456")
    args = user_pb2.LoginRequest.FromString(request.args)
    assert (args.name, args.pwd) == (b"zhang san", b"123456")


def test_reader_decodes_register_and_counts_bytes_after_it():
    reader = RequestReader(1 << 20)
    request = reader.feed(REGISTER + b"xyz")
    assert (request.service, request.method) == ("UserServiceRpc", "Register")
    assert user_pb2.RegisterRequest.FromString(request.args).id == 2000
    assert reader.extra == 3
    assert reader.feed(b"more") is None and reader.extra == 7


def test_empty_args_complete_with_the_header():
    # args_size 0 is not serialized at all (proto3 default).
    assert (
        RpcHeader(service_name=b"S", method_name=b"M").SerializeToString() == b"\x0a\x01S\x12\x01M"
    )
    assert RequestReader(100).feed(encode_request("S", "M", b"")) == CppRequest("S", "M", b"")


def _framed(header: bytes) -> bytes:
    return struct.pack("<I", len(header)) + header


@pytest.mark.parametrize(
    "data, message",
    [
        (struct.pack("<I", 0), "header length 0"),
        (struct.pack("<I", 1 << 30), "not plausible"),
        (_framed(b"\xff\xff\xff"), "bad RpcHeader"),
        (_framed(b"\x12\x05Login"), "names no service"),
        (_framed(b"\x0a\x02\xff\xfe\x12\x01M"), "bad RpcHeader"),  # not UTF-8
        (
            _framed(
                RpcHeader(service_name=b"S", method_name=b"M", args_size=101).SerializeToString()
            ),
            "exceed the limit of 100",
        ),
    ],
)
def test_reader_rejects_what_cannot_be_a_request(data, message):
    with pytest.raises(CppProtocolError, match=message):
        RequestReader(100).feed(data)
