"""The ZooKeeper layouts (twisted_rpc.discovery._layout): paths and node data, both layouts."""

from __future__ import annotations

import json

import pytest

from twisted_rpc.discovery import ProviderAddress, Registration
from twisted_rpc.discovery._layout import (
    BadNode,
    cpp_path,
    decode_cpp,
    decode_provider,
    encode_cpp,
    encode_provider,
    provider_info,
    provider_path,
    providers_path,
)


def test_native_paths():
    assert providers_path("/mprpc", "example.UserService") == "/mprpc/example.UserService/providers"
    assert (
        provider_path("/r", "example.UserService", "[::1]:8000")
        == "/r/example.UserService/providers/[::1]:8000"
    )


def test_a_native_node_reads_back_as_it_was_written():
    registration = Registration(
        "example.UserService", ProviderAddress("10.0.0.1", 8000, 50), {"pid": 7, "tls": True}
    )
    data = encode_provider(registration)
    assert json.loads(data) == {
        "host": "10.0.0.1",
        "port": 8000,
        "weight": 50,
        "pid": 7,
        "tls": True,
    }
    address = decode_provider("10.0.0.1:8000", data)
    assert address == ProviderAddress("10.0.0.1", 8000, 50)
    assert address.data["tls"] is True


def test_a_node_without_our_json_is_read_from_its_name():
    assert decode_provider("10.0.0.2:9000", b"") == ProviderAddress("10.0.0.2", 9000)
    with pytest.raises(BadNode, match="name is not host:port"):
        decode_provider("nonsense", b"[1, 2]")
    with pytest.raises(BadNode, match="bad port"):
        decode_provider("x", b'{"host": "10.0.0.1", "port": 0}')


def test_provider_info_reads_any_data_for_display():
    # A node holding JSON that is not an object (a list here) once stopped
    # `mprpc list` with an AttributeError; it now shows as a bare address.
    assert provider_info("10.0.0.1:8000", b"[1, 2]") == {"address": "10.0.0.1:8000"}
    assert provider_info("10.0.0.1:8000", b"\xff") == {"address": "10.0.0.1:8000"}
    assert provider_info("n", b'{"address": "a:1", "pid": 3}') == {"address": "a:1", "pid": 3}


def test_cpp_layout():
    assert cpp_path("UserServiceRpc", "Login") == "/UserServiceRpc/Login"
    assert encode_cpp(ProviderAddress("127.0.0.1", 8000)) == b"127.0.0.1:8000"
    assert decode_cpp(b"127.0.0.1:8000") == ProviderAddress("127.0.0.1", 8000)
    for bad in (b"\xff", b"no port", b""):
        with pytest.raises(ValueError):
            decode_cpp(bad)
