"""Proving forged leaves to real TLS clients: a stdlib handshake, and ``serve`` with curl.

Used by the tests of imported, node and token-held intermediates: each one ends with a client
that trusts only the root its machines would trust, completing a real handshake.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import trio
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from origin import OriginStats, serve_tls, server_ssl_context
from pki import Hierarchy

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


async def origin(nursery: trio.Nursery, tmp: Path, hierarchy: Hierarchy) -> int:
    """An HTTPS origin presenting ``hierarchy.leaf``; returns its port on 127.0.0.1."""
    context = server_ssl_context(hierarchy.leaf, tmp)
    stats = OriginStats()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_tls(stream, context, stats)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return int(listeners[0].socket.getsockname()[1])


async def curl_through_serve(
    serve_args: Sequence[str],
    *,
    url: str,
    cacert: Path,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """Start ``python -m tlsmitm serve SERVE_ARGS --listen 127.0.0.1:0``, fetch ``url`` with
    curl through it trusting only ``cacert``, stop the proxy; returns curl's result and the
    proxy's output."""
    curl = require_tool("curl")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tlsmitm", "serve", "--listen", "127.0.0.1:0", *serve_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env if env is not None else dict(os.environ),
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(40):
            while b"Stop with Ctrl-C" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output.decode()
                output += chunk
        proxy = output.decode().split("listening on ")[1].split()[0]
        result = await trio.run_process(
            [curl, "-sS", "--max-time", "20", "--proxy", proxy, "--cacert", str(cacert), url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    finally:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            await process.wait()
            while chunk := await process.stdout.receive_some(4096):
                output += chunk
    return result, output.decode()
