"""Host-name verification: matrix section (c) vectors N-01..N-95 and section C (HN-P*).

Each vector is checked twice: against tlsmitm's RFC 9525 matcher alone (names_match_host), and
end to end through UpstreamVerifier with a real certificate, where cryptography's matcher must
agree before anything is accepted.

Deliberate differences from the matrix's Chromium rows, all at the URL layer, which sits in
front of tlsmitm (a browser sends tlsmitm canonical host names):

* N-19, N-20: percent-escapes are not undone here; an escaped host is not a host name.
* N-57: IPv4 shorthand (``14.15``) is not expanded here; the canonical ``14.0.0.15`` matches.
* N-77: ``[v6]`` brackets are stripped by normalize_host, so the bracketed form matches.
* N-44: wildcards under a *private* registry (``*.appspot.com``) match, following Chromium
  rather than x509-limbo's pedantic profile.

And one difference that comes from requiring both matchers to agree: a presented name with a
trailing dot (``foo.com.``, N-46/48/49a/50) matches in tlsmitm's matcher, as in Chromium, but
cryptography's refuses it, so such a certificate is a (overridable) name mismatch end to end.
CA/B BR certificates never carry such names.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pki import DAY, NOW, Hierarchy, good_hierarchy, issue, make_intermediate, make_root
from publicsuffixlist import PublicSuffixList

from tlsmitm._errors import CertError
from tlsmitm._verify import (
    TrustConfig,
    UpstreamVerifier,
    Verdict,
    certificate_matches_host,
    names_match_host,
)

Ip = ipaddress.IPv4Address | ipaddress.IPv6Address


def ips(*texts: str) -> list[Ip]:
    return [ipaddress.ip_address(t) for t in texts]


# (id, dNSName SANs, iPAddress SANs, host, expected match)
VECTORS: list[tuple[str, list[str], list[Ip], str, bool]] = [
    ("N-01", ["foo.com"], [], "foo.com", True),
    ("N-02", ["f"], [], "f", True),
    ("N-03", ["i"], [], "h", False),
    ("N-04", ["*.foo.com"], [], "bar.foo.com", True),
    ("N-05", ["*.test.com", "*.test.co.uk", "*.test.de", "*.test.fr"], [], "www.test.fr", True),
    ("N-06", ["", "*.*", "*.test.de", "*.test.FR", "www"], [], "wwW.tESt.fr", True),
    ("N-07", [".uk"], [], "f.uk", False),
    ("N-08", ["?.bar.foo.com"], [], "w.bar.foo.com", False),
    ("N-09", ["(www|ftp).foo.com"], [], "www.foo.com", False),
    ("N-10", ["www.foo.com\x00"], [], "www.foo.com", False),
    ("N-11", ["www.foo.com\x00*.foo.com", "\x00", "\x00"], [], "www.foo.com", False),
    ("N-12", ["ww.house.example"], [], "www.house.example", False),
    ("N-13", ["www.test.org", "*.test.org", "*.org"], [], "test.org", False),
    ("N-14", ["w*.bar.foo.com"], [], "w.bar.foo.com", False),
    ("N-15a", ["ww*ww.bar.foo.com"], [], "www.bar.foo.com", False),
    ("N-15b", ["ww*ww.bar.foo.com"], [], "wwww.bar.foo.com", False),
    ("N-16", ["w*w.bar.foo.com"], [], "wwww.bar.foo.com", False),
    ("N-17", ["wa*.bar.foo.com"], [], "WALLY.bar.foo.com", False),
    ("N-18", ["*Ly.bar.foo.com"], [], "wally.bar.foo.com", False),
    ("N-19 escaped", ["www.foo.com"], [], "ww%57.foo.com", False),
    ("N-19 unescaped", ["www.foo.com"], [], "wwW.foo.com", True),
    ("N-20 escaped", ["www.foo.com"], [], "www%2Efoo.com", False),
    ("N-21", ["www", "foo.com", "www.foo.com"], [], "www%00.foo.com", False),
    ("N-22", ["www.foo.com", "www\r.foo.com"], [], "www%0D.foo.com", False),
    ("N-23", ["www@foo.com"], [], "www%40foo.com", False),
    ("N-24", ["www.foo.com", "www..foo.com"], [], "www%2E%2Efoo.com", False),
    ("N-25", ["www.foo.com"], [], "www%252Efoo.com", False),
    ("N-26", ["xn--poema-9qae5a.com.br"], [], "xn--poema-9qae5a.com.br", True),
    ("N-27", ["*.xn--poema-9qae5a.com.br"], [], "www.xn--poema-9qae5a.com.br", True),
    (
        "N-28",
        [
            "*.xn--poema-9qae5a.com.br",
            "xn--poema-*.com.br",
            "xn--*-9qae5a.com.br",
            "*--poema-9qae5a.com.br",
        ],
        [],
        "xn--poema-9qae5a.com.br",
        False,
    ),
    ("N-29", ["xn--*-1b3c148a.example.com"], [], "xn--bliss-1b3c148a.example.com", False),
    ("N-30", ["x*.example.org"], [], "xn--tst-bma.example.org", False),
    ("N-31", ["*.example.com"], [], "foo.example.com", True),
    ("N-32", ["*.example.com"], [], "bar.foo.example.com", False),
    ("N-33", ["*.example.com"], [], "example.com", False),
    ("N-34a", ["baz*.example.net"], [], "baz1.example.net", False),
    ("N-34b", ["*baz.example.net"], [], "foobaz.example.net", False),
    ("N-34c", ["b*z.example.net"], [], "buzz.example.net", False),
    ("N-35", ["www.*.example.net"], [], "www.test.example.net", False),
    ("N-36", ["*.test.example"], [], "www.test.example", True),
    ("N-37", ["*.example.co.uk"], [], "test.example.co.uk", True),
    ("N-38", ["*.example"], [], "test.example", False),
    ("N-39", ["*.co.uk"], [], "example.co.uk", False),
    ("N-40a", ["*.com"], [], "foo.com", False),
    ("N-40b", ["*.us"], [], "foo.us", False),
    ("N-41", ["*"], [], "foo", False),
    ("N-42", ["*.com.br"], [], "xn--poema-9qae5a.com.br", False),
    ("N-43a", ["*.example.xn--mgbaam7a8h"], [], "test.example.xn--mgbaam7a8h", True),
    ("N-43b", ["*.xn--mgbaam7a8h"], [], "example.xn--mgbaam7a8h", False),
    ("N-44a", ["*.appspot.com"], [], "www.appspot.com", True),
    ("N-44b", ["*.s3.amazonaws.com"], [], "foo.s3.amazonaws.com", True),
    ("N-45a", ["*.*.com"], [], "foo.example.com", False),
    ("N-45b", ["*.bar.*.com"], [], "foo.bar.example.com", False),
    ("N-46", ["foo.com."], [], "foo.com", True),
    ("N-47", ["foo.com"], [], "foo.com.", True),
    ("N-48", ["foo.com."], [], "foo.com.", True),
    ("N-49a", ["f."], [], "f", True),
    ("N-49b", ["f"], [], "f.", True),
    ("N-50", ["*.bar.foo.com."], [], "www-3.bar.foo.com", True),
    ("N-51", ["*.bar.foo.com"], [], "www-3.bar.foo.com.", True),
    ("N-52", ["."], [], ".", False),
    ("N-53a", ["*.com."], [], "example.com", False),
    ("N-53b", ["*.com."], [], "example.com.", False),
    ("N-54a", ["*."], [], "foo.", False),
    ("N-54b", ["*."], [], "foo", False),
    ("N-55a", ["*.co.uk."], [], "foo.co.uk", False),
    ("N-55b", ["*.co.uk."], [], "foo.co.uk.", False),
    ("N-56", [], ips("10.1.2.3"), "10.1.2.3", True),
    ("N-57 shorthand", [], ips("14.0.0.15"), "14.15", False),
    ("N-57 canonical", [], ips("14.0.0.15"), "14.0.0.15", True),
    ("N-58", [], ips("10.1.2.6", "10.1.2.8"), "10.1.2.7", False),
    ("N-59", ["foo"], [], "10.1.2.8", False),
    ("N-60", [], ips("::4.5.6.7"), "::4.5.6.7", True),
    ("N-61", ["::6.7.8.9"], ips("::6.7.8.8", "ff00::6.7.8.9", "6.7.8.9"), "::6.7.8.9", False),
    (
        "N-62",
        [],
        ips("::1", "fe80::200:f8ff:fe21:67cf", "10.0.0.1"),
        "FE80::200:f8ff:fe21:67cf",
        True,
    ),
    (
        "N-63",
        ["1*1.2.3.512", "*1.2.3.512", "1*.2.3.512", "*.2.3.512"],
        ips("121.2.3.0"),
        "121.2.3.512",
        False,
    ),
    ("N-64a", ["*.2.3.4.5.6"], [], "1.2.3.4.5.6", False),
    ("N-64b", ["1.2.3.4.5"], [], "1.2.3.4.5", False),
    ("N-64c", ["*.0.0.1"], [], "a.0.0.1", False),
    ("N-65", ["127.0.0.1", "*.0.0.1"], [], "127.0.0.1", False),
    ("N-66a", [], [], ".", False),
    ("N-66b", ["."], [], ".", False),
    ("N-67", [], ips("1.2.3.4"), "1.2.3.4..", False),
    ("N-68", ["www.domain.example"], [], "www..domain.example", False),
    ("N-69a", ["www^domain.example"], [], "www^domain.example", False),
    ("N-69b", ["www^domain.example"], [], "www%5Edomain.example", False),
    ("N-70a", ["www .domain.example"], [], "www%20.domain.example", False),
    ("N-70b", ["www .domain.example"], [], "www%2520.domain.example", False),
    ("N-71", ["www,domain.example"], [], "www,domain.example", False),
    ("N-72", ["junk)(£)$*!@~#"], [], "junk)(£)$*!@~#", False),
    ("N-73", ["www.*.com"], [], "www.*.com", False),
    ("N-74", ["w$w.f.com"], [], "w$w.f.com", False),
    ("N-75", ["nocolonallowed:example"], [], "nocolonallowed:example", False),
    ("N-76", ["*.[::FFFF:129.144.52.38]"], [], "www-1.[::FFFF:129.144.52.38]", False),
    ("N-77", [], ips("::4.5.6.9"), "[::4.5.6.9]", True),
    ("N-78", ["example.com"], [], "example.com", True),
    ("N-79", ["example.com"], [], "example2.com", False),
    ("N-80", ["abc.example.com"], [], "def.example.com", False),
    ("N-81", ["example.com"], [], "abc.example.com", False),
    ("N-82", ["abc.example.com"], [], "example.com", False),
    ("N-83", ["😜.example.com"], [], "xn--628h.example.com", False),
    ("N-90", [], ips("127.0.0.1"), "127.0.0.1", True),
    ("N-91", ["*.example.test"], [], "WWW.EXAMPLE.TEST", True),
    ("N-92", ["*.test"], [], "example.test", False),
    ("N-94", ["w*.example.test"], [], "www.example.test", False),
    ("N-95", ["xn--n1aae7f7o.badssl.test"], [], "xn--n1aae7f7o.badssl.test", True),
    ("HN-P5", ["127.0.0.1"], [], "127.0.0.1", False),
]


@pytest.mark.parametrize(
    ("dns", "addresses", "host", "expected"),
    [pytest.param(d, a, host, e, id=i) for i, d, a, host, e in VECTORS],
)
def test_vector_with_the_matcher_alone(
    dns: list[str], addresses: list[Ip], host: str, expected: bool
) -> None:
    assert names_match_host(dns, addresses, host) is expected


# --------------------------------------------------------------------------------------------
# End to end: real certificates, cryptography's matcher must agree


@pytest.fixture(scope="module")
def h() -> Hierarchy:
    return good_hierarchy()


@pytest.fixture(scope="module")
def verifier(h: Hierarchy) -> UpstreamVerifier:
    return UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)))


def raw_san(dns: Sequence[str], addresses: Sequence[Ip]) -> x509.UnrecognizedExtension:
    """A SAN extension with the dNSName octets exactly as given (UTF-8 included, N-83)."""

    def tlv(tag: int, value: bytes) -> bytes:
        if len(value) < 0x80:
            return bytes([tag, len(value)]) + value
        return bytes([tag, 0x82, len(value) >> 8, len(value) & 0xFF]) + value

    body = b"".join(tlv(0x82, name.encode()) for name in dns)
    body += b"".join(tlv(0x87, address.packed) for address in addresses)
    return x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, tlv(0x30, body))


def leaf_for(h: Hierarchy, dns: Sequence[str], addresses: Sequence[Ip]) -> x509.Certificate:
    extra: list[tuple[x509.ExtensionType, bool]] = []
    if dns or addresses:
        extra.append((raw_san(dns, addresses), False))
    return issue(subject_cn="names test", issuer=h.intermediate, sans=None, extra=extra).cert


# Presented names ending in a dot: cryptography's matcher refuses them (see the module docstring).
CRYPTOGRAPHY_REFUSES = {"N-46", "N-48", "N-49a", "N-50"}


@pytest.mark.parametrize(
    ("dns", "addresses", "host", "expected", "end_to_end"),
    [
        pytest.param(d, a, host, e, e and i not in CRYPTOGRAPHY_REFUSES, id=i)
        for i, d, a, host, e in VECTORS
    ],
)
def test_vector_end_to_end(
    verifier: UpstreamVerifier,
    h: Hierarchy,
    dns: list[str],
    addresses: list[Ip],
    host: str,
    expected: bool,
    end_to_end: bool,
) -> None:
    leaf = leaf_for(h, dns, addresses)
    assert certificate_matches_host(leaf, host) is expected
    verdict = verifier.verify([leaf, h.intermediate.cert], host, now=NOW)
    if end_to_end:
        assert verdict.ok, verdict.detail
    else:
        assert not verdict.ok
        assert verdict.error is CertError.NAME_MISMATCH, verdict.detail
        assert verdict.overridable


def test_n84_no_san_with_the_host_as_common_name(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    leaf = issue(subject_cn="example.com", issuer=h.intermediate, sans=None).cert
    assert not certificate_matches_host(leaf, "example.com")
    verdict = verifier.verify([leaf, h.intermediate.cert], "example.com", now=NOW)
    assert verdict.error is CertError.NAME_MISMATCH


def test_hn_p4_embedded_nul(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    for names in (["www.foo.com\x00"], ["www.foo.com\x00*.foo.com"]):
        leaf = issue(subject_cn=None, issuer=h.intermediate, sans=names).cert
        verdict = verifier.verify([leaf, h.intermediate.cert], "www.foo.com", now=NOW)
        assert verdict.error is CertError.NAME_MISMATCH


# --------------------------------------------------------------------------------------------
# N-85..N-89: the CA/B subject profile, applied to publicly trusted roots only

T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def public() -> Hierarchy:
    root = make_root("Public Names Root", not_before=T0 - 400 * DAY, not_after=T0 + 3000 * DAY)
    intermediate = make_intermediate(root, not_before=T0 - 400 * DAY, not_after=T0 + 2000 * DAY)
    return Hierarchy(root, intermediate, intermediate)


@pytest.mark.parametrize(
    ("cn", "sans", "host"),
    [
        pytest.param("0x08080808", ["8.8.8.8"], "8.8.8.8", id="N-86 hex IPv4 CN"),
        pytest.param("008.008.008.008", ["8.8.8.8"], "8.8.8.8", id="N-87 leading zeros"),
        pytest.param(
            "2A00:1450:4001:80B::200E",
            ["2a00:1450:4001:80b::200e"],
            "2a00:1450:4001:80b::200e",
            id="N-88 upper-case IPv6 CN",
        ),
        pytest.param(
            "www.example.com", ["other.example.com"], "other.example.com", id="N-89 not in SAN"
        ),
        pytest.param("WWW.example.com", ["www.example.com"], "www.example.com", id="N-89 case"),
        pytest.param(
            "ѕрооғ.example.com",
            ["xn--n1aae7f7o.example.com"],
            "xn--n1aae7f7o.example.com",
            id="N-89 U-label CN",
        ),
    ],
)
def test_n86_n89_common_name_must_repeat_a_san_value_for_public_roots(
    public: Hierarchy, cn: str, sans: list[str], host: str
) -> None:
    leaf = issue(
        subject_cn=cn, issuer=public.intermediate, sans=sans,
        not_before=T0 - DAY, not_after=T0 + 90 * DAY,
    ).cert  # fmt: skip
    chain = [leaf, public.intermediate.cert]
    verdict = UpstreamVerifier(TrustConfig(public_roots=(public.root.cert,))).verify(
        chain, host, now=T0
    )
    assert verdict.error is CertError.MALFORMED, verdict.detail
    assert "common name" in verdict.detail
    # Browsers ignore the CN entirely; so does tlsmitm for enterprise roots.
    enterprise = UpstreamVerifier(TrustConfig(extra_roots=(public.root.cert,)))
    assert enterprise.verify(chain, host, now=T0).ok


def test_consistent_common_names_are_fine_for_public_roots(public: Hierarchy) -> None:
    verifier = UpstreamVerifier(TrustConfig(public_roots=(public.root.cert,)))
    for cn, host in [("www.example.com", "www.example.com"), ("8.8.8.8", "8.8.8.8")]:
        leaf = issue(
            subject_cn=cn, issuer=public.intermediate, sans=[host],
            not_before=T0 - DAY, not_after=T0 + 90 * DAY,
        ).cert  # fmt: skip
        verdict = verifier.verify([leaf, public.intermediate.cert], host, now=T0)
        assert verdict.ok, verdict.detail


# --------------------------------------------------------------------------------------------
# Properties: tlsmitm's matcher against a plain reference model, and cryptography agreeing

_PSL = PublicSuffixList(only_icann=True)
LABELS = ["a", "b", "www", "example", "co", "uk", "com", "test", "xn--bcher-kva"]


def reference_match(presented: Sequence[str], host: str) -> bool:
    """RFC 9525 §6.3 as plainly as possible (inputs: lower-case ASCII, no trailing dots)."""
    host_labels = host.split(".")
    for name in presented:
        labels = name.split(".")
        if len(labels) != len(host_labels):
            continue
        if "*" in name:
            rest = ".".join(labels[1:])
            if labels[0] != "*" or "*" in rest or len(labels) < 2 or _PSL.is_public(rest):
                continue
            if labels[1:] == host_labels[1:]:
                return True
        elif labels == host_labels:
            return True
    return False


names = st.lists(st.sampled_from(LABELS), min_size=1, max_size=4).map(".".join)
patterns = st.one_of(names, names.map(lambda n: "*." + n), names.map(lambda n: "w*." + n))


@settings(max_examples=300, deadline=None)
@given(
    presented=st.lists(patterns, min_size=1, max_size=3),
    host=names,
    upper=st.booleans(),
    dot=st.booleans(),
)
def test_property_matcher_agrees_with_the_reference(
    presented: list[str], host: str, upper: bool, dot: bool
) -> None:
    asked = (host.upper() if upper else host) + ("." if dot else "")
    assert names_match_host(presented, [], asked) is reference_match(presented, host)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(presented=st.lists(patterns, min_size=1, max_size=3), host=names)
def test_property_verdicts_follow_the_names(
    verifier: UpstreamVerifier, h: Hierarchy, presented: list[str], host: str
) -> None:
    leaf = issue(subject_cn=None, issuer=h.intermediate, sans=presented).cert
    verdict = verifier.verify([leaf, h.intermediate.cert], host, now=NOW)
    assert verdict.ok is reference_match(presented, host)
    assert verdict.ok or verdict.error is CertError.NAME_MISMATCH


# --------------------------------------------------------------------------------------------
# verdict_for_host: a chain's success carried to another name must be what a full verification
# of that name gives, or nothing (then the caller verifies in full)


def seed_verdict(
    verifier: UpstreamVerifier,
    chain: Sequence[x509.Certificate],
    dns: Sequence[str],
    now: dt.datetime,
) -> Verdict | None:
    """A success of ``chain`` for some host its SANs name, if any verifies."""
    for value in dns:
        base = value.rstrip(".")
        for host in (base, "seed." + base[2:] if base.startswith("*.") else base):
            try:
                verdict = verifier.verify(chain, host, now=now)
            except ValueError:
                continue
            if verdict.ok:
                return verdict
    return None


def assert_carried_or_nothing(
    verifier: UpstreamVerifier, chain: Sequence[x509.Certificate], seed: Verdict, host: str,
    now: dt.datetime,
) -> Verdict | None:  # fmt: skip
    carried = verifier.verdict_for_host(seed, host, now=now)
    if carried is not None:
        assert carried == verifier.verify(chain, host, now=now)
    return carried


@pytest.mark.parametrize(
    ("dns", "addresses", "host"),
    [pytest.param(d, a, host, id=i) for i, d, a, host, _ in VECTORS],
)
def test_vector_carried_verdict_is_the_full_verdict(
    verifier: UpstreamVerifier, h: Hierarchy, dns: list[str], addresses: list[Ip], host: str
) -> None:
    leaf = leaf_for(h, dns, addresses)
    chain = [leaf, h.intermediate.cert]
    seed = seed_verdict(verifier, chain, dns, NOW)
    if seed is None:
        return
    assert_carried_or_nothing(verifier, chain, seed, host, NOW)


def test_carried_verdicts_for_the_names_of_a_wildcard_chain(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    leaf = issue(subject_cn=None, issuer=h.intermediate, sans=["*.example.test", "Example.test"])
    chain = [leaf.cert, h.intermediate.cert]
    seed = verifier.verify(chain, "a.example.test", now=NOW)
    assert seed.ok
    for host in ("b.example.test", "WWW.example.test", "example.test", "x-1.example.test."):
        carried = assert_carried_or_nothing(verifier, chain, seed, host, NOW)
        assert carried is not None, host
        assert carried.ok
        assert carried.host == host.lower().rstrip(".")
    # Not covered, or not for the fast path: the full verification decides.
    for host in ("a.b.example.test", "other.test", "10.0.0.1", "a_b.example.test", "test"):
        assert verifier.verdict_for_host(seed, host, now=NOW) is None, host
    # A failure is never carried.
    failed = verifier.verify(chain, "other.test", now=NOW)
    assert verifier.verdict_for_host(failed, "b.example.test", now=NOW) is None


def test_a_trailing_dot_san_is_not_carried_where_cryptography_refuses_it(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    # tlsmitm's matcher drops the dot; cryptography's refuses the name: end to end a mismatch.
    leaf = leaf_for(h, ["seed.test", "foo.test.", "*.bar.test."], [])
    chain = [leaf, h.intermediate.cert]
    seed = verifier.verify(chain, "seed.test", now=NOW)
    assert seed.ok
    for host in ("foo.test", "x.bar.test"):
        assert not verifier.verify(chain, host, now=NOW).ok
        assert verifier.verdict_for_host(seed, host, now=NOW) is None


def test_a_non_ascii_san_that_lowercases_to_ascii_is_not_carried(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    leaf = leaf_for(h, ["seed.test", "\u212aa.test", "ka.test."], [])  # KELVIN SIGN
    chain = [leaf, h.intermediate.cert]
    seed = verifier.verify(chain, "seed.test", now=NOW)
    assert seed.ok
    assert not verifier.verify(chain, "ka.test", now=NOW).ok
    assert verifier.verdict_for_host(seed, "ka.test", now=NOW) is None


def test_name_constraints_in_the_path_are_never_carried() -> None:
    root = make_root("NC Root")
    constrained = make_intermediate(
        root, "NC Intermediate",
        extra=[(x509.NameConstraints(
            permitted_subtrees=None, excluded_subtrees=[x509.DNSName("elsewhere.test")]
        ), True)],
    )  # fmt: skip
    verifier = UpstreamVerifier(TrustConfig(extra_roots=(root.cert,)))
    leaf = issue(subject_cn=None, issuer=constrained, sans=["*.example.test"])
    chain = [leaf.cert, constrained.cert]
    seed = verifier.verify(chain, "good.example.test", now=NOW)
    assert seed.ok, seed.detail
    assert verifier.verdict_for_host(seed, "other.example.test", now=NOW) is None


def test_public_root_rules_are_run_for_the_new_name(public: Hierarchy) -> None:
    verifier = UpstreamVerifier(TrustConfig(public_roots=(public.root.cert,)))
    leaf = issue(
        subject_cn=None, issuer=public.intermediate, sans=["*.example.com", "*.corp"],
        not_before=T0 - DAY, not_after=T0 + 90 * DAY,
    ).cert  # fmt: skip
    chain = [leaf, public.intermediate.cert]
    seed = verifier.verify(chain, "www.example.com", now=T0)
    assert seed.ok, seed.detail
    assert seed.public_root
    carried = assert_carried_or_nothing(verifier, chain, seed, "mail.example.com", T0)
    assert carried is not None
    # An internal name: no public CA may certify it; never carried (the full path refuses).
    assert not verifier.verify(chain, "host.corp", now=T0).ok
    assert verifier.verdict_for_host(seed, "host.corp", now=T0) is None


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(presented=st.lists(patterns, min_size=1, max_size=3), host=names, dot=st.booleans())
def test_property_carried_verdicts_are_the_full_verdicts(
    verifier: UpstreamVerifier, h: Hierarchy, presented: list[str], host: str, dot: bool
) -> None:
    leaf = issue(subject_cn=None, issuer=h.intermediate, sans=presented).cert
    chain = [leaf, h.intermediate.cert]
    seed = seed_verdict(verifier, chain, presented, NOW)
    if seed is not None:
        assert_carried_or_nothing(verifier, chain, seed, host + ("." if dot else ""), NOW)
