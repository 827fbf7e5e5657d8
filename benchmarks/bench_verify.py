"""UpstreamVerifier benchmark: what one verification costs, against cryptography's bare verify().

Run ``python -m benchmarks.bench_verify [seconds]``. :func:`run` returns the figures as a dict.

Figures (milliseconds unless the name says otherwise), measured in one process:

* ``certifi_parse_ms`` -- parsing certifi's Mozilla bundle (once per process).
* ``store_build_ms`` -- building the ``cryptography`` Store from it (once per trust config).
* ``verifier_init_ms`` -- a whole :class:`~tlsmitm.UpstreamVerifier` with the bundle and public
  suffix list already loaded (a new trust configuration).
* ``raw_verify_ms`` -- ``cryptography``'s ``ServerVerifier.verify`` for a valid 2-certificate
  P-256 chain (leaf + intermediate, root in a Store of the certifi bundle plus the test root):
  the floor. The reference on a 2-core machine is about 0.55 ms.
* ``verify_ok_ms`` -- :meth:`~tlsmitm.UpstreamVerifier.verify` of the same chain: cryptography
  plus tlsmitm's checks (keys, names with the public-suffix list, distrust list, own CA).
* ``verify_ok_overhead`` -- ``verify_ok_ms / raw_verify_ms``.
* ``verify_ok_rsa2048_ms`` -- the same with an RSA-2048 leaf and intermediate.
* ``verify_ok_stapled_ms`` -- a valid chain with a stapled, good OCSP response.
* ``verify_expired_ms``, ``verify_name_mismatch_ms``, ``verify_incomplete_ms``,
  ``verify_weak_key_ms`` -- failing chains: the classification and its confirmation by
  cryptography (what an attacker can make tlsmitm spend per connection).
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from tlsmitm._verify import TrustConfig, UpstreamVerifier

from ._measure import component_main, rate

__all__ = ["run"]

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
HOST = "www.example.com"

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: Key,
    issuer: tuple[x509.Certificate, Key] | None,
    *,
    ca: bool,
    sans: list[str] | None = None,
    days: tuple[int, int] = (-1, 90),
    public_key: object | None = None,
) -> x509.Certificate:
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signer = issuer[1] if issuer else key
    subject_key = public_key if public_key is not None else key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(subject_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + days[0] * DAY)
        .not_valid_after(NOW + days[1] * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca and issuer else None), True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(subject_key),  # type: ignore[arg-type]
            False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), False
        )
    return builder.sign(signer, hashes.SHA256())


def _per_call_ms(func: Callable[[], object], seconds: float) -> float:
    func()  # warm up
    return 1000 / rate(func, seconds, batch=20)


def _verify(verifier: UpstreamVerifier, chain: list[x509.Certificate], host: str) -> object:
    return verifier.verify(chain, host, now=NOW)


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure every figure, spending about ``seconds`` in total; returns ``{name: value}``."""
    slot = max(seconds, 0.1) / 10
    results: dict[str, float] = {}

    pem = Path(certifi.where()).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # serial-0 roots
        start = time.perf_counter()
        bundle = x509.load_pem_x509_certificates(pem)
        results["certifi_parse_ms"] = (time.perf_counter() - start) * 1000

    root_key, int_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("Bench Root", root_key, None, ca=True, days=(-100, 3000))
    intermediate = _cert(
        "Bench Intermediate", int_key, (root, root_key), ca=True, days=(-100, 2000)
    )
    leaf = _cert("leaf", leaf_key, (intermediate, int_key), ca=False, sans=[HOST])

    start = time.perf_counter()
    store = Store([*bundle, root])
    results["store_build_ms"] = (time.perf_counter() - start) * 1000

    trust = TrustConfig(extra_roots=(root,))
    UpstreamVerifier(trust)  # loads the public suffix list once
    start = time.perf_counter()
    verifier = UpstreamVerifier(trust)
    results["verifier_init_ms"] = (time.perf_counter() - start) * 1000

    raw = PolicyBuilder().store(store).time(NOW).build_server_verifier(x509.DNSName(HOST))
    results["raw_verify_ms"] = _per_call_ms(lambda: raw.verify(leaf, [intermediate]), slot)
    results["verify_ok_ms"] = _per_call_ms(
        lambda: verifier.verify([leaf, intermediate], HOST, now=NOW), slot
    )
    results["verify_ok_overhead"] = results["verify_ok_ms"] / results["raw_verify_ms"]

    rsa_root_key, rsa_int_key, rsa_leaf_key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)
    )
    rsa_root = _cert("RSA Root", rsa_root_key, None, ca=True, days=(-100, 3000))
    rsa_int = _cert("RSA Int", rsa_int_key, (rsa_root, rsa_root_key), ca=True, days=(-100, 2000))
    rsa_leaf = _cert("rsa leaf", rsa_leaf_key, (rsa_int, rsa_int_key), ca=False, sans=[HOST])
    rsa_verifier = UpstreamVerifier(TrustConfig(extra_roots=(rsa_root,)))
    results["verify_ok_rsa2048_ms"] = _per_call_ms(
        lambda: rsa_verifier.verify([rsa_leaf, rsa_int], HOST, now=NOW), slot
    )

    staple = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf,
            issuer=intermediate,
            algorithm=hashes.SHA1(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=NOW - DAY,
            next_update=NOW + 6 * DAY,
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, intermediate)
        .sign(int_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    results["verify_ok_stapled_ms"] = _per_call_ms(
        lambda: verifier.verify([leaf, intermediate], HOST, now=NOW, stapled_ocsp=staple), slot
    )

    expired = _cert(
        "expired", leaf_key, (intermediate, int_key), ca=False, sans=[HOST], days=(-30, -1)
    )
    weak = _cert(
        "weak",
        leaf_key,
        (intermediate, int_key),
        ca=False,
        sans=[HOST],
        public_key=rsa.RSAPublicNumbers(65537, (1 << 1023) | 12345).public_key(),
    )
    failing = {
        "verify_expired_ms": ([expired, intermediate], HOST),
        "verify_name_mismatch_ms": ([leaf, intermediate], "other.example.com"),
        "verify_incomplete_ms": ([leaf], HOST),
        "verify_weak_key_ms": ([weak, intermediate], HOST),
    }
    for name, (chain, host) in failing.items():
        verdict = verifier.verify(chain, host, now=NOW)
        assert not verdict.ok, name
        results[name] = _per_call_ms(functools.partial(_verify, verifier, chain, host), slot)
    return results


def main(argv: list[str]) -> int:
    """Print the figures as a table."""
    return component_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
