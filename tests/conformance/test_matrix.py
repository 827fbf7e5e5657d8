"""The interception matrix end to end: a local "badssl in a box" behind ``tlsmitm serve``.

Every row of ``interception-test-matrix.md`` sections B-F that this machine can build is served
by its own origin on 127.0.0.1 with certificates generated at test time, and fetched through one
``tlsmitm serve`` subprocess per error profile by Python's ``ssl``, curl and Chromium, each
trusting only tlsmitm's root. The check is the one a browser talking directly would pass:

* a good server's content is delivered;
* a bad server never delivers its content on a trusted connection and never even receives a
  request; the error is the client's own certificate error (``native`` profile, overridable
  errors) or a redirect to tlsmitm's page on ``https://error.invalid`` -- with the two-step
  override only for overridable errors on hosts without HSTS, never inside the site's origin.

The run prints a table (case, profile, client, expected, got) -- and writes it to
``conformance-matrix.txt`` in pytest's base temporary directory -- and fails on any mismatch.
Rows this machine cannot build are listed as "not buildable here" with the reason (skips, never
passes).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.client
import ipaddress
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from harness import (
    CERT_ERROR,
    DELIVERED,
    PAGE_BLOCK,
    PAGE_OVERRIDE,
    SPLICED,
    Fleet,
    NotBuildable,
    Origin,
    OriginRequest,
    Outcome,
    Reply,
    ServerTls,
    Site,
    TlsmitmServe,
    chromium_args,
    chromium_env,
    chromium_executable,
    chromium_goto,
    client_context,
    curl_request,
    nss_home,
    python_alpn,
    python_override,
    python_request,
    reset_page,
)
from pki import (
    DAY,
    NOW,
    Issued,
    cached_key,
    issue,
    make_intermediate,
    make_key,
    make_leaf,
    make_root,
    openssl_sign,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROFILES = ("native", "page")
CLIENTS = ("python", "curl", "chromium")
STS = "max-age=15768000; includeSubDomains"


# -- expectations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What a correct interceptor shows, per error profile."""

    text: str
    native: frozenset[str]
    page: frozenset[str]

    def allowed(self, profile: str) -> frozenset[str]:
        return self.native if profile == "native" else self.page

    def describe(self, profile: str) -> str:
        return " | ".join(sorted(self.allowed(profile)))


def _expect(text: str, native: set[str], page: set[str] | None = None) -> Expect:
    return Expect(text, frozenset(native), frozenset(page if page is not None else native))


ACCEPT = _expect("accept", {DELIVERED})
# Overridable (time, trust, name; Firefox's CategorizeCertificateError): the browser's own
# warning in the native profile, the two-step override page in the page profile.
OVERRIDABLE = _expect("reject, overridable", {CERT_ERROR}, {PAGE_OVERRIDE})
# No way through (revoked, weak or broken cryptography, HSTS hosts, protocol failures).
FATAL = _expect("reject, no override", {PAGE_BLOCK})
# Rejected, either class is defensible: browsers themselves disagree (Firefox calls a CA:FALSE
# intermediate or a CA used as a leaf an overridable trust error, Chromium ERR_CERT_INVALID).
REJECT = _expect("reject", {CERT_ERROR, PAGE_BLOCK}, {PAGE_OVERRIDE, PAGE_BLOCK})
BYPASS = _expect("bypass (spliced)", {SPLICED})


def ALPN(protocol: str | None) -> Expect:
    return _expect(f"ALPN {protocol}", {f"ALPN {protocol}"})


# -- building the box -----------------------------------------------------------------------------


@dataclass
class Prime:
    """A request a client makes before the case (e.g. to teach tlsmitm a host's HSTS)."""

    scheme: str
    host: str
    origin: Origin
    path: str
    sts: str | None = None  # the exact header value the client must receive (matrix MIR-04)


@dataclass
class Built:
    origin: Origin
    primes: list[Prime] = field(default_factory=list)
    leaf_der: bytes | None = None
    client_cert: tuple[Path, Path] | None = None
    client_trust: Path | None = None
    unbuildable: str | None = None


class Box:
    """The PKI and the fleet of origins the cases are built from."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fleet = Fleet(directory / "origins")
        self.root = make_root("Conformance Root")
        self.intermediate = make_intermediate(self.root, "Conformance Intermediate")
        self.trusted_roots: list[Issued] = [self.root]
        self.hosts: set[str] = {"pki.badssl.test"}
        # AIA / OCSP / CRL server (plain HTTP), bound first so certificates can name its port.
        self.revoked_serials: set[int] = set()
        self.ocsp_leaves: dict[int, tuple[x509.Certificate, Issued]] = {}
        self.aia: dict[str, bytes] = {}
        self.pki = self.fleet.add("pki.badssl.test", None, _PkiSite(self))

    def url(self, path: str) -> str:
        return f"http://pki.badssl.test:{self.pki.port}{path}"

    def leaf(self, host: str, issuer: Issued | None = None, **kw: Any) -> Issued:
        return make_leaf(issuer or self.intermediate, host, **kw)

    def serve(
        self,
        name: str,
        leaf: Issued | list[ServerTls] | None,
        *,
        chain: bytes | None = None,
        site: Site | None = None,
        **tls: Any,
    ) -> Built:
        """An origin presenting ``leaf`` (with its chain unless ``chain`` is given)."""
        if isinstance(leaf, list):
            return Built(origin=self.fleet.add(name, leaf, site))
        if leaf is None:
            return Built(origin=self.fleet.add(name, None, site))
        config = ServerTls(
            chain=chain if chain is not None else leaf.chain_pem(), key=leaf.key_pem, **tls
        )
        origin = self.fleet.add(name, config, site)
        return Built(origin=origin, leaf_der=leaf.der, unbuildable=origin.unbuildable)


class _PkiSite(Site):
    """Serves AIA "CA Issuers" certificates, OCSP responses (POST) and the intermediate's CRL."""

    def __init__(self, box: Box) -> None:
        super().__init__(marker="pki")
        self.box = box

    def __call__(self, request: OriginRequest) -> Reply:
        path = request.target.split("?", 1)[0]
        if path in self.box.aia:
            return Reply(body=self.box.aia[path], content_type="application/pkix-cert")
        if path == "/intermediate.crl":
            return Reply(body=self._crl(), content_type="application/pkix-crl")
        if path == "/ocsp" and request.method == "POST":
            return Reply(body=self._ocsp(request.body), content_type="application/ocsp-response")
        return Reply(status=404, body=b"not found")

    def _crl(self) -> bytes:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.box.intermediate.cert.subject)
            .last_update(now - dt.timedelta(hours=1))
            .next_update(now + DAY)
        )
        for serial in sorted(self.box.revoked_serials):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - DAY)
                .build()
            )
        crl = builder.sign(self.box.intermediate.key, hashes.SHA256())  # type: ignore[arg-type]
        return crl.public_bytes(serialization.Encoding.DER)

    def _ocsp(self, body: bytes) -> bytes:
        try:
            request = ocsp.load_der_ocsp_request(body)
        except ValueError:
            return ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.MALFORMED_REQUEST
            ).public_bytes(serialization.Encoding.DER)
        known = self.box.ocsp_leaves.get(request.serial_number)
        if known is None:
            return ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.UNAUTHORIZED
            ).public_bytes(serialization.Encoding.DER)
        leaf, issuer = known
        now = dt.datetime.now(dt.UTC)
        revoked = request.serial_number in self.box.revoked_serials
        response = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=leaf,
                issuer=issuer.cert,
                algorithm=request.hash_algorithm,
                cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
                this_update=now - dt.timedelta(hours=1),
                next_update=now + DAY,
                revocation_time=now - DAY if revoked else None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.cert)
            .sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]
        )
        return response.public_bytes(serialization.Encoding.DER)


