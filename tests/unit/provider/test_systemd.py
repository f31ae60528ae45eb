"""``systemd:`` listeners: the endpoint's arguments are checked when options
are built, the inherited descriptor when the provider starts."""

from __future__ import annotations

import configparser
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.endpoints import _SystemdParser
from twisted.internet.testing import MemoryReactorClock
from twisted.python.systemd import ListenFDs

from testbed.echo_service import EchoService
from twisted_rpc import ConfigError, ProviderAddress, ProviderOptions, ProviderService
from twisted_rpc.provider import load_provider_config
from twisted_rpc.provider._options import check_server_endpoint
from twisted_rpc.provider._systemd import inherited_descriptor


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


@pytest.mark.parametrize(
    "endpoint",
    [
        "systemd:domain=INET:index=0",
        "systemd:domain=INET6:index=2",
        "systemd:domain=UNIX:name=rpc",
        "systemd:name=mprpc-provider.socket:domain=INET",
    ],
)
def test_systemd_endpoints_are_accepted_in_options(endpoint):
    check_server_endpoint(endpoint)
    assert ProviderOptions(listen=endpoint, cpp_listen=endpoint).listen == endpoint
    assert ProviderOptions(grpc_listen=endpoint).grpc_listen == (endpoint,)


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("systemd:index=0", "domain= must be one of INET, INET6, UNIX, not None"),
        ("systemd:domain=INET7:index=0", "not 'INET7'"),
        ("systemd:domain=INET", "exactly one of index= and name="),
        ("systemd:domain=INET:index=0:name=rpc", "exactly one of index= and name="),
        ("systemd:domain=INET:index=-1", "index= must be a number >= 0, not '-1'"),
        ("systemd:domain=INET:index=one", "index= must be a number >= 0"),
        ("systemd:domain=INET:name=", "name= must not be empty"),
        ("systemd:domain=INET:index=0:backlog=5", "only domain=, index= and name= (not backlog)"),
        ("systemd:3:domain=INET", "only domain=, index= and name= (not 3)"),
    ],
)
def test_bad_systemd_endpoints_are_refused_with_the_reason(endpoint, why):
    with pytest.raises(ValueError, match="ProviderOptions.listen") as e:
        ProviderOptions(listen=endpoint)
    assert why in str(e.value)


def test_the_inherited_descriptor_is_found_by_index_and_by_name(listening):
    fds = ListenFDs([listening.fileno()], ("web",))
    fd = listening.fileno()
    assert inherited_descriptor("systemd:domain=INET:index=0", fds) == fd
    assert inherited_descriptor("systemd:domain=INET:name=web", fds) == fd
    assert inherited_descriptor("tcp:0", fds) is None
    assert listening.getsockname()[1] > 0  # (looked at through a copy: still open)


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("systemd:domain=INET:index=1", "no descriptor at index=1: this process"),
        ("systemd:domain=INET:name=rpc", "no descriptor named 'rpc' (LISTEN_FDNAMES: web)"),
        ("systemd:domain=INET6:index=0", "is not a listening AF_INET6 stream socket (AF_INET"),
    ],
)
def test_a_missing_or_wrong_descriptor_is_one_clear_error(listening, endpoint, why):
    fds = ListenFDs([listening.fileno()], ("web",))
    with pytest.raises(ValueError) as e:
        inherited_descriptor(endpoint, fds)
    assert why in str(e.value)
    assert "\n" not in str(e.value)


def test_a_descriptor_that_is_no_listening_stream_socket_is_refused():
    read, write = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        for fd, why in [
            (read, "is not a socket"),
            (udp.fileno(), "(AF_INET, SOCK_DGRAM, not listening)"),
            (tcp.fileno(), "(AF_INET, SOCK_STREAM, not listening)"),
        ]:
            with pytest.raises(ValueError, match=f"descriptor {fd} ") as e:
                inherited_descriptor("systemd:domain=INET:index=0", ListenFDs([fd], ("x",)))
            assert why in str(e.value)
    finally:
        udp.close()
        tcp.close()
        os.close(read)
        os.close(write)


def test_without_inherited_descriptors_the_provider_does_not_start():
    """(The test process inherited none.) Built in code: ValueError from the
    provider, not an IndexError from Twisted's endpoint."""
    options = ProviderOptions(listen="systemd:domain=INET:index=0")
    with pytest.raises(ValueError, match="no descriptor at index=0: this process"):
        ProviderService(MemoryReactorClock(), [EchoService()], options)


SERVICES = "services = testbed.echo_service:EchoService\n"


@pytest.mark.parametrize(
    "text",
    [
        f"[provider]\nlisten = systemd:domain=INET:index=0\n{SERVICES}",
        f"[provider]\nlisten = tcp:0\n{SERVICES}[grpc]\nlisten = systemd:domain=INET:name=g\n",
        f"[provider]\nlisten = tcp:0\n{SERVICES}[cpp]\nlisten = systemd:domain=INET:index=1\n",
    ],
)
def test_the_config_file_names_the_missing_descriptor(tmp_path: Path, text):
    path = tmp_path / "provider.ini"
    path.write_text(text)
    with pytest.raises(ConfigError, match="listen = 'systemd:domain=INET:") as e:
        load_provider_config(str(path))
    assert "no descriptor" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture
