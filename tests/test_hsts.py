"""HstsStore, parse_sts and PreloadList against matrix section (b) and section F (POL-*)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hstspreload
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsmitm._errors import ConfigurationError
from tlsmitm._hsts import (
    MAX_STS_AGE,
    HstsStore,
    KnownHost,
    PreloadList,
    StsPolicy,
    parse_sts,
)
from tlsmitm._sqlite_store import SqliteStore
from tlsmitm._store import MemoryStore, StoredItem

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[1]
YEAR = 31536000

# --------------------------------------------------------------------------------------------
# b.2 header vectors: (id, value, expected (max_age, include_subdomains) or None)
# Where Firefox's or Qt's expectation differs from Chromium's cap, the Chromium value is used
# (H-63: 34520103 is capped to one year).
# --------------------------------------------------------------------------------------------

HEADER_VECTORS: list[tuple[str, str, tuple[int, bool] | None]] = [
    ("H-01", "max-age=123", (123, False)),
    ("H-02", ";max-age=123", (123, False)),
    ("H-03", ";;;;max-age=123;;;;", (123, False)),
    ("H-04", "; ; max-age=123; ; ", (123, False)),
    ("H-05", "max-age=123;;", (123, False)),
    ("H-06", "  Max-agE    = 567", (567, False)),
    ("H-07", "  mAx-aGe    = 890      ", (890, False)),
    ("H-08", "max-age=123;incLudesUbdOmains", (123, True)),
    ("H-09", "incLudesUbdOmains; max-age=123", (123, True)),
    ("H-10", "   incLudesUbdOmains; max-age=123; pumpkin=kitten", (123, True)),
    ("H-11", "   pumpkin=894; incLudesUbdOmains; max-age=123  ", (123, True)),
    ("H-12", "   pumpkin; incLudesUbdOmains; max-age=123  ", (123, True)),
    ("H-13", '   pumpkin; incLudesUbdOmains; max-age="123"  ', (123, True)),
    ("H-14", 'animal="squirrel; distinguished"; incLudesUbdOmains; max-age=123', (123, True)),
    ("H-15", "max-age=394082;  incLudesUbdOmains", (394082, True)),
    ("H-16", "max-age=39408299  ;incLudesUbdOmains", (YEAR, True)),
    ("H-17", ";;    ; ; max-age=394082038;;; includeSubdomains     ;;  ;", (YEAR, True)),
    ("H-18", "  max-age=0  ;  incLudesUbdOmains   ", (0, True)),
    ("H-19", "  max-age=" + "9" * 45 + "  ;  incLudesUbdOmains   ", (YEAR, True)),
    ("H-20", "'max-age'=1", None),
    ("H-21", '"max-age"=1', None),
    ("H-22", "max-age=1; max-age=2", None),
    ("H-22/Fx", "max-age=100; max-age=200", None),
    ("H-23", "max-age=1; MaX-AgE=2", None),
    ("H-24", "max-age=1; includeSubDomains; iNcLUdEsUbDoMaInS", None),
    ("H-24/Fx", "max-age=200; includeSubdomains; includeSubdomains", None),
    ("H-24/Qt", "max-age = 1000 ; includeSubDomains;includeSubDomains", None),
    ("H-25", 'max-age=1; "', None),
    ("H-26", 'max-age=1; includeSubdomains"', None),
    ("H-27", "max-age=1; includeSubdomains; non@token", None),
    ("H-28", "max-age=1; includeSubdomains; non,token", None),
    ("H-29", "max-age=1; =2", None),
    ("H-30", "max-age=", None),
    ("H-31", "max-age=1a;", None),
    ("H-32", "max-age=-1;", None),
    ("H-32/Qt", "max-age=-1000   ; includeSubDomains", None),
    ("H-33", "max-age=+1;", None),
    ("H-34", "max-age='1';", None),
    ("H-35", "max-age=1 abc;", None),
    ("H-36", "max-age=1.5;", None),
    ("H-36/Fx", "max-age=.20032", None),
    ("H-37", "max-age=1; includeSubDomains=true", None),
    ("H-37/Fx", "max-age=1; includeSubdomains=unexpected", None),
    ("H-38", 'max-age=1; includeSubDomains=""', None),
    ("H-39", 'max-age=1; unknownDirective=non"token', None),
    ("H-40", "max-age=1; unknownDirective=", None),
    ("H-41", "", None),
    ("H-42", "    ", None),
    ("H-43", "abc", None),
    ("H-43/Fx", "foobar", None),
    ("H-44", "max-age", None),
    ("H-45", "   max-age  =     3488a923", None),
    ("H-46", "max-ag=3488923", None),
    ("H-46/maxage", "maxage=100", None),
    ("H-46/maxa-ge", "maxa-ge=100", None),
    ("H-47", "max-aged=3488923", None),
    ("H-48", "max-age==3488923", None),
    ("H-49", "amax-age=3488923", None),
    ("H-50", "max-age=3488923     includesubdomain", None),
    ("H-50/Fx1", "max-age=100 includesubdomains", None),
    ("H-50/Fx2", "max-age=100 bar foo", None),
    ("H-51", "max-age=3488923includesubdomains", None),
    ("H-51/Fx", "max-age=100randomstuffhere", None),
    ("H-52", ";;;; includeSubDomains;;;", None),
    ("H-52/cu", "includeSubDomains; ", None),
    ("H-53", "max-age; ;", None),
    ("H-53/Go", "max-age;", None),
    ("H-54", "max-age=9223372036854775807#####", None),
    ("H-55", 'max-age=12";', None),
    ("H-55/cu", 'max-age=31536"', None),  # curl accepts; Chromium does not (b.5 item 3)
    ("H-56", "max-age=100", (100, False)),
    ("H-57", "max-age  =100", (100, False)),
    ("H-58", 'max-age = "100" ', (100, False)),
    ("H-59", '\tmax-age\t=\t"100"\t', (100, False)),
    ("H-60", "INCLUDESUBDOMAINS;MaX-AgE = 100 ", (100, True)),
    ("H-61", "max-age=100;includeSubdomains;", (100, True)),
    ("H-62", "max-age=100 ; includesubdomainsSomeStuff", (100, False)),
    (
        "H-63",
        "\r\n\t\t    \tcompletelyUnrelated = foobar; max-age= 34520103\t \t; "
        "alsoUnrelated;asIsThis;\tincludeSubdomains\t\t \t",
        (YEAR, True),
    ),
    ("H-64", 'max-age=100; unrelated="quoted \\"thingy\\""', (100, False)),
    ("H-65", "\r\nmax-age=200", None),
    ("H-66/a", "max-age=p", None),
    ("H-66/b", "max-age=*1p2", None),
    ("H-66/c", "max-age=!20032", None),
    ("H-67", 'max-age="100', None),
    ("H-67/cu", 'max-age="31536', None),
    ("H-68", "max-age=100, max-age=200; includeSubdomains", None),
    ("H-69", "includeSubDomains;max-age=1000", (1000, True)),
    (
        "H-70",
        ';max-age=1000 ;includesubdomains;;nowsomeunknownheader="somevaluewithescapes\\;"',
        (1000, True),
    ),
    ("H-71", 'max-age="1000"', (1000, False)),
    ("H-71/Rs", 'max-age="31536000"', (YEAR, False)),
    ("H-71/cu", 'max-age="31536000"\r\n', (YEAR, False)),
    ("H-72", "max-age; max-age=15768000", None),
    ("H-73", "Max-aGE=1000; InclUdesUbdomains", (1000, True)),
    (
        "H-74",
        ";;; max-age = 17; ; ; ; ;;; ;;;;; ; includeSubdomains ;;thisIsUnknownDirective;;;;",
        (17, True),
    ),
    ("H-75", "max-age=1000; includeSubDomains bogon", None),
    ("H-76", "max-age=0", (0, False)),
    ("H-76/cu", 'max-age="0"', (0, False)),
    ("H-77", 'max="31536";', None),
    ("H-78", 'max-age="21536000"; includeSubDomains; max-age="3";', None),
    ("H-79", 'max-age="21536000"; include; includeSubDomains;', (21536000, True)),
    ("H-80", 'max-age="21536000"; \r\n', (21536000, False)),
    ("H-81", "max-age = 31536000", (YEAR, False)),
    ("H-82", "max-age=15768000 ; includeSubDomains", (15768000, True)),
    ("H-83", "max-age = izzy", None),
    ("H-84", "max-age=01234", (1234, False)),
    ("H-85", "preload; max-age=1337", (1337, False)),
    ("H-86", "max-age=31536000; includeSubDomains; preload", (YEAR, True)),
    ("H-87", "includeSubDomains; preload; max-age=10886400", (10886400, True)),
    ("H-88", "max-age=315360001; preload; includeSubDomains", (YEAR, True)),
    ("H-90", "200", None),  # the value of a header spelled Strict-Transport-security
    # Chromium's choices beyond the table (docs/hsts.rst lists them):
    ("dup-unknown", "pumpkin; PUMPKIN=1; max-age=5", (5, False)),
    ("quoted-empty-max-age", 'max-age=""', None),
    ("quoted-space-max-age", 'max-age=" 5"', None),
    ("non-ascii-token", "max-age=5; caf\xe9", None),
    ("non-latin1", "max-age=5; x=\u20ac", None),
    ("latin1-in-quotes", 'max-age=5; x="caf\xe9"', (5, False)),
    ("nul", "max-age=5\x00", None),
    ("bare-lf", "max-age=5;\nincludeSubDomains", None),
    ("folded", "max-age=5;\r\n includeSubDomains", (5, True)),
    ("fold-in-quotes", 'max-age=5; x="a\r\n b"', (5, False)),
    ("cr-in-quotes", 'max-age=5; x="a\rb"', None),
    ("backslash-at-end", 'max-age=5; x="a\\', None),
    ("unicode-digits", "max-age=\u0661\u0662", None),
    ("max-age-exactly-cap", f"max-age={YEAR}", (YEAR, False)),
    ("max-age-cap-plus-1", f"max-age={YEAR + 1}", (YEAR, False)),
    ("many-zeros", "max-age=" + "0" * 5000 + "7", (7, False)),
    ("huge-digits", "max-age=" + "1" * 10000, (YEAR, False)),
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [pytest.param(value, expected, id=vid) for vid, value, expected in HEADER_VECTORS],
)
def test_header_vectors(value: str, expected: tuple[int, bool] | None) -> None:
    policy = parse_sts(value)
    if expected is None:
        assert policy is None
    else:
        assert policy == StsPolicy(max_age=expected[0], include_subdomains=expected[1])
    # The same octets as bytes give the same answer (non-Latin-1 text has no octet form).
    if all(ord(c) < 256 for c in value):
        assert parse_sts(value.encode("latin-1")) == policy


def test_header_vectors_table_covers_every_b2_row() -> None:
    ids = {vid.split("/")[0] for vid, _, _ in HEADER_VECTORS}
    # H-89 and H-91 are multi-header vectors, tested through HstsStore.observe below.
    assert ids >= {f"H-{n:02d}" for n in range(1, 89)} | {"H-90"}


def test_parse_sts_rejects_non_text_inputs_quietly() -> None:
    assert parse_sts(123) is None  # type: ignore[arg-type]
    expected = StsPolicy(max_age=5, include_subdomains=False)
    assert parse_sts(bytearray(b"max-age=5")) == expected  # type: ignore[arg-type]
    assert parse_sts(memoryview(b"max-age=5")) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_age": -1, "include_subdomains": False},
        {"max_age": MAX_STS_AGE + 1, "include_subdomains": False},
        {"max_age": 5.0, "include_subdomains": False},
        {"max_age": True, "include_subdomains": False},
        {"max_age": 5, "include_subdomains": 1},
    ],
)
def test_sts_policy_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        StsPolicy(**kwargs)  # type: ignore[arg-type]


# --- hypothesis: round trips and fuzzing -------------------------------------------------------

TOKEN_ALPHABET = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
LWS = st.sampled_from(["", " ", "\t", "  \t ", "\r\n ", "\r\n\t  "])


def _random_case(draw: st.DrawFn, word: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if f else c for c, f in zip(word, flips, strict=True))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def sts_headers(draw: st.DrawFn) -> tuple[str, int, bool]:
    """A valid header with random spelling, plus the max-age and flag it encodes."""
    age = draw(st.integers(min_value=0, max_value=10**30))
    digits = "0" * draw(st.integers(0, 3)) + str(age)
    value = _quote(digits) if draw(st.booleans()) else digits
    directives = [f"{_random_case(draw, 'max-age')}{draw(LWS)}={draw(LWS)}{value}"]
    include = draw(st.booleans())
    if include:
        directives.append(_random_case(draw, "includeSubDomains"))
    for name in draw(st.lists(st.text(TOKEN_ALPHABET, min_size=1, max_size=8), max_size=3)):
        if name.lower() in ("max-age", "includesubdomains"):
            continue
        kind = draw(st.sampled_from(["bare", "token", "quoted"]))
        if kind == "token":
            name += "=" + draw(st.text(TOKEN_ALPHABET, min_size=1, max_size=8))
        elif kind == "quoted":
            name += "=" + _quote(draw(st.text(st.characters(min_codepoint=32, max_codepoint=126))))
        directives.append(name)
    directives = draw(st.permutations(directives))
    empties = draw(st.lists(st.just(""), max_size=3))
    parts = draw(st.permutations(directives + empties))
    text = ";".join(f"{draw(LWS)}{part}{draw(LWS)}" for part in parts)
    return text, min(age, MAX_STS_AGE), include


@settings(max_examples=300, deadline=None)
@given(sts_headers())
def test_round_trip_valid_headers(case: tuple[str, int, bool]) -> None:
    text, age, include = case
    assert parse_sts(text) == StsPolicy(max_age=age, include_subdomains=include)
    assert parse_sts(text.encode("ascii")) == StsPolicy(max_age=age, include_subdomains=include)


@settings(max_examples=200, deadline=None)
@given(sts_headers(), st.sampled_from(["max-age=1", "MAX-AGE=2", "includesubdomains"]))
def test_any_duplicate_known_directive_voids_the_header(
    case: tuple[str, int, bool], extra: str
) -> None:
    text, _, include = case
    if extra == "includesubdomains" and not include:
        return  # not a duplicate then
    assert parse_sts(f"{text};{extra}") is None
    assert parse_sts(f"{extra};{text}") is None


@settings(max_examples=200, deadline=None)
@given(sts_headers(), st.sampled_from(['"', "@", ",", "=", "\r", "\n", "\x00", "\x7f", "é"]))
def test_a_stray_character_voids_the_header(case: tuple[str, int, bool], junk: str) -> None:
    text, _, _ = case
    assert parse_sts(f"{text};{junk}") is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_bytes_never_raise(data: bytes) -> None:
    result = parse_sts(data)
    assert result is None or isinstance(result, StsPolicy)
    assert parse_sts(data.decode("latin-1")) == result


@settings(max_examples=500, deadline=None)
@given(
    st.text(
        st.sampled_from(list('max-ge=;"\\ \t\r\n0123456789incluDESUBOMA,@\x00é\u20ac')),
        max_size=80,
    )
)
def test_fuzz_header_like_text_never_raises(text: str) -> None:
    result = parse_sts(text)
    assert result is None or isinstance(result, StsPolicy)


# --------------------------------------------------------------------------------------------
# HstsStore: observe rules (RFC 6797 §8.1) and section F
# --------------------------------------------------------------------------------------------


def make_store(**kw: object) -> HstsStore:
    return HstsStore(preload=PreloadList.empty(), **kw)  # type: ignore[arg-type]


def observe(hsts: HstsStore, host: str, *values: str | bytes, now: datetime = NOW) -> object:
    return hsts.observe(host, list(values), now=now, secure_and_verified=True)


def test_pol01_header_noted_for_host_and_subdomains() -> None:
    hsts = make_store()
    policy = observe(hsts, "hsts.badssl.test", "max-age=15768000; includeSubDomains")
    assert policy == StsPolicy(max_age=15768000, include_subdomains=True)
    later = NOW + timedelta(days=30)
    assert hsts.is_known_host("hsts.badssl.test", now=later)
    assert hsts.is_known_host("sub.hsts.badssl.test", now=later)
    assert not hsts.is_known_host("badssl.test", now=later)
    known = hsts.known_host("a.b.hsts.badssl.test", now=later)
    assert known == KnownHost(
        host="hsts.badssl.test",
        include_subdomains=True,
        expires=NOW + timedelta(seconds=15768000),
        source="observed",
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "[::]", "::1", "[2001:db8::1]"])
def test_pol05_m16_ip_literal_hosts_are_never_noted(host: str) -> None:
    hsts = make_store()
    assert observe(hsts, host, "max-age=100; includeSubDomains") is None
    assert not hsts.is_known_host(host, now=NOW)
    assert list(hsts.store.items("hsts")) == []


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "app.localhost"])
def test_localhost_is_never_noted_like_chromium(host: str) -> None:
    hsts = make_store()
    assert observe(hsts, host, "max-age=100") is None
    assert list(hsts.store.items("hsts")) == []


def test_pol06_only_the_first_header_counts() -> None:
    hsts = make_store()
    policy = observe(hsts, "a.example", "max-age=100", "max-age=200; includeSubDomains")
    assert policy == StsPolicy(max_age=100, include_subdomains=False)
    assert not hsts.is_known_host("sub.a.example", now=NOW)


def test_h89_invalid_first_header_voids_the_response() -> None:
    hsts = make_store()
    assert (
        observe(hsts, "a.example", 'includeSubdomains; max-age="hehehe";', "max-age=10101") is None
    )
    assert not hsts.is_known_host("a.example", now=NOW)


def test_h91_two_valid_headers_take_the_first() -> None:
    # Rust's headers crate refuses two headers; tlsmitm follows RFC 6797 §8.1 and Chromium.
    hsts = make_store()
    assert observe(hsts, "a.example", "max-age=5", "max-age=6") == StsPolicy(
        max_age=5, include_subdomains=False
    )


def test_pol07_headers_without_verified_tls_are_ignored() -> None:
    hsts = make_store()
    assert hsts.observe("a.example", ["max-age=100"], now=NOW, secure_and_verified=False) is None
    assert not hsts.is_known_host("a.example", now=NOW)


def test_pol08_max_age_zero_deletes_only_that_host() -> None:
    hsts = make_store()
    observe(hsts, "example.com", "max-age=100; includeSubDomains")
    observe(hsts, "www.example.com", "max-age=100")
    assert observe(hsts, "www.example.com", "max-age=0") == StsPolicy(
        max_age=0, include_subdomains=False
    )
    assert hsts.store.get("hsts", "www.example.com") is None
    assert hsts.known_host("www.example.com", now=NOW) == KnownHost(
        host="example.com",
        include_subdomains=True,
        expires=NOW + timedelta(seconds=100),
        source="observed",
    )
    observe(hsts, "example.com", "max-age=0")
    assert not hsts.is_known_host("www.example.com", now=NOW)
    assert not hsts.is_known_host("example.com", now=NOW)


def test_observe_accepts_bytes_values_and_normalises_the_host() -> None:
    hsts = make_store()
    observe(hsts, "BÜCHER.Example.", b"max-age=100")
    assert hsts.store.get("hsts", "xn--bcher-kva.example") is not None
    assert hsts.is_known_host("bücher.example", now=NOW)
    assert hsts.is_known_host("XN--BCHER-KVA.EXAMPLE.", now=NOW)


def test_observe_edge_inputs() -> None:
    hsts = make_store()
    assert hsts.observe("a.example", [], now=NOW, secure_and_verified=True) is None
    with pytest.raises(TypeError, match="sequence"):
        hsts.observe("a.example", "max-age=5", now=NOW, secure_and_verified=True)
    with pytest.raises(ValueError, match="timezone-aware"):
        hsts.observe("a.example", ["max-age=5"], now=datetime(2026, 1, 1), secure_and_verified=True)
    with pytest.raises(ValueError, match="timezone-aware"):
        hsts.is_known_host("a.example", now=datetime(2026, 1, 1))
    for bad in ["", ".", "...", "a..b", "exa mple.com", "a\x00b.example", "-" * 300]:
        assert observe(hsts, bad, "max-age=5") is None
        assert not hsts.is_known_host(bad, now=NOW)
    assert list(hsts.store.items("hsts")) == []


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_fuzz_host_names_never_raise(host: str | bytes) -> None:
    hsts = make_store()
    noted = hsts.observe(host, ["max-age=5"], now=NOW, secure_and_verified=True)  # type: ignore[arg-type]
    known = hsts.is_known_host(host, now=NOW)  # type: ignore[arg-type]
    assert known is (noted is not None)
    hsts.forget(host)  # type: ignore[arg-type]
    assert not hsts.is_known_host(host, now=NOW)  # type: ignore[arg-type]


def test_a_later_header_replaces_the_entry() -> None:
    hsts = make_store()
    observe(hsts, "example.com", "max-age=100; includeSubDomains")
    observe(hsts, "example.com", "max-age=50", now=NOW + timedelta(seconds=10))
    assert not hsts.is_known_host("sub.example.com", now=NOW + timedelta(seconds=11))
    assert hsts.is_known_host("example.com", now=NOW + timedelta(seconds=59))
    assert not hsts.is_known_host("example.com", now=NOW + timedelta(seconds=60))


def test_forget_removes_the_observed_entry_only() -> None:
    preload = PreloadList.from_chromium_json(
        '{"entries": [{"name": "pre.example", "mode": "force-https"}]}'
    )
    hsts = HstsStore(preload=preload)
    observe(hsts, "pre.example", "max-age=100")
    observe(hsts, "obs.example", "max-age=100")
    hsts.forget("OBS.example.")
    hsts.forget("pre.example")
    hsts.forget("not a name")
    assert not hsts.is_known_host("obs.example", now=NOW)
    assert hsts.known_host("pre.example", now=NOW) == KnownHost(
        host="pre.example", include_subdomains=False, expires=None, source="preload"
    )


# --------------------------------------------------------------------------------------------
# b.3 store and matching vectors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def example_com_isd() -> HstsStore:
    hsts = make_store()
    observe(hsts, "example.com", "max-age=1000; includeSubDomains")
    return hsts


@pytest.mark.parametrize(
    ("query", "known"),
    [
        pytest.param("example.com.", True, id="M-01"),
        pytest.param(".example.com", False, id="M-02"),
        pytest.param("sub.example.com", True, id="M-03a"),
        pytest.param("sub.example.com.", True, id="M-03b"),
        pytest.param("sub..example.com", False, id="M-04a"),
        pytest.param("sub..example.com.", False, id="M-04b"),
        pytest.param("example.com..", False, id="M-05"),
    ],
)
def test_m01_to_m05_name_oddities(example_com_isd: HstsStore, query: str, known: bool) -> None:
    assert example_com_isd.is_known_host(query, now=NOW) is known


def test_m06_stored_with_trailing_dot() -> None:
    hsts = make_store()
    observe(hsts, "example.net.", "max-age=1000; includeSubDomains")
    assert hsts.is_known_host("example.net", now=NOW)
    assert hsts.is_known_host("sub.example.net", now=NOW)


def test_m07_never_hsts_for_the_world() -> None:
    hsts = make_store()
    for host in ["", ".", "..."]:
        assert observe(hsts, host, "max-age=1000; includeSubDomains") is None
    for query in ["example.org", ".", "...", "org"]:
        assert not hsts.is_known_host(query, now=NOW)
    assert list(hsts.store.items("hsts")) == []


def test_m08_case_insensitive() -> None:
    hsts = make_store()
    observe(hsts, "EXample.coM", "max-age=1000")
    assert hsts.is_known_host("example.com", now=NOW)
    assert hsts.is_known_host("EXAMPLE.COM", now=NOW)


def test_m09_without_include_subdomains_only_the_host() -> None:
    hsts = make_store()
    observe(hsts, "example.com", "max-age=1000")
    assert hsts.is_known_host("example.com", now=NOW)
    assert not hsts.is_known_host("foo.example.com", now=NOW)


def test_m10_subdomain_matches() -> None:
    hsts = make_store()
    observe(hsts, "example.test", "max-age=1000; includeSubDomains")
    assert hsts.is_known_host("foo.bar.baz.example.test", now=NOW)
    assert not hsts.is_known_host("test", now=NOW)
    assert not hsts.is_known_host("notexample.test", now=NOW)


def test_m11_label_boundary() -> None:
    hsts = make_store()
    observe(hsts, "example.net", "max-age=1000; includeSubDomains")
    assert not hsts.is_known_host("forexample.net", now=NOW)


def test_m12_applicability_before_specificity() -> None:
    hsts = make_store()
    observe(hsts, "example.test", "max-age=1000; includeSubDomains")
    observe(hsts, "foo.example.test", "max-age=2000")
    known = hsts.known_host("bar.foo.example.test", now=NOW)
    assert known is not None
    assert known.host == "example.test"
    assert hsts.known_host("foo.example.test", now=NOW) == KnownHost(
        host="foo.example.test",
        include_subdomains=False,
        expires=NOW + timedelta(seconds=2000),
        source="observed",
    )


def test_m13_siblings_are_independent() -> None:
    hsts = make_store()
    observe(hsts, "sub.example.com", "max-age=1000; includeSubDomains")
    observe(hsts, "sub2.example.com", "max-age=1000; includeSubDomains")
    assert not hsts.is_known_host("example.com", now=NOW)
    assert hsts.is_known_host("x.sub2.example.com", now=NOW)


def test_m14_subdomain_cannot_clear_its_superdomain(example_com_isd: HstsStore) -> None:
    assert observe(example_com_isd, "sub.example.com", "max-age=0") is not None
    assert example_com_isd.is_known_host("example.com", now=NOW)
    assert example_com_isd.is_known_host("sub.example.com", now=NOW)


def test_m15_expiry() -> None:
    hsts = make_store()
    observe(hsts, "expire.example", "max-age=7")
    assert hsts.is_known_host("expire.example", now=NOW + timedelta(seconds=6.999))
    assert not hsts.is_known_host("expire.example", now=NOW + timedelta(seconds=7))
    assert hsts.purge(now=NOW + timedelta(seconds=7)) == 1
    assert hsts.store.get("hsts", "expire.example") is None


def test_m15_expired_superdomain_does_not_apply_but_unexpired_specific_does() -> None:
    hsts = make_store()
    observe(hsts, "example.com", "max-age=10; includeSubDomains")
    observe(hsts, "a.example.com", "max-age=100")
    later = NOW + timedelta(seconds=20)
    assert hsts.is_known_host("a.example.com", now=later)
    assert not hsts.is_known_host("b.a.example.com", now=later)
    assert not hsts.is_known_host("example.com", now=later)


def test_m17_zero_with_include_subdomains_keeps_the_parent() -> None:
    hsts = make_store()
    observe(hsts, "example.com", "max-age=1000; includeSubDomains")
    observe(hsts, "3.example.com", "max-age=1000; includeSubDomains")
    observe(hsts, "3.example.com", 'max-age="0"; includeSubDomains')
    assert hsts.is_known_host("foo.example.com", now=NOW)
    assert hsts.is_known_host("x.3.example.com", now=NOW)
    assert hsts.known_host("x.3.example.com", now=NOW).host == "example.com"  # type: ignore[union-attr]


def test_unreadable_stored_value_still_protects_the_host_itself() -> None:
    store = MemoryStore()
    store.put("hsts", "odd.example", b"\xff not json", expires=NOW.timestamp() + 100)
    store.put("hsts", "list.example", b"[1]", expires=NOW.timestamp() + 100)
    hsts = HstsStore(store, preload=PreloadList.empty())
    assert hsts.is_known_host("odd.example", now=NOW)
    assert not hsts.is_known_host("sub.odd.example", now=NOW)
    assert hsts.is_known_host("list.example", now=NOW)


def test_expiry_far_in_the_future_does_not_crash() -> None:
    store = MemoryStore()
    store.put("hsts", "far.example", b'{"include_subdomains":true}', expires=float("inf"))
    hsts = HstsStore(store, preload=PreloadList.empty())
    known = hsts.known_host("a.far.example", now=NOW)
    assert known is not None
    assert known.expires == datetime.max.replace(tzinfo=UTC)


def test_observed_entries_lists_unexpired_ones() -> None:
    hsts = make_store()
    observe(hsts, "a.example", "max-age=10")
    observe(hsts, "b.example", "max-age=100; includeSubDomains")
    entries = {e.host: e for e in hsts.observed_entries(now=NOW + timedelta(seconds=50))}
    assert set(entries) == {"b.example"}
    assert entries["b.example"].include_subdomains


def test_known_host_validates() -> None:
    with pytest.raises(ValueError, match="source"):
        KnownHost(host="a", include_subdomains=False, expires=None, source="guess")
    with pytest.raises(ValueError, match="expires"):
        KnownHost(host="a", include_subdomains=False, expires=NOW, source="preload")


# --------------------------------------------------------------------------------------------
# Bounded size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_entries", [1, 10, 250])
def test_hostile_stream_stays_under_the_cap(max_entries: int) -> None:
    hsts = make_store(max_entries=max_entries)
    for i in range(3 * max_entries + 7):
        observe(hsts, f"h{i}.attacker.example", f"max-age={1000 + i}")
        assert sum(1 for _ in hsts.store.items("hsts")) <= max_entries
    kept = {item.key for item in hsts.store.items("hsts")}
    # The soonest-expiring went first: every entry kept outlives every entry evicted.
    newest = f"h{3 * max_entries + 6}.attacker.example"
    assert newest in kept
    kept_numbers = sorted(int(k.split(".")[0][1:]) for k in kept)
    assert kept_numbers == list(range(kept_numbers[0], 3 * max_entries + 7))


def test_cap_evicts_expired_entries_first() -> None:
    hsts = make_store(max_entries=100)
    for i in range(50):
        observe(hsts, f"old{i}.example", "max-age=10")
    observe(hsts, "long.example", "max-age=1000000")
    later = NOW + timedelta(seconds=60)
    for i in range(99):
        observe(hsts, f"new{i}.example", "max-age=1000", now=later)
    keys = {item.key for item in hsts.store.items("hsts")}
    assert len(keys) <= 100
    assert "long.example" in keys
    assert not any(k.startswith("old") for k in keys)


def test_max_entries_validated() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        make_store(max_entries=0)


# --------------------------------------------------------------------------------------------
# Preload list (b.4, POL-02, POL-03)
# --------------------------------------------------------------------------------------------


def test_bundled_list_is_loaded_once_and_large() -> None:
    first = PreloadList.bundled()
    assert PreloadList.bundled() is first
    assert len(first) > 100_000
    assert HstsStore().preload is first


def test_pol02_pol03_preloaded_badssl() -> None:
    hsts = HstsStore()
    assert hsts.known_host("preloaded-hsts.badssl.com", now=NOW) == KnownHost(
        host="preloaded-hsts.badssl.com", include_subdomains=True, expires=None, source="preload"
    )
    assert hsts.is_known_host("subdomain.preloaded-hsts.badssl.com", now=NOW)
    # A pinning-only entry is not HSTS (b.4).
    assert not hsts.is_known_host("pinning-test.badssl.com", now=NOW)
    assert hsts.is_known_host("anything.dev", now=NOW)  # a preloaded TLD


@pytest.mark.filterwarnings("ignore:open_binary is deprecated:DeprecationWarning")
def test_bundled_list_agrees_with_the_hstspreload_package() -> None:
    preload = PreloadList.bundled()
    names = sorted(preload._entries)
    rng = random.Random(6797)
    sample = rng.sample(names, 60)
    queries = sample + [f"zz-sub.{n}" for n in sample] + [f"{n}.zz-not-preloaded" for n in sample]
    queries += [f"tlsmitm-{rng.randrange(10**9)}.com" for _ in range(40)]
    for query in queries:
        assert preload.is_preloaded(query) is hstspreload.in_hsts_preload(query), query


def test_preload_lookups_do_not_touch_files(monkeypatch: pytest.MonkeyPatch) -> None:
    preload = PreloadList.bundled()

    def no_files(*args: object, **kwargs: object) -> object:
        raise AssertionError("a lookup opened a file")

    monkeypatch.setattr("builtins.open", no_files)
    monkeypatch.setattr("io.open", no_files)
    assert preload.is_preloaded("www.paypal.com")
    assert not preload.is_preloaded("example.com")


CHROMIUM_JSON = """\
// Copyright 2012 The Chromium Authors
// This file contains the HSTS preloaded list in a machine readable format.
{
  // Pinsets are named arrays of hashes.
  "pinsets": [
    {
      "name": "test",
      "static_spki_hashes": ["TestSPKI"],
      "report_uri": "http://report-example.test/test"
    }
  ],
  "entries": [
    // Entries for testing.
    { "name": "pinning-test.badssl.com", "policy": "test", "include_subdomains": true,
      "pins": "test" },
    { "name": "dev", "policy": "public-suffix", "mode": "force-https",
      "include_subdomains": true },
    { "name": "Example.COM", "policy": "custom", "mode": "force-https" },
    { "name": "www.example.com", "policy": "custom", "mode": "force-https",
      "include_subdomains": true },
    { "name": "url.example", "policy": "custom", "mode": "force-https",
      "expect_ct_report_uri": "https://x.example/// not a comment" },
    { "name": "bücher.example", "policy": "custom", "mode": "force-https" }
  ]
}
"""


def test_from_chromium_json() -> None:
    preload = PreloadList.from_chromium_json(CHROMIUM_JSON)
    assert len(preload) == 5
    assert not preload.is_preloaded("pinning-test.badssl.com")
    assert preload.is_preloaded("example.com")
    assert not preload.is_preloaded("foo.example.com")
    assert preload.is_preloaded("a.b.www.example.com")
    assert preload.is_preloaded("anything.dev")
    assert preload.is_preloaded("url.example")
    assert preload.is_preloaded("xn--bcher-kva.example")
    assert not preload.is_preloaded("127.0.0.1")
    assert not preload.is_preloaded("example.com..")
    hsts = HstsStore(preload=preload)
    assert hsts.known_host("x.www.example.com", now=NOW) == KnownHost(
        host="www.example.com", include_subdomains=True, expires=None, source="preload"
    )


def test_from_chromium_json_duplicate_names_keep_the_stronger_entry() -> None:
    text = json.dumps(
        {
            "entries": [
                {"name": "a.example", "mode": "force-https", "include_subdomains": True},
                {"name": "a.example", "mode": "force-https"},
            ]
        }
    )
    assert PreloadList.from_chromium_json(text).is_preloaded("sub.a.example")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not JSON"),
        ("[]", "entries"),
        ('{"entries": {}}', "entries"),
        ('{"entries": [1]}', r"entries\[0\]"),
        ('{"entries": [{"name": 5}]}', r"entries\[0\]"),
        ('{"entries": [{"name": "a..b", "mode": "force-https"}]}', "empty label"),
        ('{"entries": [{"name": "1.2.3.4", "mode": "force-https"}]}', "IP address"),
        ('{"entries": [{"name": "a.b", "include_subdomains": "yes"}]}', "not bool"),
        ('{"entries": [{"name": "a.b", "mode": 1}]}', "mode"),
    ],
)
def test_from_chromium_json_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        PreloadList.from_chromium_json(text)
    assert info.value.reason == "preload_list"


def test_empty_preload_list() -> None:
    assert len(PreloadList.empty()) == 0
    assert not HstsStore(preload=PreloadList.empty()).is_known_host(
        "preloaded-hsts.badssl.com", now=NOW
    )


def test_max_age_zero_cannot_remove_a_preloaded_host() -> None:
    hsts = HstsStore()
    observe(hsts, "preloaded-hsts.badssl.com", "max-age=0")
    assert hsts.is_known_host("preloaded-hsts.badssl.com", now=NOW)


# --------------------------------------------------------------------------------------------
# Persistence and sharing between processes
# --------------------------------------------------------------------------------------------


def test_persistence_across_restart(tmp_path: Path) -> None:
    with HstsStore.open(tmp_path, preload=PreloadList.empty()) as hsts:
        observe(hsts, "persist.example", "max-age=1000; includeSubDomains")
        assert isinstance(hsts.store, SqliteStore)
    with HstsStore.open(tmp_path, preload=PreloadList.empty()) as again:
        assert again.is_known_host("a.persist.example", now=NOW)
    assert (tmp_path / "state.sqlite3").exists()


def test_open_closes_its_store(tmp_path: Path) -> None:
    hsts = HstsStore.open(tmp_path, preload=PreloadList.empty())
    hsts.close()
    with pytest.raises(ConfigurationError) as info:
        hsts.is_known_host("a.example", now=NOW)
    assert info.value.reason == "store_closed"


def test_open_with_bad_arguments_closes_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        HstsStore.open(tmp_path, preload=PreloadList.empty(), max_entries=0)


def test_a_passed_store_is_not_closed() -> None:
    store = MemoryStore()
    with HstsStore(store, preload=PreloadList.empty()) as hsts:
        observe(hsts, "a.example", "max-age=5")
    assert store.get("hsts", "a.example") is not None


def test_another_process_observation_is_seen_at_once(tmp_path: Path) -> None:
    here = HstsStore.open(tmp_path, preload=PreloadList.empty())
    assert not here.is_known_host("shared.example", now=NOW)
    script = textwrap.dedent(
        f"""
        from datetime import datetime, UTC
        from pathlib import Path
        from tlsmitm._hsts import HstsStore, PreloadList
        with HstsStore.open(Path({str(tmp_path)!r}), preload=PreloadList.empty()) as hsts:
            now = datetime.fromisoformat({NOW.isoformat()!r})
            assert hsts.observe("shared.example", ["max-age=500; includeSubDomains"],
                                now=now, secure_and_verified=True) is not None
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
    assert here.is_known_host("www.shared.example", now=NOW)
    here.close()


