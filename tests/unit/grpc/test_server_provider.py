"""The gRPC listener in the provider: ``[grpc]`` in the ini file, the
ProviderOptions fields, the listener among the provider's, the drain, and
what the registrations say (``protocols``, ``protocol``)."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from twisted_rpc import (
    ConfigError,
    ProviderAddress,
    ProviderOptions,
    ProviderService,
    StaticRegistry,
    load_provider_config,
)
from twisted_rpc.grpc import GrpcServerFactory

from .h2peer import ASYNC_ECHO


def provider(**settings):
    reactor = MemoryReactorClock()
    registry = StaticRegistry()
    service = ProviderService(reactor, [EchoService()], registry=registry, **settings)
    service.startService()
    return reactor, registry, service


def test_both_listeners_register_the_native_address_with_both_ports():
    reactor, registry, service = provider(
        listen="tcp:7000:interface=127.0.0.1",
        grpc_listen="tcp:50051:interface=127.0.0.1",
        advertise=ProviderAddress("10.0.0.5", 7000),
        grpc_advertise=ProviderAddress("10.0.0.5", 50051),
    )
    # (port, factory, backlog, interface) of each listenTCP
    assert [(port, type(factory)) for port, factory, *_ in reactor.tcpServers][1] == (
        50051,
        GrpcServerFactory,
    )
    (registration,) = registry.registrations
    assert registration.address == ProviderAddress("10.0.0.5", 7000)
    assert registration.data["protocols"] == {"native": 7000, "grpc": 50051}
    assert "protocol" not in registration.data


def test_a_grpc_only_provider_registers_its_grpc_address_as_grpc():
    _, registry, service = provider(
        grpc_listen=("tcp:50051:interface=127.0.0.1", "tcp:50052:interface=127.0.0.1"),
        grpc_advertise=ProviderAddress("10.0.0.5", 50051),
    )
    (registration,) = registry.registrations
    assert registration.address == ProviderAddress("10.0.0.5", 50051)
    assert registration.data["protocol"] == "grpc"
    assert registration.data["protocols"] == {"grpc": 50051}
    assert service.listening.called and service.grpc_listening.called
    assert len(service.listeners) == 2


def test_options_check_the_grpc_endpoints():
    assert ProviderOptions(grpc_listen="tcp:1").grpc_listen == ("tcp:1",)
    with pytest.raises(ValueError, match="grpc_listen"):
        ProviderOptions(grpc_listen=("tcp:1", "nonsense:x"))
    with pytest.raises(ValueError, match="grpc_listen"):
        ProviderOptions()


def test_the_ini_grpc_section(tmp_path):
    path = tmp_path / "provider.ini"
    path.write_text(
        "[provider]\nservices = testbed.echo_service:EchoService\n"
        "[grpc]\nlisten = tcp:50051:interface=127.0.0.1\n    tcp:50052\n"
        "advertise = 10.0.0.5:50051\n"
    )
    config = load_provider_config(str(path))
    options = config.options()
    assert options.listen is None  # a gRPC listener alone is enough
    assert options.grpc_listen == ("tcp:50051:interface=127.0.0.1", "tcp:50052")
    assert options.grpc_advertise == ProviderAddress("10.0.0.5", 50051)
    path.write_text("[provider]\nservices = a:B\n[grpc]\nlisten = tcp:nope\n")
    with pytest.raises(ConfigError, match=r"\[grpc\] listen"):
        load_provider_config(str(path))
    path.write_text("[provider]\nservices = a:B\n[grpc]\nlisen = tcp:1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_provider_config(str(path))


def test_stopping_drains_the_grpc_listener_with_the_others():
    from .h2peer import GrpcPeer

    reactor, _, service = provider(
        listen="tcp:7000:interface=127.0.0.1", grpc_listen="tcp:50051", grace_period=10
    )
    peer = GrpcPeer.__new__(GrpcPeer)
    peer.attach(service.grpc_factory, reactor)
    stream_id = peer.open(ASYNC_ECHO)
    peer.send(stream_id, echo_pb2.EchoRequest(delay=3).SerializeToString(), end=True)
    peer.pump()
    assert service.calls_in_flight == 1
    stopped = service.stopService()
    peer.pump()
    assert peer.goaways and not stopped.called  # GOAWAY; the call still runs
    reactor.advance(3)
    peer.pump()
    assert peer.answers[stream_id].status == 0
    assert peer.closed
    peer.server.connectionLost()
    assert stopped.called