def handed_over(listening, monkeypatch) -> Iterator[int]:
    """This process seen as started by mprpc-provider.socket (FileDescriptorName=mprpc),
    given a copy of ``listening``, closed at the end unless adopted (the
    endpoint closes the descriptor it adopts, the port holding a copy)."""
    fd = os.dup(listening.fileno())
    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([fd], ("mprpc",)))
    yield fd
    if _SystemdParser._sddaemon._descriptors:
        os.close(fd)


@pytest.mark.parametrize(
    ("advertise", "registered"),
    [
        (ProviderAddress("192.0.2.10", 8000), ProviderAddress("192.0.2.10", 8000)),
        # Else the socket's bound address (MemoryReactor's adopted port: 0.0.0.0:1234).
        (None, ProviderAddress("0.0.0.0", 1234)),
    ],
)
def test_the_provider_adopts_the_socket_and_advertises(handed_over, advertise, registered):
    reactor = MemoryReactorClock()
    provider = ProviderService(
        reactor, [EchoService()], listen="systemd:domain=INET:name=mprpc", advertise=advertise
    )
    provider.startService()
    [(fd, family, _)] = reactor.adoptedPorts
    assert (fd, family) == (handed_over, socket.AF_INET)
    assert reactor.tcpServers == []
    assert provider.advertise == registered
    with pytest.raises(OSError):
        os.fstat(fd)  # the endpoint closed the inherited descriptor
    _SystemdParser._sddaemon = ListenFDs([], ())  # (restored by monkeypatch)


def test_the_etc_units_and_config_agree(handed_over):
    """etc/provider-systemd.ini loads with the socket etc/mprpc-provider.socket
    makes (its name, an AF_INET address), and the service runs twistd -n on it."""
    units = configparser.ConfigParser(strict=False, interpolation=None)
    units.read(["etc/mprpc-provider.socket", "etc/mprpc-provider.service"])
    name = units["Socket"]["FileDescriptorName"]
    assert units["Socket"]["ListenStream"].startswith("0.0.0.0:")  # AF_INET
    exec_start = units["Service"]["ExecStart"]
    assert " -n --pidfile= mprpc --config " in exec_start
    assert exec_start.endswith("etc/provider-systemd.ini")
    config = load_provider_config("etc/provider-systemd.ini")
    assert config.listen == f"systemd:domain=INET:name={name}"
    assert config.advertise is not None


@pytest.fixture
def three_sockets(monkeypatch) -> Iterator[list[int]]:
    """Three listening sockets handed over as native, cpp and grpc."""
    socks = []
    for _ in range(3):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        socks.append(sock)
    fds = [os.dup(s.fileno()) for s in socks]
    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs(fds, ("native", "cpp", "grpc")))
    yield fds
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            continue  # (adopted and closed by the endpoint)
        os.close(fd)
    for sock in socks:
        sock.close()


def test_every_listener_can_adopt_a_socket(three_sockets):
    """The native, C++ and gRPC listeners each adopt the descriptor they name."""
    native, cpp, grpc = three_sockets
    reactor = MemoryReactorClock()
    provider = ProviderService(
        reactor,
        [EchoService()],
        listen="systemd:domain=INET:name=native",
        cpp_listen="systemd:domain=INET:name=cpp",
        grpc_listen="systemd:domain=INET:index=2",
    )
    provider.startService()
    adopted = {fd: factory for fd, _, factory in reactor.adoptedPorts}
    assert adopted == {
        native: provider.factory,
        cpp: provider.cpp_factory,
        grpc: provider.grpc_factory,
    }
    assert reactor.tcpServers == []


def test_the_config_file_may_not_adopt_one_descriptor_twice(three_sockets, tmp_path):
    path = tmp_path / "provider.ini"
    path.write_text(
        f"[provider]\nlisten = systemd:domain=INET:index=1\n{SERVICES}"
        "[cpp]\nlisten = systemd:domain=INET:name=cpp\n"
    )
    with pytest.raises(ConfigError) as e:
        load_provider_config(str(path))
    assert str(e.value) == (
        f"{path}: [cpp] listen and [provider] listen both name inherited descriptor "
        f"{three_sockets[1]}"
    )
    path.write_text(
        f"[provider]\nlisten = systemd:domain=INET:index=0\n{SERVICES}"
        "[cpp]\nlisten = systemd:domain=INET:name=cpp\n"
        "[grpc]\nlisten = systemd:domain=INET:name=grpc\n"
    )
    config = load_provider_config(str(path))
    assert config.grpc is not None and config.grpc.listen == ("systemd:domain=INET:name=grpc",)