def _with_key(cert: x509.Certificate, key: Any, parent: Issued) -> Issued:
    return Issued(cert=cert, key=key, parents=[parent])


def _leaf_extensions(host: str, extra: str = "") -> str:
    return (
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{host}\n{extra}"
    )


def _openssl_rsa_key(bits: int, directory: Path) -> Any:
    """An RSA key of ``bits`` (cryptography refuses to generate fewer than 1024)."""
    path = directory / f"rsa{bits}.key"
    subprocess.run(
        ["openssl", "genrsa", "-out", str(path), str(bits)], check=True, capture_output=True
    )
    return serialization.load_pem_private_key(
        path.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
    )


def _dh_params(bits: int, directory: Path) -> bytes:
    path = directory / f"dh{bits}.pem"
    subprocess.run(
        ["openssl", "dhparam", "-dsaparam", "-out", str(path), str(bits)],
        check=True,
        capture_output=True,
    )
    return path.read_bytes()


# -- the cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One row of the matrix as this suite runs it."""

    key: str
    id: str
    title: str
    host: str
    expect: Expect
    build: Callable[[Box, str], Built]
    clients: tuple[str, ...] = CLIENTS
    kind: str = "fetch"  # or "alpn"
    note: str = ""
    error: str | None = None  # the CertError an error-origin page must name

    def accepts(self, profile: str, outcome: Outcome) -> bool:
        if outcome.label not in self.expect.allowed(profile):
            return False
        if outcome.label in (PAGE_BLOCK, PAGE_OVERRIDE) and self.error is not None:
            return outcome.detail == self.error
        return True

    @property
    def label(self) -> str:
        return f"{self.id} {self.title}"


def _good(box: Box, host: str, **leaf_kw: Any) -> Built:
    return box.serve(host, box.leaf(host, **leaf_kw))


def _expired(box: Box, host: str) -> Built:
    return box.serve(host, box.leaf(host, not_before=NOW - 30 * DAY, not_after=NOW - DAY))


def b_expired_intermediate(box: Box, host: str) -> Built:
    inter = make_intermediate(
        box.root, "Expired Intermediate", not_before=NOW - 60 * DAY, not_after=NOW - DAY
    )
    return box.serve(host, box.leaf(host, inter, not_before=NOW - 10 * DAY))


def b_expired_root(box: Box, host: str) -> Built:
    root = make_root("Expired Root", not_before=NOW - 3650 * DAY, not_after=NOW - DAY)
    box.trusted_roots.append(root)
    inter = make_intermediate(root, "Intermediate of an Expired Root", not_before=NOW - 30 * DAY)
    return box.serve(host, box.leaf(host, inter, not_before=NOW - 10 * DAY))


def b_wrong_host(box: Box, host: str) -> Built:
    return box.serve(host, box.leaf("badssl.test", sans=["*.badssl.test", "badssl.test"]))


def b_self_signed(box: Box, host: str) -> Built:
    return box.serve(host, issue(subject_cn=host, issuer=None, sans=[host]))


def b_untrusted_root(box: Box, host: str) -> Built:
    # The whole chain, root included: nothing is missing, the root is just not trusted.
    root = make_root("Untrusted Root")
    leaf = box.leaf(host, make_intermediate(root, "Untrusted Intermediate"))
    return box.serve(host, leaf, chain=leaf.chain_pem() + root.pem)


def b_incomplete_chain(box: Box, host: str) -> Built:
    hidden = make_intermediate(box.root, "Never Served Intermediate")
    leaf = box.leaf(host, hidden)
    return box.serve(host, leaf, chain=leaf.pem)


def b_incomplete_chain_aia(box: Box, host: str) -> Built:
    hidden = make_intermediate(box.root, "AIA Intermediate")
    box.aia["/aia-intermediate.der"] = hidden.der
    aia = x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(box.url("/aia-intermediate.der")),
            )
        ]
    )
    leaf = box.leaf(host, hidden, extra=[(aia, False)])
    return box.serve(host, leaf, chain=leaf.pem)


def b_revoked_ocsp(box: Box, host: str) -> Built:
    aia = x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(box.url("/ocsp"))
            )
        ]
    )
    leaf = box.leaf(host, extra=[(aia, False)])
    box.revoked_serials.add(leaf.cert.serial_number)
    box.ocsp_leaves[leaf.cert.serial_number] = (leaf.cert, box.intermediate)
    return box.serve(host, leaf)


def b_revoked_crl(box: Box, host: str) -> Built:
    point = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(box.url("/intermediate.crl"))],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )
    leaf = box.leaf(host, extra=[(point, False)])
    box.revoked_serials.add(leaf.cert.serial_number)
    return box.serve(host, leaf)


def b_rsa512(box: Box, host: str) -> Built:
    key = _openssl_rsa_key(512, box.directory)
    # RSA-512 cannot make a TLS 1.3 (RSA-PSS/SHA-256) signature: offer TLS 1.2 so the
    # certificate is actually presented.
    return box.serve(
        host, box.leaf(host, key=key), seclevel0=True, max_version=ssl.TLSVersion.TLSv1_2
    )


def b_weak_key(kind: str) -> Callable[[Box, str], Built]:
    def build(box: Box, host: str) -> Built:
        return box.serve(host, box.leaf(host, key=make_key(kind)), seclevel0=True)

    return build


