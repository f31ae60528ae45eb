"""Which wire a consumer dials: ``Client(protocol="grpc")``, a registry
node's ``protocol``/``protocols``, ``[consumer] protocol``; and a proxy call
through a gRPC channel, end to end in memory."""

from __future__ import annotations

import json

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived
from twisted.internet.testing import MemoryReactorClock, StringTransport

from testbed.protos import echo_pb2
from tests.helpers import failure_of, result
from tests.unit.grpc.grpc_peer import OK_HEADERS, of
from twisted_rpc import Client, ClientOptions, ConfigError, NotFoundError, load_consumer_config
from twisted_rpc.discovery import ProviderAddress, StaticRegistry
from twisted_rpc.discovery._layout import BadNode, decode_provider
from twisted_rpc.discovery._types import dial_address
from twisted_rpc.grpc import GrpcClientConnection
from twisted_rpc.grpc._wire import frame_message

ECHO = echo_pb2.DESCRIPTOR.services_by_name["EchoService"]
SERVICE = "mprpc.test.EchoService"


def _node(**info) -> ProviderAddress:
    return decode_provider("x", json.dumps({"host": "10.0.0.1", "port": 8000, **info}).encode())


@pytest.mark.parametrize(
    ("info", "preferred", "wire", "port"),
    [
        ({}, "native", "native", 8000),
        ({}, "grpc", "grpc", 8000),  # an address that says nothing: the client's choice
        ({"protocol": "grpc"}, "native", "grpc", 8000),
        ({"protocol": "native"}, "grpc", "native", 8000),
        ({"protocols": {"native": 8000, "grpc": 50051}}, "native", "native", 8000),
        ({"protocols": {"native": 8000, "grpc": 50051}}, "grpc", "grpc", 50051),
        ({"protocols": {"native": 8000}}, "grpc", "native", 8000),
    ],
)
def test_a_node_says_how_it_is_dialled(info, preferred, wire, port):
    address = dial_address(_node(**info), preferred)
    assert (address.data["protocol"], address.port, address.host) == (wire, port, "10.0.0.1")


@pytest.mark.parametrize(
    "info",
    [
        {"protocol": "http3"},
        {"protocol": 1},
        {"protocols": [8000]},
        {"protocols": {"grpc": "50051"}},
        {"protocols": {"grpc": 70000}},
    ],
)
def test_a_node_naming_a_wire_it_cannot_be_dialled_with_is_bad(info):
    with pytest.raises(BadNode):
        _node(**info)


def test_client_options_and_the_consumer_ini_take_the_protocol(tmp_path):
    assert ClientOptions(protocol="grpc").protocol == "grpc"
    with pytest.raises(ValueError, match="protocol"):
        ClientOptions(protocol="http")
    path = tmp_path / "consumer.ini"
    path.write_text("[consumer]\nprotocol = grpc\n")
    assert load_consumer_config(str(path)).options.protocol == "grpc"
    path.write_text("[consumer]\nprotocol = grcp\n")
    with pytest.raises(ConfigError, match="protocol"):
        load_consumer_config(str(path))


def _built(reactor) -> object:
    _, _, factory, _, _ = reactor.tcpClients[-1]
    return factory.buildProtocol(None)


def test_the_client_dials_static_addresses_with_grpc_when_asked():
    reactor = MemoryReactorClock()
    client = Client(reactor, providers={SERVICE: ["127.0.0.1:50051"]}, protocol="grpc")
    client.proxy(ECHO)
    (channel,) = client.channels.values()
    assert channel.protocol_name == "grpc"
    assert isinstance(_built(reactor)._wrappedProtocol, GrpcClientConnection)
    native = Client(reactor, providers={SERVICE: ["127.0.0.1:8000"]})
    native.proxy(ECHO)
    assert not isinstance(_built(reactor)._wrappedProtocol, GrpcClientConnection)


def test_discovery_mixes_both_wires_and_a_node_changing_wire_is_redialled():
    reactor = MemoryReactorClock()
    grpc_node = ProviderAddress("127.0.0.1", 50051, data={"protocol": "grpc"})
    both = ProviderAddress("127.0.0.1", 8000, data={"protocols": {"native": 8000, "grpc": 9}})
    client = Client(reactor, discovery=StaticRegistry({SERVICE: [grpc_node, both]}))
    client.proxy(ECHO)
    wires = {c.address.port: c.protocol_name for c in client.channels.values()}
    assert wires == {50051: "grpc", 8000: "native"}  # native preferred when both
    old = client.channels["127.0.0.1:8000"]
    client._providers_changed(
        client._routes[SERVICE],
        SERVICE,
        [ProviderAddress("127.0.0.1", 8000, data={"protocol": "grpc"})],
    )
    assert client.channels["127.0.0.1:8000"].protocol_name == "grpc"
    assert old.state == "closed"


def test_a_proxy_call_goes_through_a_grpc_channel_end_to_end():
    reactor = MemoryReactorClock()
    client = Client(reactor, providers={SERVICE: ["127.0.0.1:50051"]}, protocol="grpc")
    echo = client.proxy(ECHO)
    first = echo.Echo(echo_pb2.EchoRequest(payload=b"1"), timeout=5, metadata={"who": "me"})
    protocol = _built(reactor)
    transport = StringTransport()
    protocol.makeConnection(transport)  # the channel proves it with a PING
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    events = []

    def pump():
        for _ in range(50):
            out = transport.value()
            transport.clear()
            if out:
                events.extend(server.receive_data(out))
            back = server.data_to_send()
            if back:
                protocol.dataReceived(back)
            if not out and not back:
                return

    pump()
    (request,) = of(events, RequestReceived)
    assert dict(request.headers)[b"who"] == b"me"
    server.send_headers(1, OK_HEADERS)
    server.send_data(1, frame_message(echo_pb2.EchoReply(payload=b"one").SerializeToString()))
    server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    pump()
    assert result(first).payload == b"one"
    second = echo.Echo(echo_pb2.EchoRequest())  # the channel is ready: sent at once
    pump()
    server.send_headers(3, OK_HEADERS + [("grpc-status", "5"), ("grpc-message", "nope")])
    pump()
    error = failure_of(second)
    assert isinstance(error, NotFoundError) and error.message == "nope"
