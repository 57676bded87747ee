"""Certificates for etcd over TLS, made on the fly: the lab's, the tests' and the benchmarks'.

The seed's etcd series issues one CA and one ``server.pem``/``server-key.pem`` whose
hosts list holds every etcd member's address, and then uses that same pair as the
*client* certificate of etcdctl and flanneld (``-etcd-certfile=/opt/etcd/ssl/server.pem``).
So the server certificate here carries both serverAuth and clientAuth, and
:func:`make_pki` writes exactly the guide's three files: ``ca.pem``, ``server.pem``,
``server-key.pem`` (the lab bind-mounts that directory into every node; the CA key
never lands there). Callers that need more (a separate client certificate, a rogue
CA for negative tests) issue it with :func:`issue_pki`'s :class:`Authority`.
ECDSA P-256 keys keep generation instant.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loden.files import replace_file

SERVER_AND_CLIENT = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
CLIENT_ONLY = (ExtendedKeyUsageOID.CLIENT_AUTH,)


@dataclass(frozen=True, slots=True)
class EtcdPKI:
    """Paths of the PEM files an etcd server and its clients use.

    ``client_cert``/``client_key`` are what clients present; with :func:`make_pki` they
    are the server pair itself, as in the seed's guide.
    """

    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True, slots=True)
class Authority:
    """A CA kept in memory (its key is written nowhere unless a caller does so)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    days: int

    @classmethod
    def create(cls, common_name: str, *, days: int, organization: str | None = None) -> Authority:
        key = new_key()
        name = _name(common_name, organization)
        builder = _builder(name, name, key, days).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        return cls(_sign(builder, key, ca=True), key, days)

    def issue(
        self,
        common_name: str,
        *,
        sans: Sequence[x509.GeneralName] = (),
        usage: Sequence[x509.ObjectIdentifier] = SERVER_AND_CLIENT,
        organization: str | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A new key and a certificate for it signed by this CA."""
        key = new_key()
        builder = _builder(_name(common_name, organization), self.cert.subject, key, self.days)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        return _sign(builder, self.key, ca=False), key


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def server_sans(
    addresses: Sequence[IPv4Address | IPv6Address | str], hostnames: Sequence[str] = ()
) -> list[x509.GeneralName]:
    """``localhost`` + ``hostnames``, 127.0.0.1 + ``addresses`` (each once)."""
    ips = {ipaddress.ip_address("127.0.0.1"), *(ipaddress.ip_address(a) for a in addresses)}
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in ("localhost", *hostnames)]
    return sans + [x509.IPAddress(ip) for ip in sorted(ips, key=lambda ip: (ip.version, ip))]


def write_cert(path: Path, cert: x509.Certificate) -> None:
    replace_file(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The key in PKCS#8 PEM, mode 0600 from its first byte on."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    replace_file(path, data, mode=0o600)


def issue_pki(
    directory: Path,
    addresses: Sequence[IPv4Address | IPv6Address | str] = (),
    *,
    hostnames: Sequence[str] = (),
    days: int = 30,
    organization: str | None = "loden lab",
) -> tuple[EtcdPKI, Authority]:
    """Write ca.pem, server.pem and server-key.pem into ``directory`` (made 0700).

    The server certificate's SANs are ``addresses`` + 127.0.0.1 and ``hostnames`` +
    localhost. Returns the files and the CA (to issue more certificates with).

    :raises OSError: the directory or a file cannot be written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = Authority.create(
        f"{organization or 'loden'} etcd CA", days=days, organization=organization
    )
    cert, key = ca.issue("etcd", sans=server_sans(addresses, hostnames), organization=organization)
    files = EtcdPKI(
        dir=directory,
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "server.pem",
        client_key=directory / "server-key.pem",
    )
    write_cert(files.ca_cert, ca.cert)
    write_cert(files.server_cert, cert)
    write_key(files.server_key, key)
    return files, ca


def make_pki(
    directory: Path,
    addresses: Sequence[IPv4Address | IPv6Address | str] = (),
    *,
    hostnames: Sequence[str] = (),
    days: int = 30,
) -> EtcdPKI:
    """:func:`issue_pki` without the CA: the seed's three files."""
    return issue_pki(directory, addresses, hostnames=hostnames, days=days)[0]


def _name(common_name: str, organization: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _sign(
    builder: x509.CertificateBuilder, signer: ec.EllipticCurvePrivateKey, *, ca: bool
) -> x509.Certificate:
    builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return builder.sign(signer, hashes.SHA256())
