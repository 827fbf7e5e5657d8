"""ClientHello peek benchmark: how fast the relay can read SNI/ALPN before deciding.

Run ``python -m benchmarks.bench_clienthello [seconds]``. :func:`run` returns the figures as a
dict so that a benchmark driver can collect them.

Figures (per second, single core):

* ``python_ssl_per_s`` -- :func:`~tlsmitm._clienthello.parse_client_hello` on the hello of
  Python's ``ssl`` module (system OpenSSL 3.0, about 520 bytes, one record).
* ``openssl4_pq_per_s`` -- on the hello of tlsmitm's own upstream context (OpenSSL 4 inside
  cryptography's wheel, with an X25519MLKEM768 key share: about 1.5 KB, like current browsers).
* ``fragmented_per_s`` -- the same hello split over eight records.
* ``need_more_per_s`` -- half of it: the "wait for the next TCP segment" answer.
* ``not_tls_per_s`` -- plain HTTP sent to a TLS port: the cheapest refusal.
* ``*_us`` -- the same figures as microseconds per call.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import sys
from collections.abc import Callable

from OpenSSL import SSL

from tlsmitm._clienthello import ClientHelloError, parse_client_hello
from tlsmitm._tls import upstream_connection, upstream_context

from ._measure import component_main, rate


def _python_ssl_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="www.example.org")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _openssl4_hello() -> bytes:
    connection = upstream_connection(
        upstream_context(), server_name="www.example.org", alpn_offer=(b"h2", b"http/1.1")
    )
    with contextlib.suppress(SSL.WantReadError):
        connection.do_handshake()
    return connection.bio_read(65536)


def _refragment(raw: bytes, pieces: int) -> bytes:
    message = raw[5:]
    size = -(-len(message) // pieces)
    return b"".join(
        raw[:3] + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (message[i : i + size] for i in range(0, len(message), size))
    )


_rate = functools.partial(rate, batch=500)


def _refusal(data: bytes) -> Callable[[], None]:
    def refuse() -> None:
        try:
            parse_client_hello(data)
        except ClientHelloError:
            return
        raise AssertionError("expected a refusal")

    return refuse


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure every figure, spending about ``seconds`` in total; returns ``{name: value}``."""
    slot = max(seconds, 0.05) / 5
    python_hello = _python_ssl_hello()
    pq_hello = _openssl4_hello()
    fragmented = _refragment(pq_hello, 8)
    half = pq_hello[: len(pq_hello) // 2]
    cases: dict[str, Callable[[], object]] = {
        "python_ssl": lambda: parse_client_hello(python_hello),
        "openssl4_pq": lambda: parse_client_hello(pq_hello),
        "fragmented": lambda: parse_client_hello(fragmented),
        "need_more": lambda: parse_client_hello(half),
        "not_tls": _refusal(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n"),
    }
    results: dict[str, float] = {
        "python_ssl_hello_bytes": float(len(python_hello)),
        "openssl4_pq_hello_bytes": float(len(pq_hello)),
    }
    for name, operation in cases.items():
        results[f"{name}_per_s"] = _rate(operation, slot)
    for name in cases:
        results[f"{name}_us"] = 1e6 / results[f"{name}_per_s"]
    return results


def main(argv: list[str]) -> int:
    """Print the figures as a table."""
    return component_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
