"""TLS between real twistd providers and clients, with a CA made at test time."""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO
from testbed.processes import Provider
from testbed.protos import echo_pb2
from twisted_rpc import Client, ClientTLS, ConfigError, UnavailableError, load_provider_config

pytestmark = pytest.mark.integration


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key) -> tuple[str, str]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def make_ca(directory: Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path, _ = _write(directory, name, cert, key)
    return cert, key, path


def issue(directory: Path, ca, stem: str, ip: str | None = None) -> tuple[str, str]:
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return _write(directory, stem, builder.sign(ca_key, hashes.SHA256()), key)


class TLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tls-"))
        self.ca = make_ca(self.dir, "test-ca")
        self.other_ca = make_ca(self.dir, "other-ca")
        self.server_cert, self.server_key = issue(self.dir, self.ca, "provider", ip="127.0.0.1")
        self.client_cert, self.client_key = issue(self.dir, self.ca, "consumer")

    def provider(self, mutual: bool) -> Provider:
        extra = f"[tls]\ncertificate = {self.server_cert}\nprivate_key = {self.server_key}\n" + (
            f"client_ca = {self.ca[2]}\n" if mutual else ""
        )
        provider = Provider(self.dir, extra)
        self.addCleanup(provider.stop)
        return provider

    def echo(self, provider: Provider, tls: ClientTLS):
        client = Client(
            reactor, providers={"mprpc.test.EchoService": [provider.address]}, tls=tls, timeout=5
        )
        self.addCleanup(client.close)
        return client.proxy(ECHO)

    async def test_server_certificate_is_verified(self) -> None:
        provider = self.provider(mutual=False)
        good = self.echo(provider, ClientTLS(ca=self.ca[2]))
        reply = await good.Echo(echo_pb2.EchoRequest(payload=b"over tls"))
        self.assertEqual(reply.payload, b"over tls")
        wrong = self.echo(provider, ClientTLS(ca=self.other_ca[2]))
        with self.assertRaises(UnavailableError):
            await wrong.Echo(echo_pb2.EchoRequest())
        plain = Client(reactor, providers={"mprpc.test.EchoService": [provider.address]}, timeout=2)
        self.addCleanup(plain.close)
        with self.assertRaises(UnavailableError):
            await plain.proxy(ECHO).Echo(echo_pb2.EchoRequest())  # no TLS: refused

    async def test_mutual_tls_requires_a_client_certificate(self) -> None:
        provider = self.provider(mutual=True)
        anonymous = self.echo(provider, ClientTLS(ca=self.ca[2]))
        with self.assertRaises(UnavailableError):
            await anonymous.Echo(echo_pb2.EchoRequest())
        known = self.echo(
            provider,
            ClientTLS(ca=self.ca[2], certificate=self.client_cert, private_key=self.client_key),
        )
        reply = await known.Echo(echo_pb2.EchoRequest(payload=b"mutual"))
        self.assertEqual(reply.payload, b"mutual")


def test_bad_tls_files_are_a_config_error(tmp_path):
    config = tmp_path / "p.ini"
    config.write_text(
        "[provider]\nlisten = tcp:0\nservices = a:B\n"
        f"[tls]\ncertificate = {tmp_path}/missing.pem\nprivate_key = {tmp_path}/missing.key\n"
    )
    with pytest.raises(ConfigError, match=r"\[tls\] cannot read certificate"):
        load_provider_config(str(config))


def test_a_connection_refused_by_a_limit_is_closed_under_tls_too():
    """A connection over a limit must be closed on accept under TLS as without
    it (a refusal returned as None was wrapped by the TLS factory and left the
    socket open and uncounted)."""
    import twisted.test
    from twisted.internet import ssl
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from testbed.echo_service import EchoService
    from twisted_rpc import Dispatcher, ServerLimits, wrap_server_factory
    from twisted_rpc.server import ServerFactory

    pem = Path(twisted.test.__file__).with_name("server.pem")  # Twisted's test certificate
    options = ssl.PrivateCertificate.loadPEM(pem.read_bytes()).options()
    factory = ServerFactory(
        Dispatcher([EchoService()]), Clock(), limits=ServerLimits(max_connections_per_peer=1)
    )
    tls = wrap_server_factory(factory, options)
    addr = IPv4Address("TCP", "127.0.0.1", 5555)
    transports = []
    for _ in range(2):
        transport = StringTransport(peerAddress=addr)
        tls.buildProtocol(addr).makeConnection(transport)
        transports.append(transport)
    assert [t.disconnecting for t in transports] == [False, True]
    assert len(factory.connections) == 1
