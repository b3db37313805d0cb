"""Certificates made by the tests (the `cryptography` package): a CA, a server certificate for
127.0.0.1, localhost and `server` (the compose service name nginx checks), and client
certificates, written as PEM files.

    pki = make_pki(tmp_path)   # pki.ca, pki.server_cert, pki.server_key, pki.client_cert, ...

Two certificate authorities, as a deployment would have them apart: `ca` signs the server's
certificate (clients trust it), `client_ca` signs the clients' (the server trusts it). `rogue_*`
is a client certificate from a third CA that the server does not trust.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Pki:
    """PEM files: the trust roots and each party's certificate and key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: Key,
    issuer: tuple[x509.Name, Key] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("server"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, certificate: x509.Certificate, key: Key) -> Path:
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path = directory / f"{name}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _authority(directory: Path, name: str) -> tuple[Path, tuple[x509.Name, Key]]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(name, key, None, ca=True)
    return _write(directory, name, certificate, key), (certificate.subject, key)


def _leaf(
    directory: Path, name: str, issuer: tuple[x509.Name, Key], *, server: bool = False
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(name, key, issuer, server=server)
    return _write(directory, name, certificate, key), directory / f"{name}.key"


def make_pki(directory: Path) -> Pki:
    """Makes the CAs and certificates under `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, server_issuer = _authority(directory, "server-ca")
    client_ca, client_issuer = _authority(directory, "client-ca")
    _, rogue_issuer = _authority(directory, "rogue-ca")
    server_cert, server_key = _leaf(directory, "server", server_issuer, server=True)
    client_cert, client_key = _leaf(directory, "client", client_issuer)
    rogue_cert, rogue_key = _leaf(directory, "rogue", rogue_issuer)
    return Pki(
        ca, server_cert, server_key, client_ca, client_cert, client_key, rogue_cert, rogue_key
    )