def b_rsa2047(box: Box, host: str) -> Built:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2047)
    return box.serve(host, box.leaf(host, key=key))


def b_p192(box: Box, host: str) -> Built:
    key = ec.generate_private_key(ec.SECP192R1())
    return box.serve(host, box.leaf(host, key=key), seclevel0=True)


def b_digest(digest: str) -> Callable[[Box, str], Built]:
    def build(box: Box, host: str) -> Built:
        # ECDSA has no MD5 variant: the issuer is RSA, as badssl's.
        issuer = make_intermediate(box.root, "RSA Intermediate", key=cached_key("rsa2048", 1))
        key = make_key("ec256")
        cert = openssl_sign(
            key, issuer, subject=f"/CN={host}", digest=digest, extensions=_leaf_extensions(host)
        )
        return box.serve(host, _with_key(cert, key, issuer), seclevel0=True)

    return build


_INT_EXTENSIONS = (
    "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n"
    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
)


def b_sha1_intermediate(box: Box, host: str) -> Built:
    key = make_key("ec256")
    cert = openssl_sign(
        key,
        box.root,
        subject="/CN=SHA-1 Intermediate",
        digest="sha1",
        extensions=_INT_EXTENSIONS,
        days=365,
    )
    inter = _with_key(cert, key, box.root)
    return box.serve(host, box.leaf(host, inter), seclevel0=True)


def b_v1_intermediate(box: Box, host: str) -> Built:
    key = make_key("ec256")
    cert = openssl_sign(
        key, box.root, subject="/CN=X.509 v1 Intermediate", extensions=None, days=365
    )
    inter = _with_key(cert, key, box.root)
    return box.serve(host, box.leaf(host, inter))


def b_intermediate_not_ca(box: Box, host: str) -> Built:
    inter = issue(subject_cn="Not-a-CA Intermediate", issuer=box.root, ca=False, eku=None)
    return box.serve(host, box.leaf(host, inter))


def b_intermediate_without_bc(box: Box, host: str) -> Built:
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    inter = issue(
        subject_cn="Intermediate without basicConstraints",
        issuer=box.root,
        ca=None,
        eku=None,
        key_usage=None,
        extra=[(usage, True)],
    )
    return box.serve(host, box.leaf(host, inter))


def b_pathlen(box: Box, host: str) -> Built:
    second = make_intermediate(box.intermediate, "Second Intermediate", path_length=None)
    return box.serve(host, box.leaf(host, second))


def b_name_constraints(box: Box, host: str) -> Built:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("allowed.test")], excluded_subtrees=None
    )
    inter = make_intermediate(box.root, "Constrained Intermediate", extra=[(constraints, True)])
    return box.serve(host, box.leaf(host, inter))


def b_unknown_critical(box: Box, host: str) -> Built:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    return box.serve(host, box.leaf(host, extra=[(ext, True)]))


def b_wrong_eku(box: Box, host: str) -> Built:
    return box.serve(host, box.leaf(host, eku=[ExtendedKeyUsageOID.CLIENT_AUTH]))


def b_ca_as_leaf(box: Box, host: str) -> Built:
    return box.serve(host, box.leaf(host, ca=True, path_length=0))


def b_tampered(box: Box, host: str) -> Built:
    leaf = box.leaf(host)
    der = bytearray(leaf.der)
    der[-5] ^= 0xFF  # inside the signature value (matrix A.4 recipe)
    tampered = x509.load_der_x509_certificate(bytes(der))
    fake = _with_key(tampered, leaf.key, box.intermediate)
    return box.serve(host, fake)


def b_sans(*sans: str, dns_only: bool = False) -> Callable[[Box, str], Built]:
    def build(box: Box, host: str) -> Built:
        if dns_only:
            names: list[x509.GeneralName] = [x509.DNSName(s) for s in sans]
            ext = x509.SubjectAlternativeName(names)
            return box.serve(host, box.leaf(host, sans=None, extra=[(ext, False)]))
        return box.serve(host, box.leaf(host, sans=list(sans)))

    return build


def b_protocol(
    *,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    seclevel0: bool = False,
    rsa: bool = False,
    dh_bits: int | None = None,
) -> Callable[[Box, str], Built]:
    def build(box: Box, host: str) -> Built:
        key = cached_key("rsa2048") if rsa else None
        leaf = box.leaf(host, key=key) if key is not None else box.leaf(host)
        dh = _dh_params(dh_bits, box.directory) if dh_bits else None
        built = box.serve(
            host,
            leaf,
            min_version=min_version,
            max_version=max_version,
            ciphers=ciphers,
            seclevel0=seclevel0,
            dh_params=dh,
        )
        if built.unbuildable is None:
            built.unbuildable = _probe(built.origin, host, min_version, max_version, ciphers)
        return built

    return build


