"""Host-name normalisation: the one place every comparison of names starts from."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsmitm._errors import CertError
from tlsmitm._names import (
    HostName,
    InvalidHostName,
    ip_address_of,
    is_ip_literal,
    is_same_or_subdomain,
    normalize_host,
    try_normalize_host,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("example.com", "example.com"),
        ("EXample.coM", "example.com"),  # M-08
        ("example.com.", "example.com"),  # M-01, N-46/N-47
        ("wwW.tESt.fr", "www.test.fr"),  # N-06
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("xn--poema-9qae5a.com.br", "xn--poema-9qae5a.com.br"),  # N-26
        ("xn--n1aae7f7o.badssl.test", "xn--n1aae7f7o.badssl.test"),  # N-95
        ("f", "f"),  # N-02
        ("f.", "f"),  # N-49
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("FE80::200:f8ff:fe21:67cf", "fe80::200:f8ff:fe21:67cf"),  # N-62, RFC 5952
        ("::4.5.6.7", "::405:607"),
        (b"example.org", "example.org"),
    ],
)
def test_normalises(name: str | bytes, expected: str) -> None:
    assert normalize_host(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "...",
        ".example.com",  # M-02
        "sub..example.com",  # M-04
        "example.com..",  # M-05: Chromium treats the empty label as invalid
        "www.foo.com\x00",  # N-10
        "www%2Efoo.com",  # N-20: no unescaping here
        "www@foo.com",
        "www^domain.example",  # N-69
        "www,domain.example",  # N-71
        "www .domain.example",  # N-70
        "nocolonallowed:example",  # N-75
        "14.15",  # N-57: IPv4 short forms are the URL layer's job
        "1.2.3.4.5",  # N-64
        "1.2.3.4..",  # N-67
        "a" * 64 + ".example",
        ".".join(["a" * 60] * 5),
        "xn--zz.example",  # not a valid A-label
        "[1.2.3.4]",
        "fe80::1%eth0",
        b"\xff.example",
    ],
)
def test_rejects(name: str | bytes) -> None:
    with pytest.raises(InvalidHostName) as info:
        normalize_host(name)
    assert info.value.reason == "invalid_host"
    assert try_normalize_host(name) is None


def test_ip_literals() -> None:
    assert is_ip_literal("10.1.2.3")
    assert is_ip_literal("[2001:db8::1]")
    assert not is_ip_literal("example.com")
    assert not is_ip_literal("999.1.1.1")
    assert str(ip_address_of("[::1]")) == "::1"
    assert ip_address_of("localhost") is None


def test_subdomain_matching_is_label_aligned() -> None:
    assert is_same_or_subdomain("example.net", "example.net")
    assert is_same_or_subdomain("a.b.example.net", "example.net")
    assert not is_same_or_subdomain("forexample.net", "example.net")  # M-11
    assert not is_same_or_subdomain("example.net", "a.example.net")


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(st.lists(_label, min_size=2, max_size=5), st.booleans(), st.booleans())
@settings(max_examples=200, deadline=None)
def test_idempotent_and_case_and_dot_insensitive(labels: list[str], upper: bool, dot: bool) -> None:
    name = ".".join(labels)
    if all(label.isdigit() for label in labels):
        return
    variant = (name.upper() if upper else name) + ("." if dot else "")
    once = normalize_host(variant)
    assert once == normalize_host(once) == normalize_host(name)


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_never_raises_anything_else(text: str) -> None:
    try:
        result = normalize_host(text)
    except InvalidHostName:
        return
    assert result == result.lower()
    assert not result.endswith(".") or result == ""


def test_a_host_name_is_normalised_once_and_then_passes_unchanged() -> None:
    name = HostName("WWW.Bücher.EXAMPLE.")
    assert isinstance(name, str)
    assert isinstance(name, HostName)
    assert name == "www.xn--bcher-kva.example"
    assert hash(name) == hash("www.xn--bcher-kva.example")
    # What the policy, verifier, forge, HSTS store and responder call returns it as it is.
    assert normalize_host(name) is name
    assert HostName(name) is name
    assert try_normalize_host(name) is name
    assert type(normalize_host(b"Example.COM")) is HostName
    assert type(normalize_host("[2001:DB8::1]")) is HostName
    assert normalize_host("[2001:DB8::1]") == "2001:db8::1"
    with pytest.raises(InvalidHostName):
        HostName("a..b")
    assert pickle.loads(pickle.dumps(name)) == name
    assert {name: 1}["www.xn--bcher-kva.example"] == 1


@given(st.lists(_label, min_size=2, max_size=4))
@settings(max_examples=100, deadline=None)
def test_host_names_from_any_spelling_are_the_same_value(labels: list[str]) -> None:
    name = ".".join(labels)
    if all(label.isdigit() for label in labels):
        return
    plain, shouted = HostName(name), HostName(name.upper() + ".")
    assert plain == shouted
    assert normalize_host(shouted) is shouted


def test_cert_error_overridability_follows_firefox() -> None:
    overridable = {e for e in CertError if e.overridable}
    assert overridable == {
        CertError.EXPIRED,
        CertError.NOT_YET_VALID,
        CertError.NAME_MISMATCH,
        CertError.UNKNOWN_ISSUER,
        CertError.SELF_SIGNED,
        CertError.INCOMPLETE_CHAIN,
        CertError.VALIDITY_TOO_LONG,
    }
    for never in (
        CertError.REVOKED,
        CertError.WEAK_KEY,
        CertError.BAD_SIGNATURE,
        CertError.UNKNOWN_CRITICAL_EXTENSION,
        CertError.DISTRUSTED,
        CertError.OWN_CA,
    ):
        assert not never.overridable
