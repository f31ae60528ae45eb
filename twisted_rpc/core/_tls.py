"""TLS for providers and consumers, from PEM files (pyOpenSSL through Twisted).

Provider: :func:`server_options` (its certificate and key; with ``client_ca``,
clients must present a certificate signed by that CA: mutual TLS). Consumer:
:class:`ClientTLS` (the CA that signed providers' certificates, and for mutual
TLS its own certificate and key); the provider's certificate is verified
against the address dialled (an IP address or a host name in its SANs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (pyOpenSSL is imported only when TLS is used)
    from twisted.internet.interfaces import (
        IOpenSSLClientConnectionCreator,
        IProtocolFactory,
        IStreamClientEndpoint,
    )
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.tls import TLSMemoryBIOFactory

__all__ = ["ClientTLS", "server_options", "wrap_client_endpoint", "wrap_server_factory"]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def server_options(certificate: str, private_key: str, client_ca: str = "") -> CertificateOptions:
    """Twisted ``CertificateOptions`` for a provider."""
    from twisted.internet import ssl

    try:
        own = ssl.PrivateCertificate.loadPEM(
            _read(certificate, "certificate") + b"\n" + _read(private_key, "private key")
        )
        options: CertificateOptions
        if client_ca:
            options = own.options(ssl.Certificate.loadPEM(_read(client_ca, "client CA")))
        else:
            options = own.options()
        return options
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"bad TLS certificate or key: {e}") from None


def wrap_server_factory(
    factory: IProtocolFactory, options: CertificateOptions
) -> TLSMemoryBIOFactory:
    """The factory that speaks TLS around ``factory``'s connections.

    ``factory`` must build a protocol for every connection, refused ones
    included (``RefusedConnection``, which closes itself): the TLS factory
    would wrap a None and leave the socket open.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    return TLSMemoryBIOFactory(options, False, factory)


@dataclass(frozen=True)
class ClientTLS:
    """How a consumer dials providers over TLS (PEM file paths)."""

    ca: str = ""
    """CA certificate that signed the providers' certificates ('' = the platform's)."""
    certificate: str = ""
    """This consumer's certificate, for providers that require one."""
    private_key: str = ""

    def options_for(self, host: str, alpn: Sequence[bytes] = ()) -> IOpenSSLClientConnectionCreator:
        """``alpn``: the protocols offered by ALPN (``b"h2"`` for gRPC), if any."""
        from twisted.internet import ssl

        trust = ssl.Certificate.loadPEM(_read(self.ca, "CA")) if self.ca else None
        client = None
        if self.certificate:
            client = ssl.PrivateCertificate.loadPEM(
                _read(self.certificate, "certificate") + b"\n" + _read(self.private_key, "key")
            )
        return ssl.optionsForClientTLS(
            host, trustRoot=trust, clientCertificate=client, acceptableProtocols=alpn or None
        )


def wrap_client_endpoint(
    endpoint: IStreamClientEndpoint, tls: ClientTLS, host: str, alpn: Sequence[bytes] = ()
) -> IStreamClientEndpoint:
    """``endpoint`` with TLS on top, verifying the provider as ``host``
    (offering ``alpn`` protocols, if any)."""
    from twisted.internet.endpoints import wrapClientTLS

    return wrapClientTLS(tls.options_for(host, alpn), endpoint)
