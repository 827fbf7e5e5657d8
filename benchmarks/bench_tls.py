"""TLS engine benchmark: per-connection setup, handshakes and bulk data over memory streams.

Run ``python -m benchmarks.bench_tls [seconds]``. :func:`run` returns the figures as a dict.
Both ends run in this one process, so every figure includes the peer's work too.

Figures:

* ``server_connection_openssl_us`` -- :func:`~tlsmitm._tls.server_connection` with a cached
  pyOpenSSL ``X509``/``PKey`` pair (what the relay does per intercepted connection).
* ``server_connection_cryptography_us`` -- the same with cryptography objects, which pyOpenSSL
  re-encodes on every call.
* ``handshakes_per_s`` -- full TLS 1.3 handshakes (P-256 leaf, X25519MLKEM768 key exchange)
  between an upstream-side and a client-side :class:`~tlsmitm._tls.TLSStream`, ``close_notify``
  included.
* ``resumed_handshakes_per_s`` -- the same, resuming the session of the previous connection.
* ``bulk_mb_per_s`` -- one direction, 16 KiB writes, decrypted by the peer.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
import time
from collections.abc import Callable

import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from tlsmitm._tls import (
    TLSStream,
    server_connection,
    server_context,
    upstream_connection,
    upstream_context,
)

from ._measure import component_main, rate

HOST = "bench.example.org"


def _leaf() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = time.time()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - 3600))
        .not_valid_after(_utc(now + 86400))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _per_call_us(operation: Callable[[], object], seconds: float) -> float:
    return 1e6 / rate(operation, seconds)


async def _handshakes(
    seconds: float,
    server_ctx: SSL.Context,
    cert: crypto.X509,
    key: crypto.PKey,
    *,
    resume: bool,
) -> float:
    upstream_ctx = upstream_context()
    session: SSL.Session | None = None
    done = 0
    start = trio.current_time()
    while trio.current_time() - start < seconds or done == 0:
        a, b = trio.testing.memory_stream_pair()
        client = TLSStream(
            a,
            upstream_connection(upstream_ctx, server_name=HOST, session=session),
            server_side=False,
        )
        server = TLSStream(b, server_connection(server_ctx, cert, key, alpn=None), server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await client.do_handshake()
        await server.send_all(b"x")  # delivers the TLS 1.3 session tickets
        await client.receive_some()
        if resume:
            session = client.session()
        await client.aclose()
        await server.aclose()
        done += 1
    return done / (trio.current_time() - start)


async def _bulk(
    seconds: float, server_ctx: SSL.Context, cert: crypto.X509, key: crypto.PKey
) -> float:
    a, b = trio.testing.memory_stream_pair()
    client = TLSStream(
        a, upstream_connection(upstream_context(), server_name=HOST), server_side=False
    )
    server = TLSStream(b, server_connection(server_ctx, cert, key, alpn=None), server_side=True)
    chunk = b"\x00" * 16384
    received = 0

    async def drain() -> None:
        nonlocal received
        while data := await client.receive_some(65536):
            received += len(data)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        while trio.current_time() - start < seconds:
            await server.send_all(chunk)
        await server.aclose()
    return received / (trio.current_time() - start) / 1e6


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure every figure, spending about ``seconds`` in total; returns ``{name: value}``."""
    slot = max(seconds, 0.05) / 5
    certificate, private_key = _leaf()
    cert = crypto.X509.from_cryptography(certificate)
    key = crypto.PKey.from_cryptography_key(private_key)
    context = server_context()
    results = {
        "server_connection_openssl_us": _per_call_us(
            lambda: server_connection(context, cert, key, alpn=None), slot
        ),
        "server_connection_cryptography_us": _per_call_us(
            lambda: server_connection(context, certificate, private_key, alpn=None), slot
        ),
    }
    for name, resume in (("handshakes_per_s", False), ("resumed_handshakes_per_s", True)):
        measure = functools.partial(_handshakes, slot, context, cert, key, resume=resume)
        results[name] = trio.run(measure)
    results["bulk_mb_per_s"] = trio.run(_bulk, slot, context, cert, key)
    return results


def main(argv: list[str]) -> int:
    """Print the figures as a table."""
    return component_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
