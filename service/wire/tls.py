"""TLS credentials of the gRPC port, from PEM files read once at start.

    python -m service --tls-cert-file server.pem --tls-key-file server.key \
        [--tls-client-ca-file clients-ca.pem]

With a client CA the server asks every client for a certificate and refuses the handshake of
one that presents none, or one no CA of the file signed (mutual TLS). Certificates are not
reloaded: docs/security.md says how to rotate them.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from service.errors import ConfigurationError


def read_pem(path: Path, setting: str, kind: str) -> bytes:
    """The file's bytes; ConfigurationError naming the setting when it cannot be read or holds
    no PEM block of `kind` (its content is never quoted: it may be a key)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"cannot read {setting} {path}: {error.strerror}") from None
    if f"-----BEGIN {kind}".encode() not in data and not (
        kind == "PRIVATE KEY" and b" PRIVATE KEY-----" in data  # RSA / EC PRIVATE KEY
    ):
        raise ConfigurationError(f"{setting} {path} holds no PEM {kind} (-----BEGIN {kind}-----)")
    return data


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """TLS with the certificate chain and key; mutual TLS when `client_ca_file` is given."""
    chain = read_pem(cert_file, "tls_cert_file", "CERTIFICATE")
    key = read_pem(key_file, "tls_key_file", "PRIVATE KEY")
    client_ca = None
    if client_ca_file is not None:
        client_ca = read_pem(client_ca_file, "tls_client_ca_file", "CERTIFICATE")
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