def _probe(
    origin: Origin,
    host: str,
    min_version: ssl.TLSVersion | None,
    max_version: ssl.TLSVersion | None,
    ciphers: str | None,
) -> str | None:
    """Check directly (no proxy) that the server really negotiates what the case claims."""
    import socket
    import threading

    # The fleet is not serving yet: accept once ourselves with the origin's own context.
    assert origin.socket is not None
    assert origin.contexts is not None
    server_context = origin.contexts[0]
    result: list[str] = []

    def serve() -> None:
        assert origin.socket is not None
        origin.socket.settimeout(10)
        try:
            conn, _ = origin.socket.accept()
        except OSError:
            return
        try:
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.set_ciphers((ciphers or "DEFAULT") + ":@SECLEVEL=0")
        context.minimum_version = min_version or ssl.TLSVersion.MINIMUM_SUPPORTED
        if max_version is not None:
            context.maximum_version = max_version
    try:
        with (
            socket.create_connection(("127.0.0.1", origin.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            result.append(f"{tls.version()} {tls.cipher()[0]}")
    except (OSError, ssl.SSLError) as exc:
        thread.join(5)
        return f"OpenSSL {ssl.OPENSSL_VERSION.split()[1]} here cannot negotiate it: {exc}"
    thread.join(5)
    wanted = (
        {
            ssl.TLSVersion.TLSv1: "TLSv1",
            ssl.TLSVersion.TLSv1_1: "TLSv1.1",
            ssl.TLSVersion.TLSv1_2: "TLSv1.2",
            ssl.TLSVersion.TLSv1_3: "TLSv1.3",
        }.get(max_version)
        if max_version is not None
        else None
    )  # type: ignore[arg-type]
    if wanted is not None and not result[0].startswith(wanted + " "):
        return f"asked for {wanted}, OpenSSL negotiated {result[0]}"
    return None


def b_compression(box: Box, host: str) -> Built:
    if not _openssl_has_zlib():
        built = box.serve(host, None)
        built.unbuildable = "this OpenSSL is built without ZLIB (openssl list -disabled)"
        return built
    return _good(box, host)  # pragma: no cover - only on an OpenSSL with TLS compression


def _openssl_has_zlib() -> bool:
    result = subprocess.run(
        ["openssl", "list", "-disabled"], capture_output=True, text=True, check=False
    )
    return "ZLIB" not in result.stdout.split()


def b_sslv3(box: Box, host: str) -> Built:
    built = box.serve(host, None)
    if not ssl.HAS_SSLv3:
        built.unbuildable = "this OpenSSL is built without SSLv3 (ssl.HAS_SSLv3 is False)"
    return built


def b_client_cert(box: Box, host: str) -> Built:
    client_root = make_root("Client Certificate Root")
    client = issue(
        subject_cn="conformance client",
        issuer=client_root,
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    built = box.serve(host, box.leaf(host), client_ca=client_root.pem)
    directory = box.directory / "client-cert"
    directory.mkdir(exist_ok=True)
    built.client_cert = client.write(directory, "client")
    built.client_trust = directory / "origin-root.pem"
    built.client_trust.write_bytes(box.root.pem)
    return built


def b_alpn(alpn: tuple[str, ...]) -> Callable[[Box, str], Built]:
    def build(box: Box, host: str) -> Built:
        return box.serve(host, box.leaf(host), alpn=alpn)

    return build


def b_hsts_bad(
    prime_host: str, prime_paths: tuple[str, ...], *, sts: str = STS
) -> Callable[[Box, str], Built]:
    """A good origin for ``prime_host`` that sends HSTS, then an expired one for the case host."""

    def build(box: Box, host: str) -> Built:
        good = box.serve(
            f"{prime_host} (good)",
            box.leaf(prime_host),
            site=Site(
                marker=f"content of {prime_host} (good)",
                sts=sts,
                pages={
                    "/hsts-two": Reply(
                        body=b"two STS headers",
                        headers=(
                            ("Strict-Transport-Security", 'includeSubdomains; max-age="hehehe";'),
                            ("Strict-Transport-Security", "max-age=10101"),
                        ),
                    )
                },
            ),
        )
        box.hosts.add(prime_host)
        bad = _expired(box, host)
        bad.primes = [
            Prime("https", prime_host, good.origin, path, sts if path == "/hsts" else None)
            for path in prime_paths
        ]
        return bad

    return build


def b_hsts_plain_http(box: Box, host: str) -> Built:
    plain = box.serve(f"{host} (plain http)", None, site=Site(marker=f"plain {host}", sts=STS))
    bad = _expired(box, host)
    bad.primes = [Prime("http", host, plain.origin, "/hsts")]
    return bad


def b_hsts_ip(box: Box, host: str) -> Built:
    good = box.serve("127.0.0.1 (hsts)", box.leaf(host, sans=[host]))
    bad = box.serve(
        host, box.leaf(host, sans=[host], not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    )
    bad.primes = [Prime("https", host, good.origin, "/hsts", STS)]
    return bad


def b_preloaded_mismatch(box: Box, host: str) -> Built:
    return box.serve(host, box.leaf("badssl.test", sans=["*.badssl.test"]))


SPECS: tuple[Spec, ...] = (
    # B. chain and attributes
    Spec("good", "CV-01", "good chain", "sha256.badssl.test", ACCEPT, _good),
    Spec("expired", "CV-02", "expired leaf", "expired.badssl.test", OVERRIDABLE, _expired),
    Spec(
        "not-yet-valid",
        "CV-03",
        "not yet valid",
        "not-yet-valid.badssl.test",
        OVERRIDABLE,
        lambda b, h: b.serve(h, b.leaf(h, not_before=NOW + DAY, not_after=NOW + 30 * DAY)),
    ),
    Spec(
        "expired-int",
        "CV-04",
        "expired intermediate",
        "expired-intermediate.badssl.test",
        OVERRIDABLE,
        b_expired_intermediate,
        note="Firefox: expired issuer is ERROR_TRUST; Chromium: ERR_CERT_DATE_INVALID",
    ),
    Spec(
        "expired-root", "CV-05", "expired root", "expired-root.badssl.test", REJECT, b_expired_root
    ),
    Spec("wrong-host", "CV-06", "wrong host", "wrong.host.badssl.test", OVERRIDABLE, b_wrong_host),
    Spec(
        "self-signed", "CV-07", "self-signed", "self-signed.badssl.test", OVERRIDABLE, b_self_signed
    ),
    Spec(
        "untrusted-root",
        "CV-08",
        "untrusted root",
        "untrusted-root.badssl.test",
        OVERRIDABLE,
        b_untrusted_root,
    ),
    Spec(
        "incomplete-chain",
        "CV-09",
        "incomplete chain, no AIA",
        "incomplete-chain.badssl.test",
        OVERRIDABLE,
        b_incomplete_chain,
    ),
    Spec(
        "incomplete-chain-aia",
        "CV-09",
        "incomplete chain, AIA fetched",
        "incomplete-chain-aia.badssl.test",
        ACCEPT,
        b_incomplete_chain_aia,
    ),
    Spec("revoked-ocsp", "CV-11", "revoked (OCSP)", "revoked.badssl.test", FATAL, b_revoked_ocsp),
    Spec("revoked-crl", "CV-11", "revoked (CRL)", "revoked-crl.badssl.test", FATAL, b_revoked_crl),
    Spec("rsa512", "CV-12", "RSA-512 leaf", "rsa512.badssl.test", FATAL, b_rsa512),
    Spec("rsa1024", "CV-13", "RSA-1024 leaf", "rsa1024.badssl.test", FATAL, b_weak_key("rsa1024")),
    Spec(
        "rsa2048",
        "CV-14",
        "RSA-2048 leaf",
        "rsa2048.badssl.test",
        ACCEPT,
        lambda b, h: _good(b, h, key=cached_key("rsa2048")),
    ),
    Spec(
        "rsa3072",
        "CV-14",
        "RSA-3072 leaf",
        "rsa3072.badssl.test",
        ACCEPT,
        lambda b, h: _good(b, h, key=make_key("rsa3072")),
    ),
    Spec(
        "ecc384",
        "CV-14",
        "P-384 leaf",
        "ecc384.badssl.test",
        ACCEPT,
        lambda b, h: _good(b, h, key=make_key("ec384")),
    ),
    Spec("rsa2047", "CV-15", "RSA-2047 leaf", "rsa2047.badssl.test", FATAL, b_rsa2047),
    Spec("p192", "CV-15", "P-192 leaf", "p192.badssl.test", FATAL, b_p192),
    Spec("md5", "CV-16", "MD5 signature", "md5.badssl.test", FATAL, b_digest("md5")),
    Spec("sha1-leaf", "CV-17", "SHA-1 leaf", "sha1-leaf.badssl.test", FATAL, b_digest("sha1")),
    Spec(
        "sha1-int",
        "CV-18",
        "SHA-1 intermediate",
        "sha1-intermediate.badssl.test",
        FATAL,
        b_sha1_intermediate,
    ),
    Spec(
        "int-not-ca",
        "CV-19",
        "intermediate CA:FALSE",
        "intermediate-ca-false.badssl.test",
        REJECT,
        b_intermediate_not_ca,
    ),
    Spec(
        "int-no-bc",
        "CV-20",
        "intermediate without basicConstraints",
        "intermediate-no-bc.badssl.test",
        REJECT,
        b_intermediate_without_bc,
    ),
    Spec(
        "v1-int",
        "CV-21",
        "X.509 v1 intermediate",
        "v1-intermediate.badssl.test",
        REJECT,
        b_v1_intermediate,
    ),
    Spec("pathlen", "CV-22", "pathLen violation", "pathlen.badssl.test", REJECT, b_pathlen),
    Spec(
        "name-constraints",
        "CV-23",
        "name-constraints violation",
        "name-constraints.badssl.test",
        REJECT,
        b_name_constraints,
    ),
    Spec(
        "critical-ext",
        "CV-24",
        "unknown critical extension",
        "unknown-critical.badssl.test",
        FATAL,
        b_unknown_critical,
    ),
    Spec("wrong-eku", "CV-25", "EKU clientAuth only", "wrong-eku.badssl.test", FATAL, b_wrong_eku),
    Spec(
        "ca-as-leaf",
        "CV-26",
        "CA certificate as leaf",
        "ca-as-leaf.badssl.test",
        REJECT,
        b_ca_as_leaf,
    ),
    Spec("tampered", "CV-27", "tampered signature", "tampered.badssl.test", FATAL, b_tampered),
    Spec(
        "no-san",
        "CV-29",
        "no SAN, CN = host",
        "no-san.badssl.test",
        OVERRIDABLE,
        lambda b, h: _good(b, h, sans=None),
    ),
    Spec(
        "no-cn",
        "CV-30",
        "SAN only, no CN",
        "no-common-name.badssl.test",
        ACCEPT,
        lambda b, h: b.serve(h, issue(subject_cn=None, issuer=b.intermediate, sans=[h])),
    ),
    Spec(
        "no-subject",
        "CV-31",
        "empty subject, critical SAN",
        "no-subject.badssl.test",
        ACCEPT,
        lambda b, h: b.serve(
            h, issue(subject_cn=None, org=None, issuer=b.intermediate, sans=[h], san_critical=True)
        ),
    ),
    Spec("idn", "CV-33", "IDN (punycode) label", "xn--n1aae7f7o.badssl.test", ACCEPT, _good),
    # C. host names
    Spec(
        "partial-wildcard",
        "HN-P1",
        "SAN w*.badssl.test",
        "www.badssl.test",
        OVERRIDABLE,
        b_sans("w*.badssl.test"),
    ),
    Spec("psl-wildcard", "HN-P2", "SAN *.co.uk", "example.co.uk", OVERRIDABLE, b_sans("*.co.uk")),
    Spec(
        "wildcard-apex",
        "N-33",
        "SAN *.apex.badssl.test for the apex",
        "apex.badssl.test",
        OVERRIDABLE,
        b_sans("*.apex.badssl.test"),
    ),
    Spec(
        "ip-in-dns",
        "N-65",
        "IP written in a dNSName",
        "127.0.0.1",
        OVERRIDABLE,
        b_sans("127.0.0.1", dns_only=True),
    ),
    Spec(
        "ip-san", "N-90", "iPAddress SAN, no SNI (MIR-05)", "127.0.0.1", ACCEPT, b_sans("127.0.0.1")
    ),
    # D. protocols and ciphers
    Spec(
        "tls10",
        "TLS-01",
        "TLS 1.0 only",
        "tls-v1-0.badssl.test",
        FATAL,
        b_protocol(
            min_version=ssl.TLSVersion.TLSv1, max_version=ssl.TLSVersion.TLSv1, seclevel0=True
        ),
    ),
    Spec(
        "tls11",
        "TLS-02",
        "TLS 1.1 only",
        "tls-v1-1.badssl.test",
        FATAL,
        b_protocol(
            min_version=ssl.TLSVersion.TLSv1_1, max_version=ssl.TLSVersion.TLSv1_1, seclevel0=True
        ),
    ),
    Spec(
        "tls12",
        "TLS-03",
        "TLS 1.2 only",
        "tls-v1-2.badssl.test",
        ACCEPT,
        b_protocol(min_version=ssl.TLSVersion.TLSv1_2, max_version=ssl.TLSVersion.TLSv1_2),
    ),
    Spec(
        "tls13",
        "TLS-03",
        "TLS 1.3 only",
        "tls-v1-3.badssl.test",
        ACCEPT,
        b_protocol(min_version=ssl.TLSVersion.TLSv1_3, max_version=ssl.TLSVersion.TLSv1_3),
    ),
    Spec("sslv3", "TLS-04", "SSLv3 only", "ssl-v3.badssl.test", FATAL, b_sslv3),
    Spec(
        "rc4",
        "TLS-05",
        "RC4 only",
        "rc4.badssl.test",
        FATAL,
        b_protocol(
            max_version=ssl.TLSVersion.TLSv1_2, ciphers="RC4-SHA:RC4-MD5", seclevel0=True, rsa=True
        ),
    ),
    Spec(
        "null",
        "TLS-06",
        "NULL cipher only",
        "null.badssl.test",
        FATAL,
        b_protocol(
            max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-NULL-SHA", seclevel0=True
        ),
    ),
    Spec(
        "anon",
        "TLS-06",
        "anonymous (aNULL) suites only",
        "anon.badssl.test",
        FATAL,
        b_protocol(max_version=ssl.TLSVersion.TLSv1_2, ciphers="aNULL", seclevel0=True),
    ),
    Spec(
        "3des",
        "TLS-07",
        "3DES only",
        "3des.badssl.test",
        FATAL,
        b_protocol(
            max_version=ssl.TLSVersion.TLSv1_2, ciphers="DES-CBC3-SHA", seclevel0=True, rsa=True
        ),
    ),
    Spec(
        "cbc",
        "TLS-08",
        "CBC suites only",
        "cbc.badssl.test",
        FATAL,
        b_protocol(
            max_version=ssl.TLSVersion.TLSv1_2,
            ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA",
        ),
        note="policy: tlsmitm offers AEAD suites only upstream",
    ),
    Spec(
        "static-rsa",
        "TLS-09",
        "static RSA key exchange",
        "static-rsa.badssl.test",
        FATAL,
        b_protocol(
            max_version=ssl.TLSVersion.TLSv1_2,
            ciphers="AES128-GCM-SHA256:AES256-GCM-SHA384",
            rsa=True,
        ),
        note="Chromium dropped TLS_RSA suites too (Chrome 131)",
    ),
    Spec(
        "dh1024",
        "TLS-10",
        "DHE with a 1024-bit group",
        "dh1024.badssl.test",
        FATAL,
        b_protocol(
            max_version=ssl.TLSVersion.TLSv1_2,
            ciphers="DHE-RSA-AES128-GCM-SHA256",
            seclevel0=True,
            rsa=True,
            dh_bits=1024,
        ),
    ),
    Spec(
        "dh2048",
        "TLS-12",
        "DHE-2048 only",
        "dh2048.badssl.test",
        FATAL,
        b_protocol(
            max_version=ssl.TLSVersion.TLSv1_2,
            ciphers="DHE-RSA-AES128-GCM-SHA256",
            rsa=True,
            dh_bits=2048,
        ),
        note="matrix says accept; tlsmitm offers ECDHE only, as Chromium has since Chrome 53",
    ),
    Spec(
        "compression", "TLS-13", "TLS compression", "compression.badssl.test", FATAL, b_compression
    ),
    Spec(
        "client-cert",
        "TLS-18",
        "server requires a client certificate",
        "client.badssl.test",
        BYPASS,
        b_client_cert,
        clients=("python", "curl"),
        note="Chromium: needs a client-certificate selection policy",
    ),
    # E. downstream fidelity
    Spec(
        "alpn-h2",
        "MIR-03",
        "upstream selects h2",
        "alpn-h2.badssl.test",
        ALPN("h2"),
        b_alpn(("h2", "http/1.1")),
        clients=("python",),
        kind="alpn",
    ),
    Spec(
        "alpn-http11",
        "MIR-03",
        "upstream selects http/1.1",
        "alpn-http11.badssl.test",
        ALPN("h2"),
        b_alpn(("http/1.1",)),
        kind="alpn",
    ),
    Spec(
        "alpn-none",
        "MIR-03",
        "upstream without ALPN",
        "alpn-none.badssl.test",
        ALPN("h2"),
        b_alpn(()),
        clients=("python",),
        kind="alpn",
    ),
    # F. HSTS state
    Spec(
        "hsts-host",
        "POL-01",
        "expired cert on a host that sent HSTS",
        "hsts.badssl.test",
        FATAL,
        b_hsts_bad("hsts.badssl.test", ("/hsts",)),
        note="the prime also checks MIR-04: the header reaches the client unchanged",
    ),
    Spec(
        "hsts-subdomain",
        "POL-01",
        "expired cert under an includeSubDomains host",
        "sub.hsts-parent.badssl.test",
        FATAL,
        b_hsts_bad("hsts-parent.badssl.test", ("/hsts",)),
    ),
    Spec(
        "preloaded",
        "POL-02",
        "expired cert on a preloaded host",
        "preloaded-hsts.badssl.com",
        FATAL,
        _expired,
    ),
    Spec(
        "preloaded-subdomain",
        "POL-03",
        "name mismatch under a preloaded includeSubDomains host",
        "subdomain.preloaded-hsts.badssl.com",
        FATAL,
        b_preloaded_mismatch,
    ),
    Spec(
        "hsts-ip",
        "POL-05",
        "HSTS from an IP literal is ignored",
        "127.0.0.1",
        OVERRIDABLE,
        b_hsts_ip,
    ),
    Spec(
        "hsts-two-headers",
        "POL-06",
        "two STS headers, the first invalid: nothing noted",
        "hsts-two.badssl.test",
        OVERRIDABLE,
        b_hsts_bad("hsts-two.badssl.test", ("/hsts-two",)),
    ),
    Spec(
        "hsts-plain",
        "POL-07",
        "STS over plain HTTP is ignored",
        "hsts-plain.badssl.test",
        OVERRIDABLE,
        b_hsts_plain_http,
    ),
    Spec(
        "hsts-max-age-0",
        "POL-08",
        "max-age=0 removes the host",
        "hsts-zero.badssl.test",
        OVERRIDABLE,
        b_hsts_bad("hsts-zero.badssl.test", ("/hsts", "/hsts0")),
    ),
)

# The CertError each page must name where the class is unambiguous.
_ERRORS = {
    "expired": "expired",
    "not-yet-valid": "not_yet_valid",
    "expired-int": "expired",
    "wrong-host": "name_mismatch",
    "self-signed": "self_signed",
    "untrusted-root": "unknown_issuer",
    "incomplete-chain": "incomplete_chain",
    "revoked-ocsp": "revoked",
    "revoked-crl": "revoked",
    "rsa512": "weak_key",
    "rsa1024": "weak_key",
    "rsa2047": "weak_key",
    "md5": "weak_signature",
    "sha1-leaf": "weak_signature",
    "sha1-int": "weak_signature",
    "critical-ext": "unknown_critical_extension",
    "wrong-eku": "wrong_usage",
    "tampered": "bad_signature",
    "no-san": "name_mismatch",
    "partial-wildcard": "name_mismatch",
    "psl-wildcard": "name_mismatch",
    "wildcard-apex": "name_mismatch",
    "ip-in-dns": "name_mismatch",
    "hsts-host": "expired",
    "hsts-subdomain": "expired",
    "preloaded": "expired",
    "preloaded-subdomain": "name_mismatch",
    "hsts-ip": "expired",
    "hsts-two-headers": "expired",
    "hsts-plain": "expired",
    "hsts-max-age-0": "expired",
}
for _key in ("tls10", "tls11", "sslv3", "rc4", "null", "anon", "3des", "cbc", "static-rsa"):
    _ERRORS[_key] = "protocol"
for _key in ("dh1024", "dh2048", "compression", "p192"):
    _ERRORS[_key] = "protocol"
SPECS = tuple(dataclasses.replace(spec, error=_ERRORS.get(spec.key)) for spec in SPECS)

NOT_BUILT: tuple[tuple[str, str, str], ...] = (
    (
        "CV-34",
        "known interception roots",
        "needs the CAs' leaked private keys; the distrust list is unit-tested",
    ),
    (
        "CV-35",
        "validity too long, public root",
        "the CLI cannot mark a test root as public (TrustConfig.public_roots)",
    ),
    (
        "CV-36",
        "intranet name, public root",
        "the CLI cannot mark a test root as public (TrustConfig.public_roots)",
    ),
    (
        "CV-37",
        "no SCT, public root",
        "needs a publicly trusted root; tlsmitm has no CT enforcement",
    ),
    ("CV-38", "static pin mismatch", "needs a publicly trusted chain for a pinned host"),
    ("CV-39", "EV", "needs a publicly trusted EV chain"),
    ("CV-40", "captive portal / interception markers", "Chromium-specific test certificates"),
    ("CV-41", "trust-store hygiene", "a property of the bundled roots, not of a server"),
    ("TLS-11", "DHE composite / small-subgroup group", "needs badssl's hand-made groups"),
    ("TLS-14", "no RFC 5746 secure renegotiation", "an OpenSSL server always supports RFC 5746"),
    ("TLS-15", "export suites (FREAK)", "OpenSSL 1.1+ has no export suites"),
    ("TLS-16", "SSLv3 fallback (POODLE)", "no SSLv3 in this OpenSSL; tlsmitm never falls back"),
    ("MIR-01", "version mirroring", "not asserted: downstream is TLS 1.3 whenever the client can"),
)


# -- fixtures -------------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    profile: str
    client: str
    expected: str
    got: str
    ok: bool | None  # None: not buildable here


@dataclass
class Matrix:
    box: Box
    built: dict[str, Built]
    proxies: dict[str, TlsmitmServe]
    rows: list[Row] = field(default_factory=list)
    extras: dict[str, Built] = field(default_factory=dict)
    chromium: dict[str, Any] = field(default_factory=dict)
    pages: dict[str, Any] = field(default_factory=dict)
    playwright: Any = None
    directory: Path = Path()


def _format(rows: list[Row], matrix: Matrix) -> str:
    header = ("case", "profile", "client", "expected", "got", "")
    lines = [header]
    for row in rows:
        mark = "ok" if row.ok else ("MISMATCH" if row.ok is False else "n/b")
        lines.append((row.case, row.profile, row.client, row.expected, row.got, mark))
    for case_id, title, reason in NOT_BUILT:
        lines.append((f"{case_id} {title}", "-", "-", "-", f"not buildable here: {reason}", "n/b"))
    widths = [min(60, max(len(line[i]) for line in lines)) for i in range(len(header))]
    out = [
        "  ".join(cell[: widths[i]].ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
        for line in lines
    ]
    started = ", ".join(f"{p}: {s.started_in:.1f} s" for p, s in matrix.proxies.items())
    out.append(f"tlsmitm serve start-up: {started}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    require_tool("openssl")
    directory = tmp_path_factory.mktemp("matrix")
    box = Box(directory)
    built: dict[str, Built] = {}
    proxies: dict[str, TlsmitmServe] = {}
    state = Matrix(box=box, built=built, proxies=proxies, directory=directory)
    try:
        for spec in SPECS:
            box.hosts.add(spec.host)
            try:
                built[spec.key] = spec.build(box, spec.host)
            except NotBuildable as exc:
                built[spec.key] = Built(origin=box.fleet.add(spec.host, None), unbuildable=str(exc))
        # Origins for the override tests below (their own hosts: a granted override must not
        # change what the matrix sees).
        for key, build in (
            ("override-expired", _expired),
            ("override-untrusted", b_untrusted_root),
        ):
            host = f"{key}.badssl.test"
            box.hosts.add(host)
            state.extras[key] = build(box, host)
        roots = directory / "upstream-roots.pem"
        roots.write_bytes(b"".join(r.pem for r in box.trusted_roots))
        resolve = [f"{host}=127.0.0.1" for host in box.hosts if not _is_ip(host)]
        box.fleet.start()
        for profile in PROFILES:
            proxies[profile] = TlsmitmServe(
                directory / f"serve-{profile}", profile=profile, extra_roots=roots, resolve=resolve
            ).start()
        yield state
    finally:
        for browser in state.chromium.values():
            browser.close()
        if state.playwright is not None:
            state.playwright.stop()
        codes = {p: s.stop() for p, s in proxies.items()}
        box.fleet.stop()
        table = _format(state.rows, state)
        report = tmp_path_factory.getbasetemp() / "conformance-matrix.txt"
        report.write_text(table + "\n")
        print("\n" + table + f"\n(written to {report})")
        assert all(code == 0 for code in codes.values()), (
            codes,
            [s.log_tail() for s in proxies.values()],
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _chromium_page(matrix: Matrix, profile: str) -> Any:
    """The page of a Chromium whose NSS database trusts only this profile's tlsmitm root."""
    page = matrix.pages.get(profile)
    if page is not None and not page.is_closed():
        return page
    if profile not in matrix.chromium:
        require_tool("chromium")
        certutil = require_tool("certutil")
        from playwright.sync_api import sync_playwright

        if matrix.playwright is None:
            matrix.playwright = sync_playwright().start()
        proxy = matrix.proxies[profile]
        home = nss_home(
            matrix.directory / f"home-{profile}", certutil, [("tlsmitm", proxy.ca_path)]
        )
        browser = matrix.playwright.chromium.launch(
            executable_path=chromium_executable(),
            args=chromium_args(proxy.port),
            env=chromium_env(home),
        )
        matrix.chromium[profile] = browser
    page = matrix.chromium[profile].new_context().new_page()
    matrix.pages[profile] = page
    return page


# -- running one case -----------------------------------------------------------------------------


def _url(scheme: str, host: str, port: int, path: str = "/") -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}{path}"


def _run_prime(matrix: Matrix, profile: str, client: str, prime: Prime, page: Any) -> str | None:
    """Make the prime request; returns why it failed, or ``None``."""
    proxy = matrix.proxies[profile]
    url = _url(prime.scheme, prime.host, prime.origin.port, prime.path)
    sts: str | None
    if client == "chromium":
        reset_page(page)
        response = page.goto(url, wait_until="domcontentloaded", timeout=20_000)
        if response is None or response.status != 200:
            return f"prime {url}: {response and response.status}"
        sts = response.headers.get("strict-transport-security")
    elif client == "curl":
        outcome = curl_request(require_tool("curl"), proxy, url, matrix.directory / "curl-prime")
        if outcome.label != DELIVERED:
            return f"prime {url}: {outcome}"
        sts = outcome.headers.get("strict-transport-security")
    elif prime.scheme == "http":
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
        try:
            conn.request("GET", url)
            response_ = conn.getresponse()
            response_.read()
            if response_.status != 200:
                return f"prime {url}: HTTP {response_.status}"
            sts = response_.getheader("strict-transport-security")
        finally:
            conn.close()
    else:
        outcome = python_request(proxy, prime.host, prime.origin.port, prime.path)
        if outcome.label != DELIVERED:
            return f"prime {url}: {outcome}"
        sts = outcome.headers.get("strict-transport-security")
    if prime.sts is not None and sts != prime.sts:
        return f"prime {url}: Strict-Transport-Security {sts!r}, sent {prime.sts!r} (MIR-04)"
    return None


def _run(matrix: Matrix, spec: Spec, profile: str, client: str, tmp: Path) -> Outcome:
    built = matrix.built[spec.key]
    proxy = matrix.proxies[profile]
    origin = built.origin
    page = _chromium_page(matrix, profile) if client == "chromium" else None
    for prime in built.primes:
        failure = _run_prime(matrix, profile, client, prime, page)
        if failure is not None:
            return Outcome(f"prime failed: {failure}")
    before = origin.request_count()
    url = _url("https", spec.host, origin.port)
    if spec.kind == "alpn":
        outcome = _run_alpn(matrix, spec, profile, client, page, tmp)
    elif client == "python":
        context = None
        if built.client_trust is not None:
            context = client_context(built.client_trust)
            assert built.client_cert is not None
            context.load_cert_chain(*built.client_cert)
        outcome = python_request(proxy, spec.host, origin.port, context=context)
        if outcome.label == DELIVERED and built.client_trust is not None:
            # Trusting only the origin's root, the client verified the origin's own leaf.
            outcome.label = SPLICED if outcome.peer_der == built.leaf_der else "intercepted?!"
    elif client == "curl":
        extra: list[str] = []
        cacert = None
        if built.client_cert is not None:
            extra = ["--cert", str(built.client_cert[0]), "--key", str(built.client_cert[1])]
            cacert = built.client_trust
        outcome = curl_request(require_tool("curl"), proxy, url, tmp, cacert=cacert, extra=extra)
        if outcome.label == DELIVERED and cacert is not None:
            outcome.label = SPLICED  # curl trusted only the origin's own root
    else:
        outcome = chromium_goto(page, url, origin.marker)
    received = origin.request_count() - before
    allowed = spec.expect.allowed(profile)
    wants_content = bool(allowed & {DELIVERED, SPLICED}) or spec.kind == "alpn"
    if not wants_content and received:
        outcome = Outcome(f"LEAK: the bad upstream received {received} request(s); saw {outcome}")
    if origin.marker in outcome.error_page:
        outcome = Outcome(f"LEAK: upstream content on the error page; saw {outcome}")
    if not wants_content and origin.marker in outcome.body:
        outcome = Outcome(f"LEAK: upstream content delivered; saw {outcome}")
    return outcome


def _run_alpn(
    matrix: Matrix, spec: Spec, profile: str, client: str, page: Any, tmp: Path
) -> Outcome:
    built = matrix.built[spec.key]
    proxy = matrix.proxies[profile]
    url = _url("https", spec.host, built.origin.port)
    if client == "python":
        return python_alpn(proxy, spec.host, built.origin.port, ["h2", "http/1.1"])
    if client == "curl":
        outcome = curl_request(require_tool("curl"), proxy, url, tmp)
        if outcome.label != DELIVERED:
            return outcome
        versions = {"1.1": "ALPN http/1.1", "2": "ALPN h2"}
        return Outcome(versions.get(outcome.version or "", f"HTTP version {outcome.version}"))
    outcome = chromium_goto(page, url, built.origin.marker)
    if outcome.label != DELIVERED:
        return outcome
    protocol = page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
    return Outcome(f"ALPN {protocol}")


def _items() -> list[Any]:
    items = []
    for spec in SPECS:
        for profile in PROFILES:
            for client in spec.clients:
                items.append(
                    pytest.param(
                        spec, profile, client, id=f"{spec.id}-{spec.key}-{profile}-{client}"
                    )
                )
    return items


@pytest.mark.parametrize(("spec", "profile", "client"), _items())
def test_matrix(matrix: Matrix, spec: Spec, profile: str, client: str, tmp_path: Path) -> None:
    built = matrix.built[spec.key]
    expected = spec.expect.describe(profile) + (f" [{spec.error}]" if spec.error else "")
    if built.unbuildable is not None:
        matrix.rows.append(
            Row(
                spec.label,
                profile,
                client,
                expected,
                f"not buildable here: {built.unbuildable}",
                None,
            )
        )
        pytest.skip(f"{spec.id} not buildable here: {built.unbuildable}")
    outcome = _run(matrix, spec, profile, client, tmp_path)
    ok = spec.accepts(profile, outcome)
    matrix.rows.append(Row(spec.label, profile, client, expected, str(outcome), ok))
    assert ok, (
        f"{spec.label} [{profile}/{client}]: expected {expected}, got {outcome}\n"
        f"tlsmitm log:\n{matrix.proxies[profile].log_tail()}"
    )


def test_every_matrix_case_has_a_unique_host_and_key() -> None:
    keys = [spec.key for spec in SPECS]
    assert len(keys) == len(set(keys))
    hosts = [spec.host for spec in SPECS if not _is_ip(spec.host)]
    assert len(hosts) == len(set(hosts))


def _override_then_fetch(matrix: Matrix, key: str) -> Outcome:
    proxy = matrix.proxies["page"]
    host = f"{key}.badssl.test"
    origin = matrix.extras[key].origin
    first = python_request(proxy, host, origin.port)
    assert first.label == PAGE_OVERRIDE, first
    assert python_override(proxy, first.error_page) == 303
    return python_request(proxy, host, origin.port)


def test_page_profile_override_lets_the_site_load(matrix: Matrix) -> None:
    outcome = _override_then_fetch(matrix, "override-untrusted")
    assert outcome.label == DELIVERED, outcome


def test_page_profile_override_of_an_expired_certificate_lets_the_site_load(
    matrix: Matrix,
) -> None:
    # The user accepted the dates: the leaf must not make the browser ask again (a trusted leaf
    # with the upstream's expired dates would show ERR_CERT_DATE_INVALID after the override).
    outcome = _override_then_fetch(matrix, "override-expired")
    assert outcome.label == DELIVERED, outcome