def test_store_without_get_many_is_queried_per_suffix() -> None:
    calls: list[str] = []

    class CountingStore(MemoryStore):
        def get(self, namespace: str, key: str) -> StoredItem | None:
            calls.append(key)
            return super().get(namespace, key)

    hsts = HstsStore(CountingStore(), preload=PreloadList.empty())
    observe(hsts, "example.com", "max-age=100; includeSubDomains")
    calls.clear()
    assert hsts.is_known_host("a.b.example.com", now=NOW)
    assert calls == ["a.b.example.com", "b.example.com", "example.com", "com"]


# --------------------------------------------------------------------------------------------
# The benchmark runs and reports every figure
# --------------------------------------------------------------------------------------------


def test_benchmark_reports_positive_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_hsts

    results = bench_hsts.run(0.3)
    assert set(results) >= {
        "parse_per_s",
        "preload_decode_s",
        "lookup_preloaded_per_s",
        "lookup_observed_per_s",
        "lookup_miss_per_s",
        "lookup_distinct_per_s",
        "memory_observe_per_s",
        "sqlite_lookup_hit_per_s",
        "sqlite_lookup_miss_per_s",
        "sqlite_observe_per_s",
    }
    assert all(value > 0 for value in results.values())
    assert results["preload_entries"] > 100_000


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, namespace: str, key: str, value: bytes, *, expires: float) -> None:
        self.puts += 1
        super().put(namespace, key, value, expires=expires)


def test_an_unchanged_policy_is_not_rewritten_on_every_response() -> None:
    store = _CountingStore()
    hsts = HstsStore(store, preload=PreloadList.empty())
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    header = [b"max-age=31536000; includeSubDomains"]
    hsts.observe("a.example", header, now=t0, secure_and_verified=True)
    for seconds in (1, 60, 3600):  # well inside the 1-day refresh slack
        hsts.observe(
            "a.example", header, now=t0 + timedelta(seconds=seconds), secure_and_verified=True
        )
    assert store.puts == 1
    hsts.observe("a.example", header, now=t0 + timedelta(days=2), secure_and_verified=True)
    assert store.puts == 2  # the expiry moved by more than the slack: refreshed
    hsts.observe(
        "a.example", [b"max-age=31536000"], now=t0 + timedelta(days=2), secure_and_verified=True
    )
    assert store.puts == 3  # includeSubDomains changed: written at once
    entry = hsts.known_host("sub.a.example", now=t0 + timedelta(days=2))
    assert entry is None  # without includeSubDomains the subdomain is no longer covered
