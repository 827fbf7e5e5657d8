"""Proving forged leaves to a real TLS client: a stdlib handshake over 127.0.0.1.

Used by the tests of imported, node and token-held intermediates: each one ends with a client
that trusts only the root its machines would trust, completing a real handshake (``serve`` with
curl is ``serve_process.py``'s).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tlsmitm._forge import ForgedLeaf

PEM = serialization.Encoding.PEM


def handshake(
    leaf: ForgedLeaf,
    trusted: x509.Certificate,
    host: str,
    tmp: Path,
    *,
    chain: Sequence[x509.Certificate] | None = None,
) -> None:
    """A TLS handshake over 127.0.0.1: the server presents ``leaf`` and ``chain`` (default:
    ``leaf.chain``), the client trusts only ``trusted`` and checks ``host``.

    Raises:
        ssl.SSLCertVerificationError: the client refused the certificate.
    """
    sent = leaf.chain if chain is None else tuple(chain)
    cert_file = tmp / f"served-{id(leaf)}-{len(sent)}.pem"
    key_file = tmp / f"served-{id(leaf)}.key"
    cert_file.write_bytes(b"".join(c.public_bytes(PEM) for c in (leaf.certificate, *sent)))
    key_file.write_bytes(
        leaf.private_key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)
    client_context = ssl.create_default_context(cadata=trusted.public_bytes(PEM).decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(20)
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                connection.settimeout(20)
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:  # the client refused: it says why
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=20) as raw,
                client_context.wrap_socket(raw, server_hostname=host) as tls,
            ):
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(timeout=20)
        assert not thread.is_alive()
